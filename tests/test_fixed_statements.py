"""A call plan's insert is prepared once per connection with the plan's values written in, so
a plain enqueue sends, and the server evaluates, only the call's arguments: the row must be
the one the generic statement writes, whatever the values, and the statements must survive a
pool's DISCARD ALL and a migration that changes what they return."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from sqla_pq import db
from sqla_pq.enqueue import FixedInsert
from sqla_pq.tables import job_table
from tests import tasks
from tests.helpers import rows


def _fixed_statements(pq) -> list[tuple[str, str]]:
    """(statement text, parameter types) of this PQ's held connection's plan statements."""
    return pq._run(sa.text(
        "SELECT statement, parameter_types::text FROM pg_prepared_statements "
        "WHERE name LIKE 'sqla_pq_f%' ORDER BY prepare_time"))


def _same_as_stored(pq, job) -> None:
    stored = pq.get_job(job.id)
    for column in job_table.columns:
        assert getattr(stored, column.key) == getattr(job, column.key), column.key


def test_a_plans_calls_send_only_their_arguments(pq):
    queue = pq.queue("fixed", priority=70, timeout="30s", max_retries=2, retry_in="5s",
                     result_ttl=60)
    jobs = [queue.enqueue(tasks.add, 1, 2), queue.enqueue(tasks.nothing),
            queue.enqueue(tasks.echo, "x", key="y"), queue.enqueue(tasks.add, 3, 4)]
    [(statement, types)] = _fixed_statements(pq)[:1]
    assert types == "{text,text}", "only args and kwargs should be parameters"
    assert "'fixed'" in statement and "'tests.tasks.add'" in statement and "$3" not in statement
    assert len(_fixed_statements(pq)) == 3, "one statement per plan (add, nothing, echo)"
    assert [(j.args, j.kwargs) for j in jobs] == [
        ([1, 2], {}), ([], {}), (["x"], {"key": "y"}), ([3, 4], {})]
    for job in jobs:
        _same_as_stored(pq, job)
    assert rows(pq.engine, "SELECT args, kwargs, priority, max_retries, result_ttl FROM pq_job "
                           "ORDER BY id") == [
        ([1, 2], {}, 70, 2, 60), ([], {}, 70, 2, 60), (["x"], {"key": "y"}, 70, 2, 60),
        ([3, 4], {}, 70, 2, 60)]


def test_values_that_need_quoting_are_written_in_as_the_driver_quotes_them(pq):
    name = "tests.fixed.it's 100%s %(args)s \\ back'slash"

    @pq.task(name=name)
    def odd(text: str) -> str:
        return text

    jobs = [pq.enqueue(odd, "it's"), pq.enqueue(odd, "%(args)s"), pq.enqueue(odd)]
    assert [j.task for j in jobs] == [name] * 3
    assert rows(pq.engine, "SELECT task, args FROM pq_job ORDER BY id") == [
        (name, ["it's"]), (name, ["%(args)s"]), (name, [])]
    for job in jobs:
        _same_as_stored(pq, job)


def test_past_the_cap_plans_share_the_generic_statement(pq, monkeypatch):
    monkeypatch.setattr(db, "MAX_FIXED_STATEMENTS", 1)
    jobs = [pq.enqueue(tasks.add, 1, 2), pq.enqueue(tasks.echo, 3), pq.enqueue(tasks.echo, 4),
            pq.enqueue(tasks.add, 5, 6)]
    [(statement, _)] = _fixed_statements(pq)
    assert "'tests.tasks.add'" in statement, "the first plan's statement is the only one"
    assert [j.args for j in jobs] == [[1, 2], [3], [4], [5, 6]]
    for job in jobs:
        _same_as_stored(pq, job)


def test_plans_past_the_cap_are_not_remembered_by_the_connection(pq, monkeypatch):
    """Call plans come and go (``MAX_CALL_PLANS``); the ones past the cap must not pile up."""
    monkeypatch.setattr(db, "MAX_FIXED_STATEMENTS", 1)
    for i in range(20):
        assert pq.queue(f"cap{i}").enqueue(tasks.add, i, i).queue == f"cap{i}"
    with pq._cursor() as runner:
        remembered = [key for key in runner.prepared if isinstance(key, FixedInsert)]
    assert len(remembered) == 1
    assert rows(pq.engine, "SELECT count(DISTINCT queue) FROM pq_job") == [(20,)]


def test_a_connection_that_lost_its_statements_prepares_them_again(pq):
    pq.enqueue(tasks.add, 1, 2)
    pq._run(sa.text("DEALLOCATE ALL"))  # what a pool's reset (DISCARD ALL) does
    assert _fixed_statements(pq) == []
    job = pq.enqueue(tasks.add, 3, 4)
    assert job.args == [3, 4] and len(_fixed_statements(pq)) == 1
    _same_as_stored(pq, job)


def test_a_migration_that_changes_a_returned_column_does_not_break_the_next_call(pq, engine):
    first = pq.enqueue(tasks.add, 1, 2)
    pq.get_job(first.id)  # a generic prepared statement too
    with engine.begin() as conn:  # PostgreSQL refuses a cached plan whose result type changed
        conn.exec_driver_sql("ALTER TABLE pq_job ALTER COLUMN status TYPE varchar(20)")
    job = pq.enqueue(tasks.add, 3, 4)
    assert (job.status, pq.get_job(job.id).args) == ("queued", [3, 4])
    assert pq.get_job(first.id).args == [1, 2]


def test_a_stale_statement_inside_a_transaction_is_not_retried(engine):
    """Inside the caller's transaction the failed EXECUTE aborted it: nothing may run on."""
    raw_conn = engine.raw_connection()
    try:
        cursor = raw_conn.cursor()
        cursor.execute("CREATE TABLE scratch (x int)")
        raw_conn.commit()
        statement = db.RawStatement("SELECT x FROM scratch", {})
        cache: dict = {}
        assert db.run_prepared(cursor, statement, None, cache, in_transaction=True) == []
        cursor.execute("ALTER TABLE scratch ALTER COLUMN x TYPE bigint")
        with pytest.raises(Exception, match="cached plan must not change result type"):
            db.run_prepared(cursor, statement, None, cache, in_transaction=True)
        raw_conn.rollback()
    finally:
        raw_conn.close()
