"""E. MVCC, transactions, locks (S23-S25): a long transaction holding xmin, sqla_pq's own
transactions staying short, advisory-lock hygiene."""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import Scenario, wait_until

pytestmark = pytest.mark.fault


def _dead_tuples(sc: Scenario) -> int:
    return int(sc.scalar("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'pq_job'") or 0)


# -- S23 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S23")
def test_s23_a_long_transaction_holding_xmin_slows_nothing_down_and_vacuum_catches_up(own_scenario: Scenario):
    import subprocess
    import sys

    import psycopg2

    from sqla_pq.db import psycopg2_dsn
    from tests.faults import tasks

    sc = own_scenario
    hold = sc.size(5.0, 120.0)
    n = sc.size(3000, 20_000)
    workers = [sc.worker("default", "--isolation", "thread", "-c", "2", label=f"w{i}") for i in range(2)]
    for w in workers:
        w.wait_registered()
    blocker = psycopg2.connect(**psycopg2_dsn(sc.url, application_name="fault_blocker"))
    blocker.set_session(isolation_level="REPEATABLE READ")
    with blocker.cursor() as cur:
        cur.execute("SELECT count(*) FROM pq_job")
        blocker_pid = blocker.get_backend_pid()
    sc.on_cleanup(blocker.close)
    t0 = time.monotonic()
    peak = 0
    enqueued = 0
    while enqueued < n:
        enqueued += len(sc.pq.enqueue_many([tasks.noop] * min(500, n - enqueued)))
        peak = max(peak, _dead_tuples(sc))
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'succeeded'") == n, 120,
               interval=0.2, message="every job to succeed behind the long transaction")
    worked_s = time.monotonic() - t0
    while time.monotonic() - t0 < hold:
        peak = max(peak, _dead_tuples(sc))
        time.sleep(0.5)
    status = subprocess.run([sys.executable, "-m", "sqla_pq", "status"], env=sc.env(),
                            capture_output=True, text=True, timeout=60)
    peak = max(peak, _dead_tuples(sc))
    blocker.rollback()
    released = time.monotonic()
    try:
        wait_until(lambda: _dead_tuples(sc) < 0.1 * peak, 20, interval=0.2,
                   message="autovacuum to clean up after the release")
        cleaned_s = time.monotonic() - released
    except AssertionError:
        cleaned_s = None
    named = f"pid {blocker_pid}" in status.stdout
    sc.record(jobs=n, held_s=hold, worked_behind_it_s=round(worked_s, 2), dead_tuples_peak=peak,
              dead_tuples_below_10pct_after_s=round(cleaned_s, 2) if cleaned_s is not None else None,
              status_named_the_blocker=named)
    assert cleaned_s is not None and cleaned_s <= 5.0, (peak, _dead_tuples(sc))
    if hold >= 60:  # status names transactions older than 60 s
        assert named, status.stdout


# -- S24 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S24")
def test_s24_sqla_pq_holds_no_transaction_open_while_a_long_job_runs(scenario: Scenario):
    sc = scenario
    seconds = sc.size(4.0, 30.0)
    fork = sc.worker("fork", label="fork")
    thread = sc.worker("thread", "--isolation", "thread", label="thread")
    fork.wait_registered()
    thread.wait_registered()
    ids = sc.ledger_ids(1, seconds, queue="fork") + sc.ledger_ids(1, seconds, queue="thread")
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'succeeded' AND id = ANY(%(i)s)",
                                 i=ids) == 2, seconds + 20, interval=0.2, message="both long jobs")
    ages = dict(sc.sampler.max_xact_age)
    reloptions = sc.scalar("SELECT reloptions FROM pg_class WHERE relname = 'pq_job'")
    options = dict(o.split("=", 1) for o in reloptions or [])
    sc.record(job_s=seconds, max_transaction_age_by_role_s={k: round(v, 3) for k, v in ages.items()},
              reloptions=reloptions)
    assert sc.sampler.samples > 0 and max(ages.values(), default=0.0) <= 2.0, ages
    assert float(options.get("autovacuum_vacuum_scale_factor", 1)) <= 0.02, reloptions
    sc.notes.append("atomic tasks (@pq.task(atomic=True)) hold their transaction for the job's "
                    "length by design; not exercised here")


# -- S25 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S25")
def test_s25_no_advisory_lock_outlives_its_transaction_through_kills_prunes_and_ticks(scenario: Scenario):
    from tests.faults import tasks

    sc = scenario
    n, kills = sc.size(300, 2000), sc.size(3, 20)
    sc.pq.schedule(tasks.noop, run_every=1, key="s25", max_concurrent=None)
    env = sc.env(prune_interval=0.2, schedule_interval=0.2)
    workers = [sc.worker("default", "--isolation", "thread", "-c", "2", label=f"w{i}", env=env) for i in range(3)]
    for w in workers:
        w.wait_registered()
    ids = sc.ledger_ids(n, 0.0, result_ttl=1)
    for k in range(kills):
        time.sleep(0.5)
        victim = next(w for w in workers if w.alive())
        victim.kill9()
        workers.append(sc.worker("default", "--isolation", "thread", "-c", "2", label=f"r{k}", env=env))
    sc.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = "
              "current_database() AND application_name LIKE 'sqla_pq:maintenance:%%'")
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger WHERE finished_at IS NOT NULL "
                                 "AND job_id = ANY(%(i)s)", i=ids) >= n, 60, interval=0.2,
               message="every job to run")
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE id = ANY(%(i)s)", i=ids) == 0, 30,
               interval=0.2, message="the pruner to delete the finished jobs")
    samples = []
    for _ in range(10):  # idle now: any advisory lock left is a leak
        samples.append(int(sc.scalar("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                                     "WHERE l.locktype = 'advisory' AND a.datname = current_database() "
                                     "AND a.state = 'idle'")))
        time.sleep(0.1)
    prunes = sum(w.output().count("pruner: deleted=") for w in workers)
    ticks = sc.scalar("SELECT count(*) FROM pq_tick")
    sc.record(jobs=n, worker_kills=kills, pruner_passes_that_deleted=prunes, ticks=ticks,
              idle_advisory_locks_max=max(samples))
    assert max(samples) == 0
    sc.notes.append("sqla_pq takes only transaction-scoped advisory locks (no session locks, no "
                    "leader): the plan's session-lock and leader checks of S25 do not apply")
