"""Workflows and the other seed APIs: Flow, groups, multi-step jobs, serial queues, the task
decorator, the message queue."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from sqla_pq import PQ, Retry
from sqla_pq.errors import FlowNotFound, PQError
from sqla_pq.link import Link
from sqla_pq.maintenance import Pruner
from sqla_pq.testing import drain
from tests import tasks
from tests.helpers import WorkerProcess, rows, scalar, wait_until

# -- Flow --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_three_step_flow_whose_second_step_fails_never_runs_the_third(pq, worker_env, url_str):
    with pq.flow("work", name="myflow") as f:
        first = f.enqueue(tasks.record, url_str, "one")
        second = f.enqueue_call(tasks.fail, args=("step two broke",))
        third = f.enqueue(tasks.record, url_str, "three")
    assert [j.status for j in f.jobs] == ["queued", "deferred", "deferred"]
    workers = [WorkerProcess(worker_env, ["work", "--isolation", "thread"]) for _ in range(2)]
    try:
        wait_until(lambda: pq.get_job(third.id).status == "cancelled", 30, message="the flow to stop")
    finally:
        for w in workers:
            w.stop()
    assert pq.get_job(first.id).status == "succeeded"
    assert pq.get_job(second.id).status == "failed"
    stopped = pq.get_job(third.id)
    assert stopped.started_at is None and f"dependency {second.id} failed" in stopped.error
    assert [r[0] for r in rows(pq.engine, "SELECT tag FROM test_ledger")] == ["one"]
    flow = pq.get_flow(f.id)
    assert flow.status == "failed" and [j.id for j in flow.jobs] == [first.id, second.id, third.id]


def test_flow_steps_run_in_order_and_flows_are_rows(pq):
    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with pq.flow(pq.queue(), name="pipeline") as f:
        a = f.enqueue(tasks.add, 1, 1)
        b = f.schedule(when, tasks.add, 2, 2)
        c = f.enqueue_call(tasks.add, args=(3, 3))
    drain(pq)
    jobs = [pq.get_job(j.id) for j in (a, b, c)]
    assert [j.return_value() for j in jobs] == [2, 4, 6]
    assert jobs[0].finished_at <= jobs[1].started_at and jobs[1].finished_at <= jobs[2].started_at
    assert [fl.id for fl in pq.find_flows(name="pipeline")] == [f.id]
    assert pq.get_flow(f.id).status == "succeeded"
    assert {j.flow_id for j in jobs} == {f.id}


def test_a_flow_is_written_whole_or_not_at_all(pq, Session, engine):
    with pytest.raises(RuntimeError):
        with pq.flow(name="broken") as f:
            f.enqueue(tasks.add, 1, 1)
            raise RuntimeError("the caller's code failed half-way")
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 0
    assert scalar(engine, "SELECT count(*) FROM pq_flow") == 0
    with Session() as session:
        session.begin()
        with pq.flow(name="in-a-session", session=session) as f:
            f.enqueue(tasks.add, 1, 1)
        session.rollback()
    assert scalar(engine, "SELECT count(*) FROM pq_flow") == 0


def test_a_flow_expires_with_its_last_job(pq, engine):
    with pq.flow(name="short-lived") as f:
        f.enqueue(tasks.add, 1, 1, result_ttl=1)
        f.enqueue(tasks.add, 1, 1, result_ttl=1)
    drain(pq)
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET expires_at = now() - interval '1s'")
        c.exec_driver_sql("UPDATE pq_flow SET created_at = now() - interval '1 hour'")
    link = Link(engine, "t")
    Pruner(0).run_once(link)
    link.close()
    with pytest.raises(FlowNotFound):
        pq.get_flow(f.id)


def test_groups_fan_out_and_a_later_step_fans_in(pq):
    group = pq.group([(tasks.add, (i, i)) for i in range(3)], queue="g")
    after = pq.enqueue(tasks.add, 0, 0, queue="g", depends_on=group)
    with pq.flow("g") as f:
        f.enqueue(tasks.add, 1, 1)
        fan = f.group([(tasks.add, (i, 1)) for i in range(3)])
        last = f.enqueue(tasks.add, 9, 9)
    assert pq.get_job(last.id).waiting_on == 3 and len(fan) == 3
    drain(pq, concurrency=3)
    done = pq.get_job(after.id)
    assert done.status == "succeeded" and done.attempts == 1
    assert done.started_at >= max(pq.get_job(i).finished_at for i in group.job_ids)
    assert pq.get_job(last.id).started_at >= max(pq.get_job(j.id).finished_at for j in fan)


# -- multi-step jobs --------------------------------------------------------------------------------


def test_a_multi_step_job_passes_its_workspace_from_task_to_task(pq, worker_env):
    pq.define_job("greet_twice", tasks=["tests.tasks.step_one", "tests.tasks.step_two"],
                  creation_hook="tests.tasks.on_create")
    job = pq.create_job("greet_twice", workspace={"key": "value"}, queue="dbq")
    assert tasks.created[-1] == job.id, "the creation hook runs in the creating process"
    w = WorkerProcess(worker_env, ["dbq", "--burst", "-I", "tests.jobdefs"])
    assert w.wait(60) == 0, w.output()
    output = w.output()  # stop() removes it
    w.stop()
    done = pq.get_job(job.id)
    assert done.status == "succeeded" and done.return_value() == "HELLO, TASK 2!"
    assert done.workspace["key"] == "value" and done.workspace["seen"] == "Hello, task 2!"
    assert len(done.workspace["pids"]) == 2 and done.step == 1
    assert done.attempts == 2, (  # each task is one claim (django-db-queue's READY in between)
        f"attempts {done.attempts}, interruptions {done.interruptions}, error {done.error!r}; "
        f"worker output:\n{output}")


def test_the_failure_hook_gets_the_job_and_the_exception_in_the_worker(pq, tmp_path):
    hook_file = tmp_path / "hook"
    pq.define_job("doomed", tasks=[tasks.step_one, tasks.step_fails], failure_hook=tasks.on_failure)
    job = pq.create_job("doomed", workspace={"hook_file": str(hook_file)})
    drain(pq)
    done = pq.get_job(job.id)
    assert done.status == "failed" and "step failed" in done.error
    assert hook_file.read_text() == (
        f"{job.id} RuntimeError step failed with workspace ['hook_file', 'message', 'pids']\n")


def test_jobs_load_from_a_settings_mapping_and_unknown_names_say_so(pq):
    defined = pq.define_jobs({"a_job": ["tests.tasks.step_one"],
                              "b_job": {"tasks": ["tests.tasks.step_one", "tests.tasks.step_two"]}})
    assert [d.name for d in defined] == ["a_job", "b_job"]
    with pytest.raises(PQError, match="define_job"):
        pq.create_job("no_such_job")


# -- serial queues -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_serial_queue_with_three_workers_never_overlaps_two_jobs(pq, worker_env, url_str, engine):
    q = pq.queue("reports", serial=True)
    for i in range(8):
        q.enqueue(tasks.record, url_str, f"r{i}", 0.15)
    workers = [WorkerProcess(worker_env, ["reports", "--isolation", "thread", "-c", "2"])
               for _ in range(3)]
    try:
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM pq_job WHERE status = 'succeeded'") == 8,
                   60, message="all serial jobs")
    finally:
        for w in workers:
            w.stop()
    spans = rows(engine, "SELECT started_at, finished_at, pid FROM test_ledger ORDER BY started_at")
    assert len(spans) == 8
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert overlaps == [], "two jobs of a serial queue ran at once"
    assert len({s[2] for s in spans}) >= 2, "the jobs were spread over several workers"


# -- the task decorator ------------------------------------------------------------------------------


def test_a_task_stays_callable_and_delay_enqueues_with_per_call_overrides(pq, engine):
    @pq.task(queue="deco", max_retries=2, retry_in="1s", timeout=30, priority=75, name="deco.add")
    def add(a: int, b: int) -> int:
        return a + b

    assert add(1, 2) == 3, "a direct call runs the function"
    job = add.delay(3, 4)
    assert (job.queue, job.task, job.max_retries, job.timeout, job.priority) == ("deco", "deco.add", 2, 30, 75)
    later = add.delay(5, 6, _schedule_at="1h", _expected_at="2h", _priority=10)
    now = scalar(engine, "SELECT now()")
    assert later.run_at - now > dt.timedelta(minutes=59) and later.priority == 10
    assert later.expected_at is not None
    assert add.push(1, 1).task == "deco.add"  # pgtq's name
    drain(pq, ["deco"])
    assert pq.get_job(job.id).return_value() == 7


def test_a_task_registered_by_name_runs_from_that_name(pq):
    def renamed_in_code(x: int) -> int:
        return x * 10

    task = pq.task(renamed_in_code, name="stable.name") if False else pq.task(name="stable.name")(renamed_in_code)
    job = task.delay(4)
    assert job.task == "stable.name"
    drain(pq)
    assert pq.get_job(job.id).return_value() == 40


def test_django_pq_job_decorator_and_retry_helpers(pq):
    @pq.job(queue="jd")
    def say_hello(name: str | None = None) -> str:
        return f"Hi there, {name or 'Stranger'}!"

    job = say_hello.delay("friend")
    drain(pq, ["jd"])
    assert pq.get_job(job.id).return_value() == "Hi there, friend!"
    assert Retry("1s").delay == "1s"


# -- the message queue --------------------------------------------------------------------------------


def test_put_and_get_follow_priority_expected_at_and_schedule_at(pq):
    apples = pq["apples"]
    apples.put({"kind": "Cox"})
    apples.put({"kind": "Arthur Turner"}, expected_at="5m")
    apples.put({"kind": "Golden Delicious"}, expected_at="1m")
    apples.put({"kind": "Later"}, schedule_at="1h")
    got = [apples.get(block=False).data["kind"] for _ in range(3)]
    assert got == ["Golden Delicious", "Arthur Turner", "Cox"]
    assert apples.get(block=False) is None, "a message scheduled for later came out"
    assert len(apples) == 1


def test_get_blocks_until_timeout_then_returns_none_and_wakes_on_put(pq):
    q = pq["blocking"]
    t0 = time.monotonic()
    assert q.get(timeout=0.3) is None
    assert time.monotonic() - t0 >= 0.3
    threading.Timer(0.3, lambda: PQ(pq.engine)["blocking"].put("late")).start()
    message = q.get(timeout=10)
    assert message is not None and message.data == "late"
    assert repr(message).startswith(f"<pq.Job id={message.id} size=1 enqueued_at=")


def test_iteration_yields_none_on_each_timeout(pq):
    q = pq["iter"]
    q.put(1)
    it = iter(q)
    assert next(it).data == 1
    start = time.monotonic()
    assert next(it) is None and time.monotonic() - start >= 0.9


def test_a_transactional_get_rolled_back_leaves_the_message(pq, engine):
    q = pq["tx"]
    q.put({"n": 1})
    with pytest.raises(RuntimeError):
        with q as session:
            message = q.get()
            assert message.data == {"n": 1}
            session.execute(__import__("sqlalchemy").text("INSERT INTO test_users (email) VALUES ('x')"))
            raise RuntimeError("crash while working")
    assert scalar(engine, "SELECT count(*) FROM test_users") == 0
    with q as session:
        assert q.get().data == {"n": 1}, "the message was lost with the rolled-back get"
    assert q.get(block=False) is None


def test_pickle_queues_carry_any_object(pq):
    q = pq["jobs/pickle"]
    q.put(tasks.Calculator(3))
    assert q.get(block=False).data.denominator == 3
    with pytest.raises(Exception, match="pickle"):
        pq["json-only"].put(tasks.Calculator(3))


def test_create_job_priority_counts_as_django_db_queues(pq):
    """There, 0 is the default and priority=1 runs before every default job."""
    from sqla_pq import Priority
    from tests.test_claim import claim

    pq.define_job("ddq_prio", tasks=[tasks.step_one])
    pq.define_job("ddq_urgent", tasks=[tasks.step_one], priority=2)
    plain = pq.enqueue(tasks.add, 1, 1)
    first = pq.create_job("ddq_prio", priority=1)
    default = pq.create_job("ddq_prio")
    urgent = pq.create_job("ddq_urgent")
    assert (first.priority, default.priority, urgent.priority) == (
        Priority.NORMAL + 1, Priority.NORMAL, Priority.NORMAL + 2)
    assert [j.id for j in claim(pq, ["default"], 10)] == [urgent.id, first.id, plain.id, default.id]
    with pytest.raises(PQError, match="priority must be an int"):
        pq.create_job("ddq_prio", priority="high")
