"""Job leases: a worker renews only the leases it still holds, stops a job whose lease it lost
(never running it alongside the rescued attempt), and gives it back rather than failing it."""

from __future__ import annotations

import threading
import time

import pytest

from sqla_pq import PQ, queries
from sqla_pq.execution.call import ClaimedJob
from sqla_pq.execution.fork import ForkExecutor
from tests import tasks
from tests.helpers import BackgroundWorker, rows, scalar, wait_until


def _expire_lease(engine, job_id: int) -> None:
    """What a frozen worker finds when it resumes: the lease ran out meanwhile."""
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET lease_until = now() - interval '1 second' "
                          "WHERE id = %(i)s", {"i": job_id})


def test_a_thread_job_whose_lease_expired_is_stopped_and_given_back_not_failed(pq, engine):
    job = pq.enqueue_call(tasks.busy_loop, args=(30,), max_interruptions=1)  # given back once: then failed
    with BackgroundWorker(pq, ["default"], maintenance=False):  # no rescuer: the worker acts alone
        wait_until(lambda: pq.get_job(job.id).status == "running", 10, message="the job to start")
        _expire_lease(engine, job.id)
        stopped = wait_until(lambda: pq.get_job(job.id).status == "failed" or None, 10,
                             message="the worker to stop the job")
    done = pq.get_job(job.id)
    assert stopped and "LeaseLost" in done.error and done.interruptions == 1
    assert done.failures == 0, "losing a lease is not the task's failure"


def test_a_fork_job_whose_lease_expired_is_killed_and_given_back(pq, engine, url_str):
    job = pq.enqueue_call(tasks.record, args=(url_str, "long", 30.0), max_interruptions=1)
    with BackgroundWorker(pq, ["default"], isolation="fork", maintenance=False):
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM test_ledger") == 1, 15,
                   message="the child to start")
        _expire_lease(engine, job.id)
        wait_until(lambda: pq.get_job(job.id).status == "failed", 10,
                   message="the job to be given back (and failed: max_interruptions=1)")
    done = pq.get_job(job.id)
    assert rows(engine, "SELECT finished_at FROM test_ledger") == [(None,)], "the stale attempt ran on"
    assert "LeaseLost" in done.error and done.interruptions == 1 and done.failures == 0


def test_a_live_lease_is_renewed_and_a_missing_worker_row_is_written_again(pq, engine):
    job = pq.enqueue(tasks.sleep, 3.0)
    with BackgroundWorker(pq, ["default"], maintenance=False) as worker:
        wait_until(lambda: pq.get_job(job.id).status == "running", 10, message="the job to start")
        first = scalar(engine, "SELECT lease_until FROM pq_job WHERE id = %(i)s", i=job.id)
        with engine.begin() as c:
            c.exec_driver_sql("DELETE FROM pq_worker")
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM pq_worker WHERE id = %(w)s",
                                  w=worker.id) == 1, 10, message="the row to come back")
        later = scalar(engine, "SELECT lease_until FROM pq_job WHERE id = %(i)s", i=job.id)
        assert pq.wait(job.id, timeout=15) == 3.0
    done = pq.get_job(job.id)
    assert later > first, "the heartbeat did not renew the job's lease"
    assert done.attempts == 1 and done.interruptions == 0, "a live lease was treated as lost"


