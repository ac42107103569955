"""Transactional enqueue: a job commits or rolls back with the caller's transaction, and the
NOTIFY that wakes workers is delivered only on commit."""

from __future__ import annotations

import datetime as dt
import select
import time

import psycopg2
import pytest
import sqlalchemy as sa

from sqla_pq import DuplicateClientId, JobNotFound, Priority
from sqla_pq.db import psycopg2_dsn
from sqla_pq.testing import assert_enqueued, work_one
from tests import tasks
from tests.helpers import rows, scalar


def test_a_job_enqueued_in_a_session_that_rolls_back_never_exists(pq, Session, engine):
    with Session() as session:
        session.begin()
        session.execute(sa.text("INSERT INTO test_users (email) VALUES ('a@b.c')"))
        job = pq.queue("emails", session=session).enqueue(tasks.add, 1, 2)
        assert_enqueued(session, task=tasks.add, args=[1, 2])  # visible inside the transaction
        session.rollback()
    with pytest.raises(JobNotFound):
        pq.get_job(job.id)
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 0
    assert scalar(engine, "SELECT count(*) FROM test_users") == 0


def test_a_job_enqueued_in_a_session_that_commits_is_claimed_and_run(pq, Session):
    with Session.begin() as session:
        session.execute(sa.text("INSERT INTO test_users (email) VALUES ('a@b.c')"))
        job = pq.queue("emails", session=session).enqueue(tasks.add, 1, 2)
    assert work_one(pq, ["emails"]) is True
    done = pq.get_job(job.id)
    assert done.status == "succeeded" and done.return_value() == 3


def test_enqueue_in_a_session_neither_commits_nor_flushes_other_objects(pq, Session):
    from sqla_pq.models import QueueSettings

    with Session() as session:
        session.begin()
        pending = QueueSettings(name="not-flushed")
        session.add(pending)
        pq.queue("q", session=session).enqueue(tasks.add, 1, 2)
        assert pending in session.new, "the enqueue flushed the caller's pending objects"
        assert session.in_transaction()
        session.rollback()


def _listener(db_url):
    conn = psycopg2.connect(**psycopg2_dsn(db_url))
    conn.autocommit = True
    conn.cursor().execute("LISTEN sqla_pq")
    return conn


def _notifications(conn, wait: float = 0.3) -> list[str]:
    end = time.monotonic() + wait
    got = []
    while time.monotonic() < end:
        select.select([conn], [], [], max(0.0, end - time.monotonic()))
        conn.poll()
        while conn.notifies:
            got.append(conn.notifies.pop(0).payload)
    return got


def test_notify_is_delivered_only_on_commit_one_per_queue(pq, Session, db_url):
    listener = _listener(db_url)
    try:
        with Session() as session:
            session.begin()
            q = pq.queue("emails", session=session)
            q.enqueue(tasks.add, 1, 2)
            q.enqueue(tasks.add, 3, 4)
            q.enqueue_many([(tasks.add, (i, i)) for i in range(50)])
            pq.queue("other", session=session).enqueue(tasks.add, 1, 1)
            assert _notifications(listener) == [], "a NOTIFY escaped before commit"
            session.commit()
        assert sorted(_notifications(listener)) == ["emails", "other"]

        with Session() as session:
            session.begin()
            pq.queue("emails", session=session).enqueue(tasks.add, 1, 2)
            session.rollback()
        assert _notifications(listener) == [], "a rolled-back enqueue woke workers"
    finally:
        listener.close()


def test_enqueue_many_inserts_10000_jobs_in_one_round_trip(pq, engine, monkeypatch):
    from sqla_pq import db

    statements: list[str] = []
    real = db.run_raw

    def counting(cursor, raw, params=None):
        statements.append(raw.sql.split()[0])
        return real(cursor, raw, params)

    monkeypatch.setattr("sqla_pq.pq.run_raw", counting)
    jobs = pq.enqueue_many([(tasks.add, (i, i)) for i in range(10_000)], queue="bulk")
    assert statements == ["INSERT"], statements
    assert len(jobs) == 10_000 and len(set(jobs.ids)) == 10_000
    assert jobs.ids == sorted(jobs.ids), "ids follow the input order"
    assert jobs[1234].args == [1234, 1234]
    assert scalar(engine, "SELECT count(*) FROM pq_job WHERE queue = 'bulk'") == 10_000


