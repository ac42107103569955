"""H. Bad input (S32-S35): schedule and time inputs, arguments and results that cannot be
stored, task paths that cannot be imported or are forbidden, huge payloads and hostile names."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.faults.harness import Scenario, wait_until

pytestmark = pytest.mark.fault


def _counts(sc: Scenario) -> tuple[int, int]:
    return sc.scalar("SELECT count(*) FROM pq_job"), sc.scalar("SELECT count(*) FROM pq_schedule")


# -- S32 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S32")
def test_s32_invalid_schedule_and_time_inputs_are_refused_fast_by_name_and_store_nothing(scenario: Scenario):
    from tests.faults import tasks

    sc = scenario
    pq = sc.pq
    crons = ["", "* * * *", "61 * * * *", "* * 30 2 *", "*/0 * * * *", "0 0 * * 8", "1-5/0 * * * *",
             "@reboot", "\u0665 * * * *", "x" * 10_000]
    cases = [(f"cron {c[:20]!r}", c[:20], lambda c=c: pq.schedule(tasks.noop, cron=c)) for c in crons]
    cases += [(f"timezone {z!r}", z, lambda z=z: pq.schedule(tasks.noop, run_every=60, timezone=z))
              for z in ("Mars/Olympus", "", "UTC+2")]
    cases += [(f"between {b!r}", b, lambda b=b: pq.queue().schedule_call("now", tasks.noop, repeat=-1,
                                                                          interval=3600, between=b))
              for b in ("25:00/18:30", "2:60-3", "abc")]
    cases += [(f"interval {i!r}", repr(i), lambda i=i: pq.schedule(tasks.noop, run_every=i))
              for i in (0, -5, dt.timedelta(0))]
    cases += [(f"run_at {r!r}", r, lambda r=r: pq.enqueue(tasks.noop, run_at=r))
              for r in ("5x", "1e309s", "")]
    before = _counts(sc)
    slowest, unnamed, wrong = 0.0, [], []
    for label, named, call in cases:
        t0 = time.monotonic()
        try:
            call()
        except ValueError as exc:
            slowest = max(slowest, time.monotonic() - t0)
            if named and named not in str(exc) and repr(named) not in str(exc):
                unnamed.append((label, str(exc)[:120]))
        except Exception as exc:  # noqa: BLE001
            wrong.append((label, type(exc).__name__))
        else:
            wrong.append((label, "accepted"))
    # six-field (seconds) crons: accepted or refused, consistently
    six = []
    for c in ("0 0 * * * *", "*/5 * * * * *"):
        try:
            pq.schedule(tasks.noop, cron=c, key=c, active=False)
            six.append("accepted")
        except ValueError:
            six.append("refused")
    valid = pq.queue().schedule_call("now", tasks.noop, repeat=-1, interval=3600, between="18:30/2:00")
    try:  # a negative delay: the plan would refuse it; sqla_pq runs the job now (recorded)
        pq.enqueue(tasks.noop, run_at="-5m")
        negative = "accepted (runs now)"
        sc.execute("DELETE FROM pq_job")
    except ValueError:
        negative = "refused"
    after = _counts(sc)
    cli = [subprocess.run([sys.executable, "-m", "sqla_pq", *args], env=sc.env(), capture_output=True,
                          text=True, timeout=60)
           for args in (["schedule", "now", "tests.faults.tasks.noop", "--cron", "61 * * * *"],
                        ["enqueue", "tests.faults.tasks.noop", "--run-at", "5x"])]
    sc.record(cases=len(cases), slowest_refusal_ms=round(1000 * slowest, 1), not_named=unnamed,
              negative_run_at=negative,
              six_field_crons=six, cli_exit_codes=[r.returncode for r in cli])
    assert wrong == [], wrong
    assert unnamed == [], unnamed
    assert slowest <= 0.1, slowest
    assert after[0] == before[0] and after[1] == before[1] + 1 + six.count("accepted"), (before, after)
    assert valid.id and len(set(six)) == 1
    for r, value in zip(cli, ("61 * * * *", "5x")):
        assert r.returncode != 0 and value in (r.stdout + r.stderr), r.stdout + r.stderr


# -- S33 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S33")
def test_s33_unstorable_arguments_are_refused_and_unstorable_results_fail_once(scenario: Scenario):
    from sqla_pq.errors import SerializationError
    from tests.faults import tasks
    from tests.models_pydantic import Person

    sc = scenario
    pq = sc.pq

    def nested() -> int:
        return 1

    recursive: list = []
    recursive.append(recursive)
    refused = {"lambda": lambda: 1, "nested function": nested, "generator": (i for i in ()),
               "socket": socket.socket()}
    stored = {"lock": threading.Lock(), "recursive list": recursive, "nan": float("nan"), "nul": "\x00",
              "lone surrogate": "\ud800", "10**5000": 10**5000, "naive datetime": dt.datetime(2020, 1, 1),
              "pydantic model": Person(name="x", age=1)}
    try:
        before = _counts(sc)[0]
        got_refused, got_stored = {}, {}
        for label, value in refused.items():
            try:
                pq.enqueue(tasks.echo, value)
                got_refused[label] = "accepted"
            except SerializationError as exc:
                got_refused[label] = str(exc)[:100]
            except Exception as exc:  # noqa: BLE001
                got_refused[label] = f"WRONG {type(exc).__name__}: {exc}"[:100]
        after_refused = _counts(sc)[0]
        for label, value in stored.items():
            try:
                job = pq.enqueue(tasks.echo, value)
                got_stored[label] = job.encoding
            except Exception as exc:  # noqa: BLE001
                got_stored[label] = f"WRONG {type(exc).__name__}: {exc}"[:100]
    finally:
        refused["socket"].close()
    # results that cannot be stored: failed, not retried, the worker lives
    sc.execute("DELETE FROM pq_job")
    bad = [pq.enqueue_call(f, max_retries=3) for f in (tasks.returns_generator, tasks.returns_socket)]
    good = pq.enqueue(tasks.echo, 42)
    w = sc.worker("default", label="w")
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status IN ('succeeded', 'failed')") == 3,
               30, message="the three jobs to end")
    ends = {j.id: sc.rows("SELECT status, attempts, error FROM pq_job WHERE id = %(j)s", j=j.id)[0] for j in bad}
    sc.record(refused=got_refused, stored_as=got_stored, unstorable_results={k: v[:2] for k, v in ends.items()},
              names_the_argument=[k for k, v in got_refused.items() if "argument 1" in v or "[0]" in v])
    assert after_refused == before, "a refused enqueue stored something"
    assert not [k for k, v in got_refused.items() if v == "accepted" or v.startswith("WRONG")], got_refused
    assert not [k for k, v in got_stored.items() if v.startswith("WRONG")], got_stored
    assert got_stored["pydantic model"] == "json" and got_stored["nul"] != "WRONG"
    for status, attempts, error in ends.values():
        assert status == "failed" and attempts == 1 and "ResultNotStorable" in (error or ""), (status, attempts, error)
    assert sc.pq.get_job(good.id).return_value() == 42 and w.alive()


# -- S34 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S34")
def test_s34_bad_and_forbidden_task_paths_fail_once_and_are_never_imported(scenario: Scenario, tmp_path):
    from sqla_pq.errors import TaskNotAllowed, TaskNotImportable
    from tests.faults import tasks

    sc = scenario
    canary = tmp_path / "imported"
    up_front = {}
    for path in ("os.system", "builtins.eval", "subprocess.run", "tests..tasks"):
        try:
            sc.pq.enqueue(path)
            up_front[path[:30]] = "accepted"
        except (TaskNotImportable, TaskNotAllowed) as exc:
            up_front[path[:30]] = type(exc).__name__ if path[:20] in str(exc) else f"unnamed {type(exc).__name__}"
    unchecked = {}
    for path in ("no.such.f", "a." * 250 + "f"):  # string paths are not imported by the producer
        try:
            sc.pq.enqueue(path)
            unchecked[path[:30]] = "accepted"
        except (TaskNotImportable, TaskNotAllowed) as exc:
            unchecked[path[:30]] = type(exc).__name__
    sc.execute("DELETE FROM pq_job")
    rows = ["no.such.f", "tests.faults.tasks.missing", "tests.broken_module.run", "tests.faults.slow_import.run",
            "os.system", "builtins.eval", "subprocess.run", "tests..tasks", "a" * 500,
            "tests.faults.canary.run"]
    for path in rows:  # rows written by anyone with INSERT on the table
        retries = 0 if "slow_import" in path else 3  # a timeout is retried like any failure
        sc.execute("INSERT INTO pq_job (queue, task, args, kwargs, max_retries, timeout) VALUES "
                   "('default', %(t)s, %(a)s, '{}', %(r)s, 2)", t=path, a=f'["touch {canary}"]', r=retries)
    n_good = sc.size(20, 100)
    good = [j.id for j in sc.pq.enqueue_many([(tasks.echo, (i,)) for i in range(n_good)])]
    w = sc.worker("default", label="w", env=sc.env(
        allowed_tasks="tests.faults.tasks,tests.broken_module,tests.faults.slow_import,no.such",
        SQLA_PQ_FAULT_CANARY=str(canary)))
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status IN ('succeeded', 'failed')")
               == len(rows) + n_good, 60, interval=0.2, message="every job to end")
    bad = sc.rows("SELECT task, status, attempts, error FROM pq_job WHERE NOT (id = ANY(%(g)s)) ORDER BY id",
                  g=good)
    sc.record(refused_at_enqueue=up_front, not_checked_at_enqueue=unchecked, worker_side={t[:40]: (s, a, (e or "")[:60]) for t, s, a, e in bad})
    assert all(v in ("TaskNotAllowed", "TaskNotImportable") for v in up_front.values()), up_front
    assert all(s == "failed" and a == 1 and e for _t, s, a, e in bad), bad
    assert sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'succeeded'") == n_good
    assert not canary.exists(), "a forbidden module was imported"
    assert w.alive()


# -- S35 ----------------------------------------------------------------------------------------------------


class _CountingConnections:
    """psycopg2 connections whose cursors count the statements sent (product-independent)."""

    def __init__(self) -> None:
        import psycopg2.extensions as ext

        self.sql: list[str] = []
        counter = self

        class Cursor(ext.cursor):
            def execute(self, query, vars=None):  # noqa: A002
                counter.sql.append(query if isinstance(query, str) else query.decode(errors="replace"))
                return super().execute(query, vars)

        class Connection(ext.connection):
            def cursor(self, *args, **kwargs):
                kwargs.setdefault("cursor_factory", Cursor)
                return super().cursor(*args, **kwargs)

        self.factory = Connection


@pytest.mark.scenario("S35")
def test_s35_payload_caps_hold_big_payloads_round_trip_and_hostile_names_are_refused(scenario: Scenario):
    from sqla_pq import PQ
    from sqla_pq.db import create_engine
    from sqla_pq.errors import ConfigurationError, InvalidQueueName, PayloadTooLarge
    from sqla_pq.status import render_status
    from tests.faults import tasks

    sc = scenario
    pq = sc.pq
    mb = 2**20
    refused = {}
    for size in (17 * mb, 64 * mb):
        try:
            pq.enqueue(tasks.echo, "x" * size)
            refused[size // mb] = "accepted"
        except PayloadTooLarge:
            refused[size // mb] = "PayloadTooLarge"
    assert sc.scalar("SELECT count(*) FROM pq_job") == 0
    blob = bytes(range(256)) * (mb // 256)
    big = pq.enqueue(tasks.echo, blob.hex()[: 15 * mb])  # under the 16 MB cap
    stored = sc.scalar("SELECT args->>0 FROM pq_job WHERE id = %(j)s", j=big.id)
    small = pq.enqueue(tasks.echo, blob.hex()[:mb])
    w = sc.worker("default", label="w", env=sc.env())
    assert sc.pq.wait(small.id, timeout=60) == blob.hex()[:mb]
    # status lists many large jobs without loading their arguments
    many = sc.size(20, 30)
    pq.enqueue_many([(tasks.echo, ("y" * sc.size(mb, 16 * mb - 1000),))] * many, queue="parked")
    pq.pause_queue("parked")
    t0 = time.monotonic()
    render_status(pq)
    status_s = time.monotonic() - t0
    # a bulk enqueue is one statement
    counting = _CountingConnections()
    engine = create_engine(sc.url, connect_args={"connection_factory": counting.factory})
    bulk = sc.size(20_000, 100_000)
    jobs = PQ(engine).enqueue_many([(tasks.echo, (i,)) for i in range(bulk)], queue="bulk")
    inserts = [s for s in counting.sql if "pq_job" in s and "INSERT" in s.upper() or s.startswith("EXECUTE")]
    engine.dispose()
    # hostile queue names: refused by the one rule, or a plain round trip
    names = ["emails'; DROP TABLE pq_jobs;--", 'a"b', "%s", "%(x)s", "$$", "\n", "\x00", " ", "\u65e5\u672c",
             "\U0001f642", "x" * 64, "x" * 200]
    outcome = {}
    for name in names:
        try:
            job = pq.queue(name).enqueue(tasks.noop)
            outcome[f"{len(name)}:{name[:12]!r}"] = "round trip" if sc.pq.get_job(job.id).queue == name else "changed"
        except InvalidQueueName:
            outcome[f"{len(name)}:{name[:12]!r}"] = "refused"
    empty = pq.queue("").name
    schemas = {}
    for bad in ('x"; DROP SCHEMA public;--', "$$", "%s", "a\\b", "a\tb", "\u00e9" * 40, "x" * 64):
        try:
            PQ(sc.url, schema=bad)
            schemas[repr(bad)[:20]] = "accepted"
        except ConfigurationError:
            schemas[repr(bad)[:20]] = "refused"
    sc.record(refused_mb=refused, round_trip_15mb=stored == blob.hex()[: 15 * mb], status_s=round(status_s, 3),
              parked_large_jobs=many, bulk_jobs=bulk, bulk_insert_statements=len(inserts),
              queue_names=outcome, empty_queue_name_becomes=empty, schemas=schemas)
    assert refused == {17: "PayloadTooLarge", 64: "PayloadTooLarge"}
    assert stored == blob.hex()[: 15 * mb]
    assert status_s < 1.0
    assert len(jobs) == bulk and len(inserts) == 1, inserts[:3]
    assert all(v in ("refused", "round trip") for v in outcome.values()), outcome
    assert outcome[f"64:{'x' * 12!r}"] == "round trip" and outcome[f"200:{'x' * 12!r}"] == "refused"
    assert set(schemas.values()) == {"refused"}, schemas
    assert sc.scalar("SELECT count(*) FROM pq_job") > bulk and w.alive()
