"""The claim: one statement, ordered, batched, SKIP LOCKED, honouring serial and paused queues."""

from __future__ import annotations

import json
import threading

import pytest

from sqla_pq import Priority, queries
from sqla_pq.execution.call import ClaimedJob
from tests import tasks
from tests.helpers import plan_nodes


def claim(pq, queues, batch, priorities=None, worker="w-test"):
    with pq._cursor() as runner:
        rows = runner.run(queries.job_claim(tuple(queues) if queues else None, priorities),
                          {"batch": batch, "worker": worker, "lease": 30.0})
    return sorted((ClaimedJob.from_tuple(r) for r in rows), key=ClaimedJob.sort_key)


def test_queue_order_then_priority_then_run_at_then_insertion(pq):
    low1 = pq.enqueue(tasks.add, 1, 1, queue="low")
    high_normal = pq.enqueue(tasks.add, 1, 1, queue="high")
    high_crit = pq.enqueue(tasks.add, 1, 1, queue="high", priority=Priority.CRITICAL)
    high_early = pq.enqueue(tasks.add, 1, 1, queue="high", run_at="-1m")
    high_normal2 = pq.enqueue(tasks.add, 1, 1, queue="high")
    got = claim(pq, ["high", "low"], 10)
    assert [j.id for j in got] == [high_crit.id, high_early.id, high_normal.id, high_normal2.id, low1.id]
    assert all(j.attempts == 1 for j in got)


def test_expected_at_orders_within_a_priority(pq):
    later = pq.enqueue(tasks.add, 1, 1, expected_at="2h")
    sooner = pq.enqueue(tasks.add, 1, 1, expected_at="5m")
    plain = pq.enqueue(tasks.add, 1, 1)
    assert [j.id for j in claim(pq, ["default"], 3)] == [sooner.id, later.id, plain.id]


def test_a_batch_takes_at_most_its_size_and_only_ready_jobs(pq):
    pq.enqueue_many([(tasks.add, (i, i)) for i in range(7)])
    future = pq.enqueue(tasks.add, 0, 0, run_at="1h")
    first = claim(pq, ["default"], 5)
    second = claim(pq, ["default"], 5)
    assert len(first) == 5 and len(second) == 2
    assert future.id not in {j.id for j in first + second}
    assert claim(pq, ["default"], 5) == []


def test_later_queues_fill_the_rest_of_a_batch(pq):
    pq.enqueue_many([(tasks.add, (1, 1))] * 2, queue="a")
    pq.enqueue_many([(tasks.add, (1, 1))] * 5, queue="b")
    got = claim(pq, ["a", "b"], 4)
    assert [j.queue for j in got] == ["a", "a", "b", "b"]


def test_a_worker_on_all_queues_orders_by_priority(pq):
    a = pq.enqueue(tasks.add, 1, 1, queue="x")
    b = pq.enqueue(tasks.add, 1, 1, queue="y", priority=Priority.HIGH)
    assert [j.id for j in claim(pq, None, 5)] == [b.id, a.id]


def test_dedicated_priorities(pq):
    pq.enqueue(tasks.add, 1, 1, priority=Priority.LOW)
    crit = pq.enqueue(tasks.add, 1, 1, priority=Priority.CRITICAL)
    high = pq.enqueue(tasks.add, 1, 1, priority=Priority.HIGH)
    got = claim(pq, ["default"], 10, priorities=(Priority.CRITICAL, Priority.HIGH))
    assert [j.id for j in got] == [crit.id, high.id]


def test_paused_queues_give_nothing_until_resumed(pq):
    pq.enqueue(tasks.add, 1, 1, queue="p")
    pq.pause_queue("p")
    assert pq.paused_queues() == ["p"]
    assert claim(pq, ["p"], 5) == [] and claim(pq, None, 5) == []
    pq.resume_queue("p")
    assert len(claim(pq, ["p"], 5)) == 1


def test_a_serial_queue_gives_one_job_and_none_while_one_runs(pq, engine):
    q = pq.queue("serial")
    assert q.serial, "the queue named 'serial' is serial by default"
    ids = [q.enqueue(tasks.add, i, i).id for i in range(3)]
    plain = pq.queue("plain", serial=False).enqueue(tasks.add, 1, 1)
    got = claim(pq, ["serial", "plain"], 10)
    assert [j.id for j in got] == [ids[0], plain.id]
    assert claim(pq, ["serial"], 10) == [], "a second job of a serial queue while one runs"
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET status = 'succeeded' WHERE id = %(i)s", {"i": ids[0]})
    assert [j.id for j in claim(pq, ["serial"], 10)] == [ids[1]]


