"""Maintenance loops: each pass is a run_once() that tests call directly."""

from __future__ import annotations

from sqla_pq.link import Link
from sqla_pq.maintenance import DependencySweeper, Pruner, Rescuer
from sqla_pq.testing import drain
from tests import tasks
from tests.helpers import scalar


def _link(engine):
    return Link(engine, "test")


def test_the_pruner_deletes_expired_jobs_and_nothing_else(pq, engine):
    done = pq.enqueue_many([(tasks.add, (1, 1))] * 5, result_ttl=1)
    keep = pq.enqueue(tasks.add, 1, 1, result_ttl=-1)
    waiting = pq.enqueue(tasks.add, 1, 1, run_at="1h")
    drain(pq)
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET expires_at = now() - interval '1 second' "
                          "WHERE expires_at IS NOT NULL")
    link = _link(engine)
    assert Pruner(0, batch=2).run_once(link) == {"deleted": 5}
    link.close()
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 2
    assert {keep.id, waiting.id} == {r for (r,) in engine.connect().exec_driver_sql("SELECT id FROM pq_job")}
    assert done


def test_the_rescuer_requeues_jobs_whose_lease_expired_and_counts_an_interruption(pq, engine):
    job = pq.enqueue(tasks.add, 1, 1)
    held = pq.enqueue(tasks.add, 2, 2, max_retries=0)
    orphan_row = pq.enqueue(tasks.add, 3, 3)
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO pq_worker (id, name, hostname, pid, isolation, expires_at) "
                          "VALUES ('alive', 'a', 'h', 1, 'fork', now() + interval '1 hour'), "
                          "('dead', 'd', 'h', 2, 'fork', now() - interval '1 second')")
        c.exec_driver_sql("UPDATE pq_job SET status = 'running', attempts = 1, worker_id = 'dead', "
                          "lease_until = now() - interval '1 second' WHERE id = %(i)s", {"i": job.id})
        c.exec_driver_sql("UPDATE pq_job SET status = 'running', attempts = 1, worker_id = 'alive', "
                          "lease_until = now() + interval '1 hour' WHERE id = %(i)s", {"i": held.id})
        # a worker whose row was deleted by hand still holds a live lease on its job
        c.exec_driver_sql("UPDATE pq_job SET status = 'running', attempts = 1, worker_id = 'nobody', "
                          "lease_until = now() + interval '1 hour' WHERE id = %(i)s",
                          {"i": orphan_row.id})
    link = _link(engine)
    assert Rescuer(0, 60, forget_after=0).run_once(link) == {"requeued": 1, "failed": 0}
    link.close()
    rescued = pq.get_job(job.id)
    assert rescued.status == "queued" and rescued.interruptions == 1 and "WorkerLost" in rescued.error
    assert pq.get_job(held.id).status == "running", "a job with a live lease was taken"
    assert pq.get_job(orphan_row.id).status == "running", "a live lease was ignored for a missing row"
    assert scalar(engine, "SELECT count(*) FROM pq_worker WHERE id = 'dead'") == 0


def test_the_rescuer_skips_a_job_whose_outcome_is_being_written(pq, engine):
    """A stale job locked by its worker's completion is left for the next sweep: no wait, no
    deadlock, and the completion wins."""
    job = pq.enqueue(tasks.add, 1, 1)
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET status = 'running', attempts = 1, worker_id = 'w', "
                          "lease_until = now() - interval '1 second' WHERE id = %(i)s", {"i": job.id})
    with engine.connect() as holder:
        holder.exec_driver_sql("SELECT 1 FROM pq_job WHERE id = %(i)s FOR UPDATE", {"i": job.id})
        link = _link(engine)
        assert Rescuer(0, 60, forget_after=0).run_once(link) == {"requeued": 0, "failed": 0}
        holder.rollback()
    assert Rescuer(0, 60, forget_after=0).run_once(link) == {"requeued": 1, "failed": 0}
    link.close()


def test_only_one_worker_runs_a_pass_at_a_time(engine):
    holder = _link(engine)
    other = _link(engine)
    service = Pruner(0)
    with holder.transaction():
        from sqla_pq import queries

        assert holder.run(queries.maintenance_try_lock(), {"key": service.lock_key})[0][0]
        assert service.run_locked(other) is None, "two workers ran the same pass"
    assert service.run_locked(other) == {"deleted": 0}
    holder.close()
    other.close()


def test_the_sweeper_releases_dependants_a_crash_left_waiting(pq, engine):
    parent = pq.enqueue(tasks.add, 1, 1)
    child = pq.enqueue(tasks.add, 2, 2, depends_on=parent)
    with engine.begin() as c:  # the parent finished but its release step never ran
        c.exec_driver_sql("UPDATE pq_job SET status = 'succeeded' WHERE id = %(i)s", {"i": parent.id})
    assert pq.get_job(child.id).status == "deferred"
    link = _link(engine)
    assert DependencySweeper(0, 60).run_once(link) == {"released": 1, "cancelled": 0}
    link.close()
    assert pq.get_job(child.id).status == "queued"
