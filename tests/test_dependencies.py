"""depends_on: a job waits (deferred) for its parents; a failed parent cancels or fails it."""

from __future__ import annotations

from sqla_pq.testing import drain
from tests import tasks


def test_a_chain_runs_in_order(pq, engine):
    a = pq.enqueue(tasks.add, 1, 1)
    b = pq.enqueue(tasks.add, 2, 2, depends_on=a)
    c = pq.enqueue(tasks.add, 3, 3, depends_on=b.id)
    assert (b.status, c.status) == ("deferred", "deferred")
    assert drain(pq) == 3
    jobs = [pq.get_job(j.id) for j in (a, b, c)]
    assert [j.status for j in jobs] == ["succeeded"] * 3
    assert jobs[0].finished_at <= jobs[1].started_at and jobs[1].finished_at <= jobs[2].started_at


def test_fan_in_runs_once_after_all_parents(pq):
    parents = [pq.enqueue(tasks.add, i, i) for i in range(4)]
    child = pq.enqueue(tasks.add, 0, 0, depends_on=parents)
    assert child.waiting_on == 4
    drain(pq, concurrency=4)
    done = pq.get_job(child.id)
    assert done.status == "succeeded" and done.attempts == 1
    assert done.started_at >= max(pq.get_job(p.id).finished_at for p in parents)


def test_a_failed_parent_cancels_or_fails_dependants_down_the_graph(pq):
    bad = pq.enqueue(tasks.fail)
    cancelled = pq.enqueue(tasks.add, 1, 1, depends_on=bad)
    failed = pq.queue().enqueue_call(tasks.add, args=(1, 1), depends_on=bad, on_parent_failure="fail")
    grandchild = pq.enqueue(tasks.add, 1, 1, depends_on=cancelled)
    drain(pq)
    assert pq.get_job(cancelled.id).status == "cancelled"
    assert f"dependency {bad.id} failed" in pq.get_job(cancelled.id).error
    assert pq.get_job(failed.id).status == "failed"
    assert pq.get_job(grandchild.id).status == "cancelled"


def test_depending_on_a_finished_job(pq):
    done = pq.enqueue(tasks.add, 1, 1)
    drain(pq)
    after = pq.enqueue(tasks.add, 2, 2, depends_on=done)
    assert after.status == "queued"
    failed = pq.enqueue(tasks.fail)
    drain(pq)
    doomed = pq.enqueue(tasks.add, 2, 2, depends_on=failed)
    assert doomed.status == "cancelled" and "failed" in doomed.error


def test_cancelling_a_parent_cancels_its_dependants(pq):
    parent = pq.enqueue(tasks.add, 1, 1, run_at="1h")
    child = pq.enqueue(tasks.add, 1, 1, depends_on=parent)
    pq.cancel(parent.id)
    assert pq.get_job(child.id).status == "cancelled"