def test_enqueue_many_in_a_session_is_one_statement_in_that_transaction(pq, Session):
    seen: list[str] = []
    with Session() as session:
        session.begin()
        sa.event.listen(session.get_bind(), "before_cursor_execute",
                        lambda *a: seen.append(a[2].split()[0]))
        try:
            jobs = pq.queue("bulk", session=session).enqueue_many(
                [(tasks.add, (i, i)) for i in range(3000)], priority=Priority.HIGH)
        finally:
            sa.event.remove(session.get_bind(), "before_cursor_execute", seen.append) if False else None
        assert seen.count("INSERT") == 1 and len(jobs) == 3000
        session.rollback()
    assert pq.queue_depths() == {}


def test_reserved_options_configure_the_job(pq, engine):
    job = pq.queue("opts").enqueue(
        tasks.echo, "x", key="value", run_at="1h", priority=Priority.CRITICAL, timeout=60,
        result_ttl=3600, max_retries=3, retry_in="10s", client_id="welcome-42",
        expected_at="2h",
    )
    stored = pq.get_job(job.id)
    assert stored.kwargs == {"key": "value"} and stored.args == ["x"]
    assert stored.priority == 100 and stored.timeout == 60 and stored.result_ttl == 3600
    assert stored.max_retries == 3 and stored.retry_policy["delay"] == 10
    assert stored.client_id == "welcome-42"
    db_now = scalar(engine, "SELECT now()")
    assert dt.timedelta(minutes=59) < stored.run_at - db_now < dt.timedelta(minutes=61), \
        "run_at='1h' counts from the database's clock"
    assert stored.expected_at is not None
    absolute = dt.datetime(2031, 5, 1, 12, 0, tzinfo=dt.UTC)
    assert pq.enqueue(tasks.add, 1, 2, run_at=absolute).run_at == absolute
    assert pq.enqueue(tasks.add, 1, 2, run_at=dt.timedelta(seconds=30)).run_at > db_now


def test_enqueue_call_keeps_task_kwargs_apart_from_options(pq):
    job = pq.queue().enqueue_call(tasks.echo, args=(1,), kwargs={"timeout": "a task kwarg"},
                                  timeout=5)
    assert job.kwargs == {"timeout": "a task kwarg"} and job.timeout == 5


def test_a_duplicate_client_id_raises_and_leaves_the_transaction_usable(pq, Session):
    pq.enqueue(tasks.add, 1, 2, client_id="once")
    with pytest.raises(DuplicateClientId, match="once"):
        pq.enqueue(tasks.add, 3, 4, client_id="once")
    with Session() as session:
        session.begin()
        with pytest.raises(DuplicateClientId):
            pq.queue(session=session).enqueue(tasks.add, 3, 4, client_id="once")
        # the caller's transaction is not aborted by the conflict
        assert session.execute(sa.text("SELECT 1")).scalar() == 1
        session.commit()
    assert pq.get_job_by_client_id("once").args == [1, 2]


def test_a_bulk_enqueue_with_a_duplicate_client_id_writes_nothing(pq, engine):
    pq.enqueue(tasks.add, 0, 0, client_id="c2")
    calls = [(tasks.add, (i, i), {}, {"client_id": f"c{i}"}) for i in range(5)]
    with pytest.raises(DuplicateClientId, match="'c2'"):
        pq.enqueue_many(calls)
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 1


def test_upsert_replaces_a_pending_job_debounce(pq):
    first = pq.upsert(tasks.echo, "first", client_id="debounce")
    second = pq.upsert(tasks.echo, "second", client_id="debounce", run_at="1m")
    assert second.id == first.id
    stored = pq.get_job(first.id)
    assert stored.args == ["second"] and stored.status == "queued"
    assert len(pq.list_jobs("queued")) == 1


def test_async_functions_and_instance_methods_are_tasks(pq):
    a = pq.enqueue(tasks.async_add, 2, 3)
    b = pq.enqueue(tasks.calculator.calculate, 4, 5)
    c = pq.enqueue(tasks.Calculator(4).calculate, 4, 5)  # instance travels by dill
    assert c.encoding == "dill"
    for _ in range(3):
        work_one(pq)
    assert pq.get_job(a.id).return_value() == 5
    assert pq.get_job(b.id).return_value() == 10
    assert pq.get_job(c.id).return_value() == 5


