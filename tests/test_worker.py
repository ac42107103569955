"""The worker in-process (thread isolation): results, TTLs, retries, timeouts, handlers, hooks."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from sqla_pq import PQ, Backoff
from sqla_pq.testing import drain, work_one
from tests import tasks
from tests.helpers import BackgroundWorker, rows, scalar, wait_until


def test_results_are_stored_with_the_job(pq):
    a = pq.enqueue(tasks.add, 2, 3)
    b = pq.enqueue(tasks.echo, 1, x="y")
    c = pq.enqueue(tasks.nothing)
    assert drain(pq) == 3
    assert pq.get_job(a.id).return_value() == 5
    assert pq.get_job(b.id).result == {"args": [1], "kwargs": {"x": "y"}}
    done = pq.get_job(c.id)
    assert done.status == "succeeded" and done.return_value() is None
    assert done.started_at <= done.finished_at and done.worker_id


def test_result_ttl_zero_deletes_minus_one_keeps_default_500(pq):
    gone = pq.enqueue(tasks.add, 1, 1, result_ttl=0)
    kept = pq.enqueue(tasks.add, 1, 1, result_ttl=-1)
    default = pq.enqueue(tasks.add, 1, 1)
    drain(pq)
    from sqla_pq import JobNotFound

    with pytest.raises(JobNotFound):
        pq.get_job(gone.id)
    assert pq.get_job(kept.id).expires_at is None
    job = pq.get_job(default.id)
    assert job.expires_at - job.finished_at == dt.timedelta(seconds=500)


def test_async_tasks_run_on_an_event_loop(pq):
    jobs = [pq.enqueue(tasks.async_add, i, i) for i in range(5)]
    drain(pq, concurrency=3)
    assert [pq.get_job(j.id).return_value() for j in jobs] == [0, 2, 4, 6, 8]


def test_retries_then_success_each_attempt_counted(pq):
    job = pq.enqueue(tasks.flaky, 3, max_retries=5)
    drain(pq)
    done = pq.get_job(job.id)
    assert done.status == "succeeded" and done.return_value() == 3
    assert done.attempts == 3 and done.failures == 2 and done.interruptions == 0


def test_retries_stop_after_max_retries(pq):
    job = pq.enqueue(tasks.fail, "always", max_retries=2)
    drain(pq)
    done = pq.get_job(job.id)
    assert done.status == "failed" and done.attempts == 3 and "always" in done.error


def test_retry_in_waits_and_backoff_grows(pq, engine):
    job = pq.enqueue(tasks.fail, max_retries=2, retry_in=Backoff("1s", factor=3, max="1h"))
    work_one(pq)
    first = pq.get_job(job.id)
    now = scalar(engine, "SELECT now()")
    assert first.status == "queued" and 0.5 < (first.run_at - now).total_seconds() <= 1.0
    assert work_one(pq) is False, "a retry ran before its delay"
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET run_at = now() WHERE id = %(i)s", {"i": job.id})
    work_one(pq)
    second = pq.get_job(job.id)
    now = scalar(engine, "SELECT now()")
    assert 2.5 < (second.run_at - now).total_seconds() <= 3.0, "the second retry waits 1s * 3"


def test_tasks_can_ask_for_a_retry_or_cancel_themselves(pq, engine):
    again = pq.enqueue(tasks.ask_retry, "1h", max_retries=1)
    stop = pq.enqueue(tasks.cancel_me, max_retries=3)
    drain(pq)
    retried = pq.get_job(again.id)
    assert retried.status == "queued" and retried.failures == 1
    assert (retried.run_at - scalar(engine, "SELECT now()")).total_seconds() > 3500
    cancelled = pq.get_job(stop.id)
    assert cancelled.status == "cancelled" and cancelled.attempts == 1
    assert "not needed" in cancelled.error


def test_a_result_that_cannot_be_stored_fails_the_job_without_retry(pq):
    job = pq.enqueue(tasks.unstorable, max_retries=3)
    drain(pq)
    done = pq.get_job(job.id)
    assert done.status == "failed" and done.attempts == 1 and "ResultNotStorable" in done.error


def test_thread_timeout_fails_the_job_and_the_worker_goes_on(pq):
    slow = pq.enqueue(tasks.busy_loop, 20, timeout=0.5)
    after = pq.enqueue(tasks.add, 1, 2)
    t0 = time.monotonic()
    drain(pq)
    assert time.monotonic() - t0 < 10
    done = pq.get_job(slow.id)
    assert done.status == "failed" and "JobTimeout" in done.error and "0.5s" in done.error
    assert pq.get_job(after.id).return_value() == 3


def test_a_thread_stuck_past_its_timeout_keeps_the_job_until_it_ends(pq, url_str):
    """No retry may overlap the stuck attempt: the lease is kept (renewed by heartbeats, past
    its own length) until the thread ends."""
    # A lease of 4 s (8 heartbeats) and a thread stuck 5 s: renewals are needed to keep the
    # job, and one late heartbeat on a loaded machine does not lose it (with the suite's 2 s
    # lease, a 1.75 s stall of the test database did).
    lease, stuck = 4.0, 5.0
    pq = PQ(pq.engine, lease=lease)
    job = pq.enqueue(tasks.record, url_str, "stuck", stuck, timeout=0.5, max_retries=1)
    with BackgroundWorker(pq, ["default"], concurrency=2):
        time.sleep(lease + 0.5)
        assert pq.get_job(job.id).status == "running", "the job was released while its thread ran"
        wait_until(lambda: pq.get_job(job.id).status == "failed", 20, message="the retry to fail")
    ledger = rows(pq.engine, "SELECT attempt, started_at, finished_at FROM test_ledger ORDER BY id")
    assert [r[0] for r in ledger] == [1, 2]
    # attempt 1 slept in C code (the timeout exception lands only after the sleep)
    assert (ledger[1][1] - ledger[0][1]).total_seconds() >= stuck, \
        "the retry started while the stuck attempt's thread still ran"


def test_async_task_timeout(pq):
    job = pq.enqueue(tasks.async_sleep, 10, timeout=0.3)
    drain(pq)
    assert "JobTimeout" in pq.get_job(job.id).error


def test_exception_handlers_form_a_chain_and_false_stops_it(pq):
    calls: list[str] = []

    def first(job, exc_type, exc_value, tb):
        calls.append(f"first:{exc_type.__name__}:{exc_value}:{tb is not None}:{job.id}")

    def stopper(job, *exc_info):
        calls.append("stopper")
        return False

    def never(job, *exc_info):
        calls.append("never")

    job = pq.enqueue(tasks.fail, "x")
    drain(pq, exc_handlers=[first, stopper, never])
    assert calls == [f"first:ValueError:x:True:{job.id}", "stopper"]


def test_lifecycle_hooks_run_around_each_job(pq):
    seen: list[tuple[str, int, str | None]] = []
    ok = pq.enqueue(tasks.add, 1, 1)
    bad = pq.enqueue(tasks.fail)
    drain(pq, pre_execute=lambda job: seen.append(("pre", job.id, None)),
          post_execute=lambda job, error: seen.append(("post", job.id, type(error).__name__ if error else None)))
    assert seen == [("pre", ok.id, None), ("post", ok.id, None),
                    ("pre", bad.id, None), ("post", bad.id, "ValueError")]


def test_rate_limit_spaces_job_starts(pq, engine):
    pq.enqueue_many([(tasks.nothing, ())] * 3)
    drain(pq, rate_limit=0.4, concurrency=3)
    starts = [r[0] for r in rows(engine, "SELECT started_at FROM pq_job ORDER BY started_at")]
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]
    assert all(g >= 0.35 for g in gaps), gaps


def test_max_runtime_caps_every_job_timeout(pq):
    job = pq.enqueue(tasks.busy_loop, 20, timeout=600)
    drain(pq, max_runtime=0.5)
    assert "JobTimeout" in pq.get_job(job.id).error


def test_burst_mode_exits_when_the_queues_are_empty_but_not_before(pq):
    pq.enqueue_many([(tasks.add, (i, i)) for i in range(20)])
    later = pq.enqueue(tasks.add, 1, 1, run_at="1h")
    assert drain(pq, concurrency=4) == 20
    assert pq.get_job(later.id).status == "queued"


def test_the_worker_registers_and_removes_its_row(pq, engine):
    with BackgroundWorker(pq, ["a", "b"], name="w1", concurrency=2) as worker:
        row = rows(engine, "SELECT name, queues, isolation, concurrency, pid FROM pq_worker")
        assert row == [("w1", ["a", "b"], "thread", 2, __import__("os").getpid())]
        assert worker.id.startswith("w1.") and len(worker.id) > len("w1.") + 8
    assert scalar(engine, "SELECT count(*) FROM pq_worker") == 0


def test_worker_identity_is_unique_per_start(pq):
    assert pq.worker(name="same").id != pq.worker(name="same").id


def test_connections_are_labelled_by_role(pq, engine):
    with BackgroundWorker(pq, ["default"], name="labels") as worker:
        def names():
            return {r[0].split(":")[1] for r in rows(
                engine, "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %(p)s",
                p=f"sqla_pq:%:{worker.id}")}

        wait_until(lambda: {"claim", "listen", "heartbeat", "maintenance"} <= names(), 10,
                   message=f"roles; saw {names()}")


def test_notify_wakes_an_idle_worker_without_polling(Session):
    pq = PQ(Session, worker_ttl=300)  # polling alone would take five minutes
    with BackgroundWorker(pq, ["default"]):
        time.sleep(0.5)
        job = pq.enqueue(tasks.add, 1, 1)
        assert pq.wait(job.id, timeout=10) == 2


def test_a_delayed_job_runs_when_due_without_polling(Session):
    pq = PQ(Session, worker_ttl=300)
    with BackgroundWorker(pq, ["default"]):
        job = pq.enqueue(tasks.add, 1, 1, run_at="1.5s")
        assert pq.wait(job.id, timeout=10) == 2
        started = pq.get_job(job.id)
        assert started.started_at >= started.run_at


def test_stop_one_worker_from_the_database(pq):
    bg = BackgroundWorker(pq, ["default"], name="stoppable")
    with bg:
        assert pq.stop_worker("stoppable")
        bg.thread.join(10)
        assert not bg.thread.is_alive(), "the worker ignored its stop flag"


def test_transitions_are_compare_and_set_on_the_attempt(pq, engine):
    """A stale outcome (from an attempt that no longer holds the job) changes nothing."""
    from sqla_pq.execution.call import Outcome
    from sqla_pq.link import Link
    from sqla_pq.record import record_outcomes

    job = pq.enqueue(tasks.add, 1, 1)
    with engine.begin() as c:  # attempt 2 now holds the job
        c.exec_driver_sql("UPDATE pq_job SET status = 'running', attempts = 2 WHERE id = %(i)s", {"i": job.id})
    link = Link(engine, "test")
    stale = record_outcomes(link, [Outcome(job.id, 1, "succeeded", result_json="3"),
                                   Outcome(job.id, 1, "failed", error="x")], failure_ttl=10)
    link.close()
    assert sorted(stale.stale) == [job.id, job.id]
    assert pq.get_job(job.id).status == "running"


def test_jobs_claimed_with_completions_run_even_if_a_later_write_of_that_flush_fails(
        pq, engine, monkeypatch):
    """Complete-and-claim commits the next batch with the successes; a statement after it
    failing (a dropped connection) must not leave that batch claimed and never run."""
    import sqla_pq.worker as worker_module

    real = worker_module.record_outcomes
    failed = []

    def once_failing(runner, outcomes, *, failure_ttl, completed=None):
        if completed is not None and not failed:
            failed.append(True)
            raise RuntimeError("injected: the connection dropped after the claim committed")
        return real(runner, outcomes, failure_ttl=failure_ttl, completed=completed)

    monkeypatch.setattr(worker_module, "record_outcomes", once_failing)
    ids = [pq.enqueue(tasks.add, i, i).id for i in range(3)]
    # no maintenance: no rescuer would ever give a dropped claim back
    with BackgroundWorker(pq, ["default"], concurrency=1, maintenance=False):
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM pq_job WHERE status = 'succeeded'")
                   == 3, 15, message="all three jobs to succeed")
    assert failed, "the injected failure did not happen: the test did not test anything"
    assert [pq.get_job(i).result for i in ids] == [0, 2, 4]


def test_after_a_stop_from_the_database_the_first_sigterm_is_still_a_warm_stop(pq):
    import signal

    worker = pq.worker(["default"], install_signals=False)
    worker.request_stop("stop requested from the database")
    worker._on_signal(signal.SIGTERM, None)
    assert worker._stopping and not worker._abort, "one SIGTERM aborted the jobs in hand"
    worker._on_signal(signal.SIGTERM, None)
    assert worker._abort, "a second signal aborts"


def test_completions_lock_their_rows_in_id_order_as_the_heartbeat_does():
    """Two statements locking the same rows in different orders can deadlock."""
    from sqla_pq.execution.call import Outcome
    from sqla_pq.record import complete_params

    params = complete_params([Outcome(9, 1, "succeeded", result_json="9"),
                              Outcome(2, 3, "succeeded", result_json="2")])
    assert params["ids"] == [2, 9] and params["attempt_list"] == [3, 1]
    assert params["results"] == ["2", "9"]
