"""``sqla-pq demo`` shows what the SPEC lists: plain, delayed, periodic and a flow.

In process here (the command line's own tests in test_cli.py start it as ``python -m sqla_pq
demo``, with DATABASE_URL and with the embedded PostgreSQL)."""

from __future__ import annotations

from sqla_pq.demo import FLOW_STEPS, run_demo
from tests.helpers import rows, scalar


def test_the_demo_runs_its_periodic_task_twice_and_its_flow_in_order(url_str, engine):
    lines: list[str] = []
    assert run_demo(url_str, out=lines.append) == 0, "\n".join(lines)
    out = "\n".join(lines)
    periodic = [line for line in lines if line.startswith("periodic #")]
    assert len(periodic) >= 2 and all("succeeded" in line and "'tick at " in line for line in periodic), out
    for number, step in enumerate(FLOW_STEPS, 1):
        assert any(line.startswith(f"flow {number}/3 ") and "succeeded" in line
                   and f"'step {step} done at" in line for line in lines), out
    assert "each step after the previous one finished" in out
    assert "'Hello, future!'" in out and "run_at='2s'" in out  # the delayed job

    # the rows say the same: one flow of three steps that ran one after the other...
    steps = rows(engine, "SELECT j.started_at, j.finished_at, j.status FROM pq_job j JOIN pq_flow f "
                         "ON j.flow_id = f.id WHERE f.name = 'demo-flow' ORDER BY j.id")
    assert [s[2] for s in steps] == ["succeeded"] * 3
    assert all(b[0] >= a[1] for a, b in zip(steps, steps[1:]))
    # ...and the heartbeat's jobs, one per tick, a second apart; the schedule is gone afterwards
    ticks = rows(engine, "SELECT started_at FROM pq_job WHERE task = 'sqla_pq.demo_tasks.heartbeat' "
                         "AND status = 'succeeded' ORDER BY id")
    assert len(ticks) >= 2 and (ticks[1][0] - ticks[0][0]).total_seconds() > 0.5
    assert scalar(engine, "SELECT count(*) FROM pq_schedule") == 0


def test_a_second_demo_on_the_same_database_starts_afresh(url_str, engine):
    """The demo's database lives on (.sqla_pq/ or DATABASE_URL): a rerun still passes, and
    leaves no schedule firing behind it."""
    for _ in range(2):
        lines: list[str] = []
        assert run_demo(url_str, out=lines.append) == 0, "\n".join(lines)
    assert scalar(engine, "SELECT count(*) FROM pq_schedule") == 0
    assert scalar(engine, "SELECT count(*) FROM pq_flow WHERE name = 'demo-flow'") == 2
