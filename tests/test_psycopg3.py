"""An application whose engine uses psycopg 3 (``postgresql+psycopg://``, SQLAlchemy 2.1's
default for plain URLs): transactional enqueue in its sessions, workers that LISTEN through it
and wake on NOTIFY, fork isolation, pq's blocking message get, and its errors read as psycopg2's
(connection lost, schema missing, the serial race)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from sqla_pq import PQ, SchemaMissing
from sqla_pq.db import is_connection_error, sqlstate
from sqla_pq.testing import drain
from tests import tasks
from tests.helpers import BackgroundWorker, scalar, wait_until

psycopg = pytest.importorskip("psycopg")


def _psycopg3(url: sa.URL) -> sa.Engine:
    return sa.create_engine(url.set(drivername="postgresql+psycopg"))


@pytest.fixture
def engine3(db_url):
    engine = _psycopg3(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pq3(engine3):
    assert engine3.dialect.driver == "psycopg"
    return PQ(sessionmaker(engine3))


def test_a_job_enqueued_in_a_psycopg3_session_lives_and_dies_with_its_transaction(pq3, engine3):
    Session = pq3.session_factory
    with pytest.raises(RuntimeError), Session.begin() as session:
        pq3.queue(session=session).enqueue(tasks.add, 1, 1)
        raise RuntimeError("rolled back")
    assert scalar(engine3, "SELECT count(*) FROM pq_job") == 0
    with Session.begin() as session:
        job = pq3.queue(session=session).enqueue(tasks.add, 2, 3)
    assert drain(pq3) == 1
    assert pq3.get_job(job.id).return_value() == 5


def test_an_idle_worker_on_a_psycopg3_engine_wakes_on_notify(pq3):
    """The worker polls once a minute here: only the notification can start the job soon."""
    with BackgroundWorker(pq3, worker_ttl=60, maintenance=False) as worker:
        wait_until(lambda: worker.state == "idle" and worker.listener.connected, 15,
                   message="an idle, listening worker")
        job = pq3.enqueue(tasks.add, 20, 22)
        wait_until(lambda: pq3.get_job(job.id).status == "succeeded", 20,
                   message="the job woken by NOTIFY (the poll is a minute away)")
    assert pq3.get_job(job.id).return_value() == 42


def test_a_psycopg3_worker_whose_connections_are_killed_reconnects_and_wakes_again(pq3,
                                                                                     engine3):
    with BackgroundWorker(pq3, worker_ttl=60, maintenance=False) as worker:
        wait_until(lambda: worker.state == "idle" and worker.listener.connected, 15,
                   message="an idle, listening worker")
        with engine3.begin() as conn:
            killed = conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                "current_database() AND pid <> pg_backend_pid() AND application_name LIKE "
                "'sqla_pq:%%'").rowcount
        assert killed >= 2  # its claim and listen connections at least
        job = pq3.enqueue(tasks.add, 1, 2)
        wait_until(lambda: pq3.get_job(job.id).status == "succeeded", 20,
                   message="the job, after the worker reconnected (its poll is a minute away)")


def test_fork_workers_run_retries_and_crashes_on_psycopg3(pq3):
    flaky = pq3.enqueue(tasks.flaky, 2, max_retries=2)
    crashed = pq3.enqueue(tasks.hard_exit, 3)
    many = pq3.enqueue_many([(tasks.add, (i, i)) for i in range(5)])
    drain(pq3, isolation="fork", concurrency=2)
    assert pq3.get_job(flaky.id).status == "succeeded"
    assert pq3.get_job(crashed.id).status == "failed"
    assert [pq3.get_job(j.id).return_value() for j in many] == [0, 2, 4, 6, 8]


def test_a_blocking_message_get_on_psycopg3_returns_what_another_thread_puts(pq3, monkeypatch):
    monkeypatch.setattr("sqla_pq.messages.RECHECK", 60.0)  # only the notification wakes it
    queue = pq3["apples"]
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(queue.get(timeout=20)))
    reader.start()
    listening = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND query LIKE 'LISTEN%%'")
    wait_until(lambda: scalar(pq3.engine, listening) == 1, 10, message="the get to block")
    queue.put({"kind": "golden"})
    reader.join(25)
    assert not reader.is_alive()
    assert got and got[0] is not None and got[0].data == {"kind": "golden"}


def test_psycopg3_errors_read_like_psycopg2s(engine3, empty_db_url):
    with pytest.raises(sa.exc.DBAPIError) as lost:
        with engine3.connect() as conn:
            conn.exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
    assert sqlstate(lost.value.orig) == "57P01" and is_connection_error(lost.value)

    from sqla_pq.worker import _serial_race

    pq3 = PQ(engine3)
    jobs = [pq3.queue("one", serial=True).enqueue(tasks.add, i, i) for i in range(2)]
    with pytest.raises(sa.exc.IntegrityError) as race:
        with engine3.begin() as conn:
            conn.exec_driver_sql("UPDATE pq_job SET status = 'running' WHERE id = ANY(%(ids)s)",
                                 {"ids": [j.id for j in jobs]})
    assert _serial_race(race.value), "a second running job of a serial queue: retried, not fatal"

    bare = PQ(_psycopg3(empty_db_url))
    try:
        with pytest.raises(SchemaMissing, match="sqla-pq migrate"):
            bare.enqueue(tasks.add, 1, 1)
    finally:
        bare.engine.dispose()


def test_a_connection_class_without_sqlstate_is_a_connection_error_subclasses_included():
    from psycopg import errors

    assert is_connection_error(sa.exc.OperationalError("SELECT 1", {}, errors.ConnectionTimeout()))
    assert not is_connection_error(sa.exc.ProgrammingError("SELECT 1", {}, errors.SyntaxError()))