@pytest.mark.parametrize("isolation", ["thread", "fork"])
def test_a_heartbeat_of_an_earlier_attempt_does_not_stop_the_same_jobs_next_attempt(Session, isolation):
    # A multi-step job goes back to the queue after each task and this worker claims it again
    # at once.  A heartbeat that read the held attempts just before renews nothing for the
    # old attempt: that is no loss of the new one.  Here every heartbeat's statement goes out
    # 50 ms after it read them, while steps take 20 ms, so each one meets the race.
    pq = PQ(Session, heartbeat=0.01, lease=2)
    pq.define_job("many_ticks", tasks=["tests.tasks.tick"] * 20)
    job = pq.create_job("many_ticks", workspace={})
    with BackgroundWorker(pq, ["default"], isolation=isolation, maintenance=False) as worker:
        read_held = worker.held

        def late_held() -> dict[int, int]:
            held = read_held()
            time.sleep(0.05)
            return held

        worker.held = late_held
        wait_until(lambda: pq.get_job(job.id).status in ("succeeded", "failed"), 60,
                   message="the 20 steps to run")
    done = pq.get_job(job.id)
    assert done.status == "succeeded" and done.workspace["ticks"] == 20
    assert (done.interruptions, done.attempts) == (0, 20), "a live attempt was stopped as lost"


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "worker-forks"])
def test_a_fork_child_whose_lease_is_never_renewed_stops_itself_and_is_given_back(pq, fork_server):
    """The parent may be frozen: the fork server (or, when the worker forked the child, the
    child's own watchdog) stops the job before the lease ends, and the parent, when it looks,
    reports a lost lease (a give-back), not a crash."""
    job = pq.enqueue(tasks.sleep, 30.0)
    with pq._cursor() as runner:
        row = runner.run(queries.job_claim(("default",)), {"batch": 1, "worker": "w", "lease": 30.0})[0]
    claimed = ClaimedJob.from_tuple(row)
    assert claimed.id == job.id
    claimed.extra["lease_ok_at"] = time.monotonic()
    executor = ForkExecutor(1, pq.execution_context(), lambda: None, lease_guard=0.5,
                            fork_server=fork_server)
    executor.submit(claimed)
    t0 = time.monotonic()
    outcomes = []
    while not outcomes and time.monotonic() - t0 < 10:
        for child in list(executor.children.values()):
            executor.on_readable(child.fd)
        executor.check_deadlines(time.monotonic())
        outcomes = executor.collect()
        time.sleep(0.05)
    executor.shutdown()
    assert [o.kind for o in outcomes] == ["fenced"]
    assert time.monotonic() - t0 < 5


def test_an_async_job_past_its_timeout_sees_its_cancellation_at_the_timeout(pq, tmp_path):
    marks = [tmp_path / f"{i}" for i in range(2)]
    jobs = [pq.enqueue(tasks.async_note_cancel, str(m), 30, timeout=0.5) for m in marks]
    t0 = time.monotonic()
    from sqla_pq.testing import drain

    drain(pq)
    assert time.monotonic() - t0 < 5
    for job, mark in zip(jobs, marks):
        assert "JobTimeout" in pq.get_job(job.id).error
        assert mark.read_text() == "cancelled", "the coroutine never saw its cancellation"


def test_a_listen_connection_that_hangs_does_not_stop_the_worker(Session, monkeypatch):
    from sqla_pq import notify, worker

    release = threading.Event()
    real_open = notify.Listener.open

    def hanging_open(self):  # a LISTEN path that accepts TCP and never answers
        release.wait(60)
        return real_open(self)

    monkeypatch.setattr(notify.Listener, "open", hanging_open)
    monkeypatch.setattr(worker, "LISTEN_START_WAIT", 0.1)
    pq = PQ(Session, worker_ttl=1)
    try:
        with BackgroundWorker(pq, ["default"]) as w:
            time.sleep(0.3)
            job = pq.enqueue(tasks.add, 1, 1)
            assert pq.wait(job.id, timeout=10) == 2, "polling stopped while the listener hung"
            assert not w.listener.connected
            release.set()
            wait_until(lambda: w.listener.connected, 10, message="the listener to connect at last")
    finally:
        release.set()


def test_behind_a_transaction_pooler_workers_leave_no_session_state(Session, engine):
    pq = PQ(Session, transaction_pooler=True)
    job = pq.enqueue(tasks.add, 2, 2)
    with BackgroundWorker(pq, ["default"]) as w:
        assert pq.wait(job.id, timeout=10) == 4
        time.sleep(1.0)  # heartbeats and maintenance passes
        labelled = scalar(engine, "SELECT count(*) FROM pg_stat_activity WHERE application_name "
                                  "LIKE %(p)s", p=f"%{w.id}%")
        prepared = w.link.run(queries.now(), prepare=False) and w.link.execute(
            __import__("sqlalchemy").text("SELECT count(*) FROM pg_prepared_statements")).scalar()
    assert labelled == 0 and prepared == 0