def test_pydantic_arguments_and_results_round_trip(pq):
    from tests.models_pydantic import Person

    job = pq.enqueue(tasks.greet_person, Person(name="Ada", age=36))
    res = pq.enqueue(tasks.returns_model, "Bob")
    assert job.encoding == "json"
    work_one(pq)
    work_one(pq)
    assert pq.get_job(job.id).return_value() == "Person:Ada:36"
    assert pq.get_job(res.id).return_value() == Person(name="Bob", age=3)


def test_cancel_requeue_delete_and_listing(pq):
    a = pq.enqueue(tasks.add, 1, 1)
    pq.cancel(a.id)
    assert pq.get_job(a.id).status == "cancelled"
    pq.requeue(a.id)
    assert pq.get_job(a.id).status == "queued"
    b = pq.enqueue(tasks.fail)
    work_one(pq)
    work_one(pq)
    failed = pq.list_failed()
    assert [j.id for j in failed] == [b.id] and "ValueError: boom" in failed[0].error
    assert "Traceback" in failed[0].traceback
    assert pq.queue_stats()["default"] == {"succeeded": 1, "failed": 1}
    assert pq.clear_failed(before=dt.datetime(2000, 1, 1)) == 0
    assert pq.clear_failed() == 1
    assert pq.clear_completed() == 1
    c = pq.enqueue(tasks.add, 1, 1)
    pq.delete(c.id)
    with pytest.raises(JobNotFound):
        pq.get_job(c.id)
    with pytest.raises(JobNotFound):
        pq.cancel(999_999)


def test_queue_depths_count_waiting_jobs_per_queue(pq):
    pq.enqueue_many([(tasks.add, (1, 1))] * 3, queue="a")
    pq.enqueue(tasks.add, 1, 1, queue="b")
    assert pq.queue_depths() == {"a": 3, "b": 1}
    assert len(pq.queue("a")) == 3


def test_wait_returns_the_result_or_raises(pq):
    import threading

    from sqla_pq import JobFailed, JobNotFinished

    ok = pq.enqueue(tasks.add, 20, 22)
    bad = pq.enqueue(tasks.fail, "nope")
    with pytest.raises(JobNotFinished):
        pq.wait(ok.id, timeout=0.1)
    t = threading.Thread(target=lambda: [work_one(pq), work_one(pq)])
    t.start()
    assert ok.wait(timeout=10) == 42
    with pytest.raises(JobFailed, match="nope"):
        pq.wait(bad.id, timeout=10)
    t.join()


def test_is_async_false_runs_at_enqueue_with_the_same_recording(pq, Session):
    q = pq.queue(is_async=False)
    assert q.enqueue(tasks.add, 2, 3).return_value() == 5
    failed = q.enqueue(tasks.fail, max_retries=2)
    assert failed.status == "failed" and failed.attempts == 3 and failed.failures == 3
    with Session() as session:
        session.begin()
        job = pq.queue(session=session, is_async=False).enqueue(tasks.add, 1, 1)
        assert job.status == "succeeded"
        session.rollback()
    with pytest.raises(JobNotFound):
        pq.get_job(job.id)


def test_rows_are_plain_sql(pq, engine):
    pq.enqueue(tasks.add, 1, 2, queue="sql")
    assert rows(engine, "SELECT task, args, status FROM pq_job WHERE queue = 'sql'") == [
        ("tests.tasks.add", [1, 2], "queued")
    ]