def test_serial_queues_setting_makes_every_job_of_those_queues_serial_however_enqueued(Session):
    from sqla_pq import PQ

    pq = PQ(Session, serial_queues=["reports", "serial"])
    jobs = [pq.enqueue(tasks.add, 1, 1, queue="reports"),
            pq.queue("reports").enqueue(tasks.add, 2, 2),
            pq.enqueue_many([(tasks.add, (3, 3))], queue="reports")[0]]
    assert all(j.serial for j in jobs)
    assert not pq.enqueue(tasks.add, 1, 1, queue="other").serial
    assert not pq.queue("reports", serial=False).enqueue(tasks.add, 1, 1).serial  # explicit wins
    got = claim(pq, ["reports"], 10)
    assert [j.id for j in got] == [jobs[0].id], "one job of a serial queue at a time"
    assert claim(pq, ["reports"], 10) == []


def test_the_database_refuses_a_second_running_job_of_a_serial_queue(pq, engine):
    """Two claims racing: the unique index turns the loser's claim into an error."""
    q = pq.queue("s", serial=True)
    q.enqueue(tasks.add, 1, 1)
    q.enqueue(tasks.add, 2, 2)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        from sqla_pq.db import compile_raw

        stmt = compile_raw(queries.job_claim(("s",)), engine.dialect, None)
        cur.execute(stmt.sql, stmt.params({"batch": 1, "worker": "a", "lease": 30.0}))  # uncommitted
        assert len(cur.fetchall()) == 1
        errors: list[BaseException] = []

        def second() -> None:
            try:
                claim(pq, ["s"], 1, worker="b")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        raw.commit()
        t.join(10)
        with engine.connect() as c:
            running = c.exec_driver_sql("SELECT count(*) FROM pq_job WHERE status = 'running'").scalar()
        assert running == 1
        assert not errors or "uq_pq_job_serial_running" in str(errors[0])
    finally:
        raw.close()


NO_COMPLETIONS = {"ids": [], "attempt_list": [], "results": [], "payloads": [],
                  "signatures": [], "workspaces": []}


def _plan(engine, queues, batch, n_ready, generic=False, builder=queries.job_claim):
    with engine.begin() as c:
        # a backlog in one queue, a few jobs in the queue being claimed: the case where
        # reading the wrong index would walk the whole backlog
        c.exec_driver_sql(
            "INSERT INTO pq_job (queue, task, args, kwargs) SELECT CASE WHEN i %% 100 = 0 THEN "
            "'default' ELSE 'bulk' END, 'tests.tasks.add', '[1,1]', '{}' "
            "FROM generate_series(1, %(n)s) AS i", {"n": n_ready})
        c.exec_driver_sql("ANALYZE pq_job")
    from sqla_pq.db import compile_raw

    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if generic:  # what a worker runs: prepared once, generic plan, literal batch size
            from sqla_pq.link import Prepared

            stmt = compile_raw(builder(queues, None, batch), engine.dialect, None)
            prepared = Prepared.of(stmt.sql, 0, stmt.types)
            cur.execute("SET plan_cache_mode = force_generic_plan")
            cur.execute(prepared.prepare_sql)
            sql, params = prepared.execute_sql, stmt.params(
                {"worker": "x", "lease": 30.0, **NO_COMPLETIONS})
        else:
            stmt = compile_raw(builder(queues), engine.dialect, None)
            sql, params = stmt.sql, stmt.params(
                {"batch": batch, "worker": "x", "lease": 30.0, **NO_COMPLETIONS})
        cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
        plan = cur.fetchone()[0]
        raw.rollback()  # EXPLAIN ANALYZE ran the update
    finally:
        raw.close()
    return plan[0]["Plan"]


@pytest.mark.parametrize("builder", [queries.job_claim, queries.job_complete_and_claim],
                         ids=["claim", "complete-and-claim"])
@pytest.mark.parametrize("generic", [False, True], ids=["custom", "prepared-generic"])
@pytest.mark.parametrize("queues, index", [(("default",), "ix_pq_job_ready"),
                                           (("other", "default"), "ix_pq_job_ready"),
                                           (None, "ix_pq_job_ready_any")])
def test_the_claim_plan_uses_the_partial_index_and_locks_no_more_than_its_batch(
        engine, queues, index, generic, builder):
    plan = _plan(engine, queues, batch=5, n_ready=20_000, generic=generic, builder=builder)
    nodes = list(plan_nodes(plan))
    used = {n.get("Index Name") for n in nodes if "Index Name" in n}
    assert index in used, json.dumps(plan, indent=1)[:3000]
    assert not any(n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "pq_job" for n in nodes)
    locked = sum(n["Actual Rows"] * n.get("Actual Loops", 1) for n in nodes if n["Node Type"] == "LockRows")
    assert 0 < locked <= 5, f"the claim locked {locked} rows for a batch of 5"


