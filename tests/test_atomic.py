"""Opt-in transactional execution: the task's writes and its `succeeded` commit together."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from sqla_pq import current_session, queries
from sqla_pq.atomic import AtomicRunner
from sqla_pq.execution.call import ClaimedJob
from sqla_pq.record import record_outcomes
from sqla_pq.testing import drain
from tests.helpers import scalar


@pytest.fixture
def atomic_tasks(pq):
    @pq.task(name="tests.atomic.signup", atomic=True)
    def signup(email: str, fail: bool = False) -> int:
        session = current_session()
        session.execute(sa.text("INSERT INTO test_users (email) VALUES (:e)"), {"e": email})
        if fail:
            raise RuntimeError("after writing")
        return 1

    return signup


def _claim_one(pq) -> ClaimedJob:
    """Claim the queued job as a worker would, to run it through AtomicRunner by hand."""
    with pq._cursor() as r:
        rows = r.run(queries.job_claim(("default",)), {"batch": 1, "worker": "w", "lease": 30.0})
    return ClaimedJob.from_tuple(rows[0])


def test_writes_and_completion_commit_together(pq, engine, atomic_tasks):
    job = atomic_tasks.delay("a@b.c")
    drain(pq)
    assert pq.get_job(job.id).status == "succeeded"
    assert scalar(engine, "SELECT count(*) FROM test_users") == 1


def test_a_failing_atomic_task_leaves_no_write(pq, engine, atomic_tasks):
    job = atomic_tasks.delay("x@y.z", fail=True)
    drain(pq)
    assert pq.get_job(job.id).status == "failed"
    assert scalar(engine, "SELECT count(*) FROM test_users") == 0


def test_an_attempt_that_lost_its_job_rolls_its_writes_back(pq, engine, atomic_tasks):
    """The completion's compare-and-set fails (the job was rescued): nothing is committed."""
    job = atomic_tasks.delay("late@b.c")
    claimed = _claim_one(pq)
    with engine.begin() as c:  # the rescuer gave the job to attempt 2 meanwhile
        c.exec_driver_sql("UPDATE pq_job SET attempts = attempts + 1 WHERE id = %(i)s", {"i": job.id})

    def write() -> int:
        current_session().execute(sa.text("INSERT INTO test_users (email) VALUES ('late@b.c')"))
        return 1

    outcome = AtomicRunner(pq)(claimed, write)
    assert outcome.committed and "rolled back" in (outcome.error or "")
    assert scalar(engine, "SELECT count(*) FROM test_users") == 0
    assert pq.get_job(job.id).status == "running"
    with pq._cursor() as runner:  # what the worker then does with it: nothing, reported stale
        done = record_outcomes(runner, [outcome], failure_ttl=60)
    assert done.stale == [job.id] and done.succeeded == []


def test_current_session_outside_an_atomic_task_says_how_to_get_one():
    from sqla_pq.errors import PQError

    with pytest.raises(PQError, match="atomic=True"):
        current_session()


def test_an_atomic_task_in_fork_mode_runs_in_a_child_of_the_worker(pq, engine, atomic_tasks):
    """Its transaction needs the worker's PQ: the worker forks it, not the fork server."""
    job = atomic_tasks.delay("fork@b.c")
    processed = pq.run_worker(["default"], burst=True, isolation="fork", install_signals=False,
                              maintenance=False, fork_server=True)
    assert processed == 1
    assert pq.get_job(job.id).status == "succeeded"
    assert scalar(engine, "SELECT count(*) FROM test_users") == 1


def test_a_lost_connection_in_an_atomic_task_gives_the_job_back_instead_of_failing_it(
        pq, engine, atomic_tasks):
    """The task's writes and its completion were rolled back together; the database, not the
    task, failed: an interruption, not one of its max_retries."""
    job = atomic_tasks.delay("gone@b.c")
    claimed = _claim_one(pq)

    def write_then_lose_the_connection() -> int:
        session = current_session()
        session.execute(sa.text("INSERT INTO test_users (email) VALUES ('gone@b.c')"))
        session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return 1

    outcome = AtomicRunner(pq)(claimed, write_then_lose_the_connection)
    assert outcome.kind == "interrupted" and "connection was lost" in outcome.error
    assert (outcome.job_id, outcome.attempt) == (job.id, 1)
    assert scalar(engine, "SELECT count(*) FROM test_users") == 0


def test_a_statement_timeout_in_an_atomic_task_is_its_own_failure(pq, engine, atomic_tasks):
    """57014 (query_canceled) is in the "operator intervention" class a pool reconnects on, but
    the task's statement was too slow: a failure counted against max_retries, not an
    interruption."""
    atomic_tasks.delay("slow@b.c")
    claimed = _claim_one(pq)

    def too_slow() -> int:
        session = current_session()
        session.execute(sa.text("SET LOCAL statement_timeout = 50"))
        session.execute(sa.text("SELECT pg_sleep(1)"))
        return 1

    with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
        AtomicRunner(pq)(claimed, too_slow)