def test_a_plain_enqueue_sends_only_its_set_columns_and_the_row_equals_the_returned_job(
        pq, monkeypatch):
    """NULL columns are left to their server defaults and ON CONFLICT only comes with a
    client_id; the Job handed back (built from the call, not re-read) is the stored row."""
    from sqla_pq import db
    from sqla_pq.tables import job_table

    sent: list[str] = []
    real, real_fixed = db.run_prepared, db.run_fixed

    def spy(cursor, raw, params, cache, in_transaction=False):
        sent.append(raw.sql)
        return real(cursor, raw, params, cache, in_transaction)

    def spy_fixed(cursor, raw, *args, **kwargs):  # a plan's call: its statement, prepared once
        sent.append(raw.sql)
        return real_fixed(cursor, raw, *args, **kwargs)

    monkeypatch.setattr("sqla_pq.pq.run_prepared", spy)
    monkeypatch.setattr("sqla_pq.pq.run_fixed", spy_fixed)
    plain = pq.enqueue(tasks.add, 1, 2)
    delayed = pq.enqueue(tasks.add, 1, 2, run_at=dt.timedelta(seconds=30))
    keyed = pq.enqueue(tasks.add, 1, 2, client_id="keyed")
    assert "ON CONFLICT" not in sent[0] and "ON CONFLICT" not in sent[1]
    assert "ON CONFLICT" in sent[2]
    columns = sent[0].split("VALUES")[0]
    for absent in ("client_id", "payload", "flow_id", "meta", "run_at", "expected_at",
                   "status", "priority", "encoding", "max_retries", "result_ttl", "serial",
                   "waiting_on", "on_parent_failure", "max_interruptions"):
        assert absent not in columns, absent  # NULL, or the server's default: not sent
    assert "run_at" in sent[1].split("VALUES")[0]
    odd = pq.queue("odd", serial=True).enqueue_call(tasks.add, (1, 2), priority=51,
                                                     max_retries=1, result_ttl=-1,
                                                     max_interruptions=0)
    assert all(c in sent[3].split("VALUES")[0] for c in (
        "priority", "max_retries", "result_ttl", "serial", "max_interruptions"))
    assert len(sent) == 4
    for job in (plain, delayed, keyed, odd):
        stored = pq.get_job(job.id)
        for column in job_table.columns:
            assert getattr(stored, column.key) == getattr(job, column.key), column.key


def test_the_defaults_an_insert_leaves_out_are_the_tables_server_defaults(engine):
    """queries.INSERT_SERVER_DEFAULTS must say what pq_job's server defaults say (in the
    models and in the database the migrations built), or a job enqueued with such a value
    would be stored with another."""
    from sqla_pq.queries import INSERT_SERVER_DEFAULTS
    from sqla_pq.tables import job_table

    in_database = dict(rows(engine, "SELECT column_name, column_default FROM "
                                    "information_schema.columns WHERE table_name = 'pq_job'"))
    for name, value in INSERT_SERVER_DEFAULTS.items():
        expected = str(value).lower() if isinstance(value, bool) else str(value)
        default = job_table.c[name].server_default
        assert default is not None, name
        assert str(getattr(default.arg, "text", default.arg)) == expected, name
        assert in_database[name].split("::")[0].strip("'") == expected, name


def test_job_methods_take_the_job_enqueue_returned_as_well_as_its_id(pq):
    """python-pq's ``task_id = pq.enqueue(f); pq.cancel(task_id)``: enqueue returns a Job here,
    and passing it must not end in the driver's "can't adapt type 'Job'"."""
    job = pq.enqueue(tasks.add, 1, 2)
    pq.cancel(job)
    assert pq.get_job(job).status == "cancelled"
    assert pq.requeue(job).status == "queued"
    assert pq.run_job(job).status == "succeeded"
    assert pq.wait(job, timeout=5) == 3
    pq.delete(job)
    with pytest.raises(JobNotFound):
        pq.get_job(job.id)


@pytest.mark.parametrize("method", ["get_job", "wait", "cancel", "requeue", "delete", "run_job"])
def test_job_methods_refuse_anything_but_a_job_or_an_int_by_name(pq, method):
    from sqla_pq.errors import InvalidOption

    for bad in ("1", 1.5, None, True, pq.queue()):
        with pytest.raises(InvalidOption, match=rf"pq\.{method}\(\) takes a job \(Job\) or its id"):
            getattr(pq, method)(bad)


def test_schedule_and_flow_methods_take_the_object_they_returned(pq):
    from sqla_pq.errors import InvalidOption

    schedule = pq.schedule(tasks.add, run_every=60, args=(1, 2))
    pq.pause_schedule(schedule)
    assert pq.get_schedule(schedule).active is False
    pq.resume_schedule(schedule)
    assert pq.get_schedule(schedule.id).active is True
    pq.delete_schedule(schedule)
    assert pq.schedules() == []
    with pq.flow("flows", name="by-object") as flow:
        flow.enqueue(tasks.add, 1, 2)
    assert pq.get_flow(flow).id == flow.id
    assert pq.get_flow(pq.get_flow(flow)).name == "by-object"
    with pytest.raises(InvalidOption, match=r"pq\.pause_schedule\(\) takes a schedule"):
        pq.pause_schedule("sync")
    with pytest.raises(InvalidOption, match=r"pq\.get_flow\(\) takes a flow"):
        pq.get_flow(schedule)
