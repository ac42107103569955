"""An idle worker sleeps: jobs it may not take (a paused queue's, other priorities', a busy
serial queue's, one locked by another transaction) do not make it claim again and again."""

from __future__ import annotations

import time

from sqla_pq import Priority
from tests import tasks
from tests.helpers import BackgroundWorker, wait_until

IDLE_SECONDS = 1.5


def _claims_while_idle(pq, queues, **options) -> int:
    bg = BackgroundWorker(pq, queues, maintenance=False, **options)
    worker = bg.worker
    calls = []
    claim_batch = worker._claim_batch

    def counted() -> None:
        calls.append(time.monotonic())
        claim_batch()

    worker._claim_batch = counted
    with bg:
        wait_until(lambda: worker.state == "idle" and calls, 15, message="the first claim")
        start = len(calls)
        time.sleep(IDLE_SECONDS)
        return len(calls) - start


def test_a_paused_queues_backlog_leaves_an_idle_worker_asleep(pq):
    pq.enqueue_many([(tasks.add, (i, i)) for i in range(5)], queue="held")
    pq.pause_queue("held")
    # a busy loop claims hundreds of times in this time; a sleeping worker not at all
    assert _claims_while_idle(pq, None) <= 1
    assert _claims_while_idle(pq, ["held", "default"]) <= 1


def test_other_priorities_leave_a_dedicated_worker_asleep(pq):
    pq.enqueue(tasks.add, 1, 1, priority=Priority.LOW)
    assert _claims_while_idle(pq, ["default"], priorities={Priority.CRITICAL}) <= 1


def test_a_busy_serial_queue_leaves_a_spare_worker_asleep(pq):
    q = pq.queue("one-at-a-time", serial=True)
    q.enqueue(tasks.sleep, 30)
    q.enqueue(tasks.add, 1, 1)
    with BackgroundWorker(pq, ["one-at-a-time"], maintenance=False) as busy:
        wait_until(lambda: busy.state == "busy", 15, message="the serial job to start")
        try:
            assert _claims_while_idle(pq, ["one-at-a-time"]) <= 1
        finally:
            busy.abort()  # the sleeping job goes back to the queue


def test_a_job_locked_by_another_transaction_is_looked_at_less_and_less_often(pq, engine):
    job = pq.enqueue(tasks.add, 1, 1)
    with engine.begin() as c:  # an application holding the row: due, yet not claimable
        c.exec_driver_sql("SELECT id FROM pq_job WHERE id = %(i)s FOR UPDATE", {"i": job.id})
        claims = _claims_while_idle(pq, ["default"])
    # backing off from 10 ms to 1 s: about 8 looks in 1.5 s, where a busy loop makes hundreds
    assert 2 <= claims <= 20


def _hold_serial_job(pq, queue: str, lease: float = 30.0):
    """A serial queue's job claimed by a worker that is not there; a second one waiting."""
    from sqla_pq import queries

    q = pq.queue(queue, serial=True)
    first = q.enqueue_call(tasks.add, args=(1, 1), max_interruptions=0)
    second = q.enqueue(tasks.add, 2, 2)
    with pq._cursor() as r:
        r.run(queries.job_claim((queue,)), {"batch": 5, "worker": "gone", "lease": lease})
    return first, second


def test_deleting_a_running_serial_job_wakes_the_idle_workers(pq):
    first, second = _hold_serial_job(pq, "s-delete")
    with BackgroundWorker(pq, ["s-delete"], maintenance=False):
        time.sleep(0.3)  # it looked, and left the busy serial queue out
        assert pq.get_job(second.id).status == "queued"
        pq.delete(first)
        # the tests' worker_ttl is 30 s: only a NOTIFY brings the worker back this soon
        assert pq.wait(second, timeout=10) == 4


def test_the_rescuer_failing_a_serial_job_wakes_the_idle_workers(pq):
    first, second = _hold_serial_job(pq, "s-rescue", lease=2.0)
    with BackgroundWorker(pq, ["s-rescue"]):  # its rescuer fails the job (max_interruptions=0)
        time.sleep(0.3)  # it looked, and left the busy serial queue out; the lease still runs
        assert pq.get_job(second.id).status == "queued"
        assert pq.wait(second, timeout=10) == 4
    assert pq.get_job(first).status == "failed"


def test_a_worker_whose_listener_cannot_connect_sleeps_between_looks(pq, monkeypatch):
    """It polls and retries LISTEN with backoff; its health check waits for a connection (it
    used to come due at once, every turn: a busy loop for as long as the listener was down)."""
    import psycopg2

    bg = BackgroundWorker(pq, maintenance=False)
    worker = bg.worker

    def refuse(self) -> None:  # noqa: ANN001
        raise psycopg2.OperationalError("could not connect: the listener's server is away")

    monkeypatch.setattr("sqla_pq.notify.Listener.open", refuse)
    turns = []
    sleep = worker._sleep

    def counted(timeout: float) -> None:
        turns.append(timeout)
        sleep(timeout)

    worker._sleep = counted
    with bg:
        wait_until(lambda: worker.state == "idle", 15, message="the worker to start")
        start = len(turns)
        time.sleep(IDLE_SECONDS)
        spent = len(turns) - start
        assert not worker.listener.connected
    assert spent <= 20, f"{spent} loop turns in {IDLE_SECONDS}s while the listener was down"