def test_a_claimed_row_maps_onto_claimedjob_field_by_field():
    """``ClaimedJob.from_tuple`` builds the job positionally (no dict per row on the hot path):
    the claim's RETURNING order must be the dataclass's field order."""
    import dataclasses

    fields = [f.name for f in dataclasses.fields(ClaimedJob) if f.name != "extra"]
    assert fields == list(queries.CLAIM_KEYS)


@pytest.mark.parametrize("builder", [queries.job_claim, queries.job_complete_and_claim])
def test_a_claim_compiled_once_for_every_size_is_the_claim_of_that_size(engine, builder):
    from sqla_pq.db import compile_raw, compile_sized

    for queues in (("a",), ("a", "b"), None):
        for batch in (1, 6, 64):
            sized = compile_sized(builder, queues, None, batch, engine.dialect, None)
            direct = compile_raw(builder(queues, None, batch), engine.dialect, None)
            assert sized.sql == direct.sql and sized.defaults == direct.defaults

            def named(raw):  # anonymous binds carry object ids in their keys
                return {k: v for k, v in raw.types.items() if not k.startswith("%(")}

            assert named(sized) == named(direct)


def test_complete_and_claim_carries_the_completed_ids_on_one_row_only(pq):
    """The ids written as succeeded come back once, whatever the number of claimed rows
    (repeating three arrays on each of 64 rows was most of the statement's output)."""
    from sqla_pq.execution.call import Outcome
    from sqla_pq.record import complete_params

    for i in range(3):
        pq.enqueue(tasks.add, i, i, queue="cc", result_ttl=0 if i == 0 else 60)
    running = claim(pq, ["cc"], 3)
    waiting = [pq.enqueue(tasks.add, i, i, queue="cc").id for i in range(4)]
    successes = [Outcome(j.id, j.attempts, "succeeded", result_json="1") for j in running]
    with pq._cursor() as runner:
        rows = runner.run(queries.job_complete_and_claim(("cc",), None),
                          {**complete_params(successes), "batch": 8, "worker": "w-test",
                           "lease": 30.0})
    assert sorted(r[0] for r in rows) == waiting
    carriers = [r for r in rows if r[-3] is not None]
    assert len(carriers) == 1
    assert sorted(carriers[0][-3]) == sorted(j.id for j in running)
    assert carriers[0][-1] == [running[0].id]  # result_ttl=0: delete at once
    assert all(r[-2] is None and r[-1] is None for r in rows if r is not carriers[0])
    with pq._cursor() as runner:  # nothing left to claim: one row of NULLs, still carrying
        again = [Outcome(i, 1, "succeeded", result_json="1") for i in waiting]
        rows = runner.run(queries.job_complete_and_claim(("cc",), None),
                          {**complete_params(again), "batch": 8, "worker": "w-test",
                           "lease": 30.0})
    assert len(rows) == 1 and rows[0][0] is None and sorted(rows[0][-3]) == waiting


@pytest.mark.parametrize("queues", [["s", "p"], None], ids=["listed", "all-queues"])
def test_a_serial_backlog_larger_than_the_batch_does_not_starve_the_other_queues(pq, queues):
    """The serial queue's ready jobs come first and outnumber the batch: the claim takes one of
    them; the next claim, while it runs, leaves the serial queue out and reaches the others."""
    pq.queue("s", serial=True).enqueue_many([(tasks.add, (i, i)) for i in range(20)],
                                            priority=Priority.HIGH)
    plain = [pq.enqueue(tasks.add, i, i, queue="p").id for i in range(3)]
    first = claim(pq, queues, 5)
    assert [j.queue for j in first] == ["s"]
    second = claim(pq, queues, 5)
    assert sorted(j.id for j in second) == plain, "the other queue's jobs, none of the serial queue"
    assert claim(pq, queues, 5) == []


def test_a_serial_queue_runs_nothing_else_while_its_serial_job_runs(pq):
    """A job enqueued on a serial queue's name by a path that did not mark it serial waits too:
    at most one job of the queue runs while its serial job runs."""
    serial = pq.queue("s2", serial=True).enqueue(tasks.add, 1, 1)
    unmarked = pq.enqueue(tasks.add, 2, 2, queue="s2")
    assert unmarked.serial is False
    assert [j.id for j in claim(pq, ["s2"], 5)] == [serial.id], "the serial job starts alone"
    assert claim(pq, ["s2"], 5) == [] and claim(pq, None, 5) == []
