"""A plain enqueue (no per-call options) reuses what the first call of its task resolved: it
must still make the job ``build`` makes, and notice every change of what the plan came from."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import inspect

from sqla_pq import PQ, PayloadTooLarge
from sqla_pq.errors import InvalidOption
from sqla_pq.tables import job_table
from tests import tasks

CALL_FIELDS = ("queue", "task", "status", "priority", "max_retries", "retry_policy", "timeout",
               "result_ttl", "serial", "max_interruptions", "expected_at", "encoding")


def _same_job(job, spec) -> None:
    for name in CALL_FIELDS:
        expected = spec.task if name == "task" else (
            spec.encoded.encoding if name == "encoding" else getattr(spec, name))
        assert getattr(job, name) == expected, name


def test_a_planned_enqueue_makes_the_job_build_makes(pq):
    queue = pq.queue("plans", timeout="30s", result_ttl=60, priority=70, max_retries=2,
                     retry_in="5s")
    for args in [(1, 2), (3, 4), ("a", "b")]:
        job = queue.enqueue(tasks.add, *args)
        _same_job(job, queue.build(tasks.add, args))
        assert job.args == list(args)
    assert [key[-1] for key in pq._call_plans] == [tasks.add], "the plan was not kept"


def test_every_column_of_a_planned_calls_job_is_its_stored_row(pq, Session):
    """A plan's Job is copied from values kept with the plan, not read back: every column must
    still be the row's, whatever the call brings (no arguments, JSON, arguments only dill can
    carry) and wherever it goes (its own transaction, a session's)."""
    queue = pq.queue("plans", timeout="30s", result_ttl=60, priority=70, max_retries=2,
                     retry_in="5s")
    jobs = [queue.enqueue(tasks.nothing), queue.enqueue(tasks.echo, 1, "two", three=[3]),
            queue.enqueue(tasks.echo, {1, 2}),  # a set: dill, so the plan's insert is not used
            queue.enqueue(tasks.nothing)]
    assert jobs[2].encoding == "dill" and jobs[1].encoding == "json"
    with Session() as session, session.begin():
        jobs.append(pq.queue("plans", session=session).enqueue(tasks.add, 1, 2))
    assert jobs[0].retry_policy is not jobs[3].retry_policy, "jobs of a plan share a dict"
    for job in jobs:
        stored = pq.get_job(job.id)
        for column in job_table.columns:
            assert getattr(stored, column.key) == getattr(job, column.key), (job.id, column.key)


def test_the_returned_job_is_detached_loaded_and_unmodified(pq):
    job = pq.enqueue(tasks.add, 1, 2)
    state = inspect(job)
    assert state.detached and not state.modified
    assert not {c.key for c in job_table.columns} & state.unloaded
    job.priority = 99
    assert inspect(job).modified, "a change to the returned job must be tracked"
    with pq.session() as session:
        merged = session.merge(pq.enqueue(tasks.add, 3, 4))
        assert merged.args == [3, 4]


def test_a_change_of_the_queues_defaults_is_seen_by_the_next_call(pq):
    queue = pq.queue("plans")
    assert queue.enqueue(tasks.add, 1, 2).timeout == 600
    queue.timeout = 5
    queue.priority = 10
    job = queue.enqueue(tasks.add, 1, 2)
    assert (job.timeout, job.priority) == (5, 10)


def test_a_task_registered_again_with_other_options_is_seen_by_the_next_call(pq):
    def registered(priority: int):
        @pq.task(name="tests.plans.again", priority=priority, max_retries=priority // 10)
        def again() -> None:
            pass

        return again

    first = registered(10)
    queue = pq.queue("plans")
    assert queue.enqueue(first).priority == 10
    registered(80)
    job = queue.enqueue("tests.plans.again")
    assert (job.priority, job.max_retries) == (80, 8)
    assert queue.enqueue(first).priority == 80


def test_other_settings_make_a_new_plan(pq):
    queue = pq.queue("plans")
    assert queue.enqueue(tasks.add, 1, 2).result_ttl == 500
    pq.settings = pq.settings.replace(result_ttl=42)
    assert queue.enqueue(tasks.add, 1, 2).result_ttl == 42


def test_an_expected_at_delay_is_counted_from_each_call(pq):
    @pq.task(name="tests.plans.expected", expected_at="1h")
    def expected() -> None:
        pass

    queue = pq.queue("plans")
    before = dt.datetime.now(dt.UTC)
    first = queue.enqueue(expected)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert before + dt.timedelta(hours=1) <= first.expected_at <= later
    assert not pq._call_plans, "a clock-dependent default must not be planned"


def test_bound_methods_and_unhashable_callables_are_built_at_every_call(pq):
    queue = pq.queue("plans")
    first = queue.enqueue(tasks.Calculator(4).calculate, 4, 5)
    second = queue.enqueue(tasks.Calculator(8).calculate, 4, 5)
    assert first.encoding == second.encoding == "dill" and first.payload != second.payload
    assert not pq._call_plans, "a plan would have kept an instance (and sent the first one again)"

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self) -> None:
            pass

    with pytest.raises(Exception) as built:  # noqa: B017 - whatever build says of it
        queue.build(Unhashable())
    with pytest.raises(type(built.value)):
        queue.enqueue(Unhashable())


def test_a_plan_still_validates_what_each_call_brings(pq):
    queue = pq.queue("plans")
    queue.enqueue(tasks.add, 1, 2)
    small = PQ(pq.engine, max_payload_bytes=64, warn_payload_bytes=32).queue("plans")
    small.enqueue(tasks.add, 1, 2)
    with pytest.raises(PayloadTooLarge):
        small.enqueue(tasks.echo, "x" * 100)
    with pytest.raises(InvalidOption):
        queue.enqueue(tasks.add, 1, 2, priority="high")


def test_pq_enqueue_and_task_delay_reuse_the_plan_across_their_queues(pq):
    for i in range(3):
        pq.enqueue(tasks.add, i, i)
    assert len(pq._call_plans) == 1

    @pq.task(name="tests.plans.delayed", queue="plans")
    def delayed(x: int) -> int:
        return x

    for i in range(3):
        assert delayed.delay(i).queue == "plans"
    assert len(pq._call_plans) == 2


def test_a_function_registered_after_its_first_plain_enqueue_takes_its_task_options(pq):
    queue = pq.queue("plans")
    first = queue.enqueue(tasks.registered_later)
    assert (first.task, first.priority) == ("tests.tasks.registered_later", 50)
    pq.task(name="tests.plans.later", priority=90)(tasks.registered_later)
    job = queue.enqueue(tasks.registered_later)
    assert (job.task, job.priority) == ("tests.plans.later", 90)
    assert job.task == queue.build(tasks.registered_later).task


def test_settings_cannot_change_under_a_plan(pq):
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        pq.settings.result_ttl = 1  # type: ignore[misc]
