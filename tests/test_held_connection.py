"""PQ's own one-statement transactions share one held connection of the engine's pool: back to
back they skip the pool, and the connection goes back when idle, disposed, broken or forked."""

from __future__ import annotations

import os
import threading

import pytest
import sqlalchemy as sa

from sqla_pq import PQ
from sqla_pq.held_connection import held_for
from tests import tasks
from tests.helpers import scalar, wait_until


def _backend_pid(pq: PQ) -> int:
    return pq._run(sa.select(sa.func.pg_backend_pid()))[0][0]


def _wait_closed(db_url: sa.URL, backend: int) -> None:
    """Wait until the server has no session ``backend`` (asked on a connection of its own)."""
    probe = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        wait_until(lambda: scalar(probe, "SELECT count(*) FROM pg_stat_activity WHERE pid = %(p)s",
                                  p=backend) == 0, 5, message="the held connection to close")
    finally:
        probe.dispose()


def test_back_to_back_calls_run_on_one_connection_kept_out_of_the_pool(pq):
    first = pq.enqueue(tasks.add, 1, 2)
    pid = _backend_pid(pq)
    for i in range(5):
        pq.enqueue(tasks.add, i, i)
        pq.get_job(first.id)
    assert _backend_pid(pq) == pid
    assert pq.engine.pool.checkedout() == 1, "the held connection should stay checked out"


def test_the_held_connection_goes_back_to_the_pool_after_its_idle_time(engine):
    pq = PQ(engine, hold_connection=0.3)
    pq.enqueue(tasks.add, 1, 2)
    assert engine.pool.checkedout() == 1
    wait_until(lambda: engine.pool.checkedout() == 0, 5,
               message="the idle held connection to go back to the pool")
    job = pq.enqueue(tasks.add, 2, 3)  # and the next call checks one out again
    assert pq.get_job(job.id).args == [2, 3]


def test_hold_connection_0_checks_a_connection_out_for_every_statement(engine):
    pq = PQ(engine, hold_connection=0)
    pq.enqueue(tasks.add, 1, 2)
    assert engine.pool.checkedout() == 0
    assert held_for(engine, 0) is None


def test_a_null_pool_engine_holds_nothing(db_url):
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        pq = PQ(engine)
        job = pq.enqueue(tasks.add, 1, 2)
        assert held_for(engine, 5.0) is None and pq._held_connection() is None
        assert pq.get_job(job.id).args == [1, 2]
    finally:
        engine.dispose()


def test_disposing_the_engine_closes_the_held_connection(engine, db_url):
    pq = PQ(engine)
    pq.enqueue(tasks.add, 1, 2)
    pid = _backend_pid(pq)
    engine.dispose()
    _wait_closed(db_url, pid)
    assert pq.get_job(pq.enqueue(tasks.add, 2, 2).id).args == [2, 2]


def test_pq_close_gives_the_connection_back(engine):
    pq = PQ(engine)
    pq.enqueue(tasks.add, 1, 2)
    assert engine.pool.checkedout() == 1
    pq.close()
    assert engine.pool.checkedout() == 0


def test_a_killed_held_connection_is_replaced_and_the_job_is_written_once(pq, engine):
    pq.enqueue(tasks.add, 1, 2)
    pid = _backend_pid(pq)
    with engine.connect() as c:
        c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    wait_until(lambda: scalar(engine, "SELECT count(*) FROM pg_stat_activity WHERE pid = %(p)s",
                              p=pid) == 0, 5, message="the backend to end")
    job = pq.enqueue(tasks.add, 5, 5)
    assert _backend_pid(pq) != pid
    assert scalar(engine, "SELECT count(*) FROM pq_job WHERE id = %(i)s", i=job.id) == 1
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 2


def test_a_refused_statement_keeps_the_connection_usable(pq):
    pq.enqueue(tasks.add, 1, 2)
    pid = _backend_pid(pq)
    with pytest.raises(Exception, match="division by zero"):
        pq._run(sa.select(sa.literal(1) / sa.literal(0)))
    assert _backend_pid(pq) == pid, "a division by zero should not cost the connection"
    assert pq.enqueue(tasks.add, 2, 2).id


def test_threads_that_find_it_busy_use_the_pool_and_every_job_is_written(pq, engine):
    errors: list[BaseException] = []

    def enqueue_many(offset: int) -> None:
        try:
            for i in range(50):
                pq.enqueue(tasks.add, offset, i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=enqueue_many, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert scalar(engine, "SELECT count(DISTINCT args::text) FROM pq_job") == 200


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_child_neither_uses_nor_closes_its_parents_held_connection(pq, engine):
    pq.enqueue(tasks.add, 1, 2)
    pid = _backend_pid(pq)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = 0 if _backend_pid(pq) != pid and pq.enqueue(tasks.add, 9, 9).id else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child used its parent's connection"
    assert _backend_pid(pq) == pid, "the child's exit ended the parent's session"
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 2


def test_an_engine_that_is_dropped_is_not_kept_alive_by_its_held_connection(db_url):
    import gc
    import weakref

    from sqla_pq.db import create_engine

    engine = create_engine(db_url)
    pq = PQ(engine)
    pq.enqueue(tasks.add, 1, 2)
    gone = weakref.ref(engine)
    engine.dispose()
    del pq, engine
    gc.collect()
    assert gone() is None, "the registry of held connections leaks engines"


def test_a_process_whose_fork_hook_did_not_run_leaves_the_inherited_connection_alone(pq, engine):
    """uWSGI forks without running Python's at-fork hooks: the pid it was checked out by
    tells the child the held connection is its parent's."""
    pq.enqueue(tasks.add, 1, 2)
    parent_backend = _backend_pid(pq)
    held = pq._held_connection()
    held._pid = -1  # as a child that inherited it sees it
    assert _backend_pid(pq) != parent_backend, "a child used its parent's connection"
    assert scalar(engine, "SELECT count(*) FROM pg_stat_activity WHERE pid = %(p)s",
                  p=parent_backend) == 1, "the inherited connection was closed"


def test_a_dispose_while_a_statement_runs_closes_the_connection_when_it_ends(pq, engine, db_url):
    pq.enqueue(tasks.add, 1, 2)
    backend = _backend_pid(pq)
    sleeping = threading.Thread(target=pq._run, args=(sa.select(sa.func.pg_sleep(0.6)),))
    sleeping.start()
    wait_until(lambda: pq._held_connection()._lock.locked(), 5, interval=0.01,
               message="the statement to start on the held connection")
    engine.dispose()  # waits DISCARD_WAIT, then leaves it to the sleeping thread
    sleeping.join()
    _wait_closed(db_url, backend)
