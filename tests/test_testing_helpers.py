"""sqla_pq.testing: what users need in their own test suites."""

from __future__ import annotations

import pytest

from sqla_pq.testing import (
    assert_enqueued,
    drain,
    enqueued_jobs,
    refute_enqueued,
    run_job,
    work_one,
)
from tests import tasks


def test_assert_enqueued_sees_an_uncommitted_session(pq, Session):
    with Session() as session:
        session.begin()
        refute_enqueued(session, task=tasks.add)
        pq.queue("mail", session=session).enqueue(tasks.add, 1, 2)
        jobs = assert_enqueued(session, task=tasks.add, queue="mail", args=[1, 2], count=1)
        assert jobs[0].args == [1, 2]
        with pytest.raises(AssertionError, match="expected a job"):
            assert_enqueued(session, task=tasks.add, args=[9, 9])
        session.rollback()
    with Session() as session:
        assert enqueued_jobs(session) == []


def test_drain_work_one_and_run_job(pq):
    a = pq.enqueue(tasks.add, 1, 1)
    pq.enqueue(tasks.add, 2, 2)
    assert run_job(pq, a).return_value() == 2
    assert work_one(pq) is True and work_one(pq) is False
    pq.enqueue_many([(tasks.add, (i, i)) for i in range(5)])
    assert drain(pq) == 5
