"""Hot statements are prepared once per connection, and it can be switched off (pgbouncer)."""

from __future__ import annotations

from sqla_pq import PQ
from sqla_pq.testing import drain
from tests import tasks


def _prepared_names(pq):
    with pq._cursor() as runner:
        runner.cursor.execute("SELECT name FROM pg_prepared_statements")
        return {r[0] for r in runner.cursor.fetchall()}


def test_an_own_transaction_enqueue_is_prepared_once_per_connection(Session):
    pq = PQ(Session)
    for i in range(3):
        pq.enqueue(tasks.add, i, i)
    names = _prepared_names(pq)
    assert any(n.startswith("sqla_pq_") for n in names), names


def test_a_connection_that_lost_its_prepared_statements_prepares_them_again(Session):
    pq = PQ(Session)
    pq.enqueue(tasks.add, 1, 1)
    with pq._cursor() as runner:  # what a pool's reset (DISCARD ALL) does
        runner.cursor.execute("DEALLOCATE ALL")
    job = pq.enqueue(tasks.add, 2, 2)
    assert pq.get_job(job.id).args == [2, 2]


def test_prepared_statements_can_be_switched_off(Session):
    pq = PQ(Session, prepared_statements=False)
    pq.enqueue(tasks.add, 1, 1)
    drain(pq)
    assert not any(n.startswith("sqla_pq_") for n in _prepared_names(pq))
