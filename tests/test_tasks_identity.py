"""A task is a stable string; bad callables are refused at enqueue; paths are allowed or not
before anything is imported."""

from __future__ import annotations

import datetime as dt
import sys

import pytest

from sqla_pq.errors import TaskNotAllowed, TaskNotImportable
from sqla_pq.tasks import check_allowed, import_object, resolve, task_ref
from tests import tasks


def test_functions_are_stored_as_dotted_import_paths():
    assert task_ref(tasks.add).name == "tests.tasks.add"
    assert task_ref("tests.tasks.add").name == "tests.tasks.add"
    assert task_ref("tests.tasks:add").name == "tests.tasks.add"


def test_methods_of_module_level_instances_use_the_instance_path():
    ref = task_ref(tasks.calculator.calculate)
    assert ref.name == "tests.tasks.calculator.calculate" and ref.instance is None


def test_methods_of_other_instances_carry_the_instance():
    calc = tasks.Calculator(4)
    ref = task_ref(calc.calculate)
    assert ref.name == "tests.tasks.Calculator.calculate" and ref.instance is calc


def test_lambdas_and_local_functions_are_refused_at_enqueue():
    def local():
        return 1

    with pytest.raises(TaskNotImportable, match="lambda"):
        task_ref(lambda: 1)
    with pytest.raises(TaskNotImportable, match="inside a function"):
        task_ref(local)
    with pytest.raises(TaskNotImportable):
        task_ref("not a path!")


def test_standard_library_paths_are_refused_by_default():
    with pytest.raises(TaskNotAllowed):
        check_allowed("os.system", ())
    with pytest.raises(TaskNotAllowed):
        check_allowed("subprocess.run", ())
    check_allowed("tests.tasks.add", ())


def test_allowed_tasks_limits_paths_to_prefixes_without_importing():
    sys.modules.pop("tests.forbidden_module", None)
    with pytest.raises(TaskNotAllowed):
        resolve("tests.forbidden_module.run", ("tests.tasks",))
    assert "tests.forbidden_module" not in sys.modules, "a refused path must not be imported"
    assert resolve("tests.tasks.add", ("tests.tasks",)) is tasks.add
    with pytest.raises(TaskNotAllowed):
        check_allowed("tests.taskser.x", ("tests.tasks",))  # prefixes end at a dot


def test_import_errors_inside_a_module_are_not_mistaken_for_missing_modules():
    with pytest.raises(TaskNotImportable):
        import_object("tests.tasks.no_such_function")
    with pytest.raises(TaskNotImportable):
        import_object("no_such_package.mod.f")


# -- @pq.task options ----------------------------------------------------------------------------


def test_an_unknown_task_option_fails_at_decoration_and_lists_the_valid_ones(pq):
    from sqla_pq.errors import InvalidOption
    from sqla_pq.tasks import registered

    with pytest.raises(InvalidOption, match=r"unknown @pq\.task option max_retry: the options "
                                            r"are name, queue, .*max_retries"):
        @pq.task(name="tests.identity.typo", max_retry=3)
        def typo() -> None:
            pass

    assert registered("tests.identity.typo") is None
    with pytest.raises(InvalidOption, match="run_at or schedule_at, not both"):
        pq.task(schedule_at="1h", run_at="2h")
    with pytest.raises(InvalidOption, match="serial must be True or False"):
        pq.task(serial="yes")
    with pytest.raises(InvalidOption, match="unknown @pq.task option"):
        pq["apples"].task(shedule_at="1h")  # pq's @queue.task goes through the same check


def test_task_schedule_at_and_expected_at_are_defaults_each_call_can_override(pq, engine):
    from tests.helpers import scalar

    @pq.task(name="tests.identity.later", schedule_at="1h", expected_at="2h")
    def later() -> None:
        pass

    @pq["msgq"].task(schedule_at="1h")
    def queued_later() -> None:
        pass

    now = scalar(engine, "SELECT now()")
    job = later.delay()
    assert dt.timedelta(minutes=59) < job.run_at - now < dt.timedelta(minutes=61)
    assert job.expected_at is not None
    assert queued_later.delay().run_at - now > dt.timedelta(minutes=59)
    assert queued_later.delay().queue == "msgq"
    soon = later.delay(_schedule_at="10s")
    assert soon.run_at - now < dt.timedelta(minutes=1)
    assert later.delay(run_at="10s").run_at - now < dt.timedelta(minutes=1)
    assert later.delay(schedule_at="10s").run_at - now < dt.timedelta(minutes=1)
    assert later.enqueue_call().run_at - now > dt.timedelta(minutes=59)


def test_a_serial_task_enqueues_serial_jobs(pq):
    @pq.task(name="tests.identity.one_at_a_time", queue="reports", serial=True)
    def one_at_a_time() -> None:
        pass

    @pq.task(name="tests.identity.any_time", queue="reports")
    def any_time() -> None:
        pass

    assert one_at_a_time.delay().serial is True
    assert one_at_a_time.enqueue_call().serial is True
    assert one_at_a_time.delay(_queue="other").serial is True
    assert any_time.delay().serial is False


def test_pq_enqueue_of_a_task_uses_its_queue_and_defaults_like_delay(pq, engine):
    """pq.enqueue(task) and task.delay() make the same job: the task's queue, serial flag,
    schedule_at and expected_at, unless the call says otherwise."""
    from tests.helpers import scalar

    @pq.task(name="tests.identity.report", queue="reports", serial=True, schedule_at="1h",
             expected_at="2h", priority=70)
    def report(n: int) -> int:
        return n

    now = scalar(engine, "SELECT now()")
    for job in (pq.enqueue(report, 1), pq.enqueue_call(report, [1]),
                pq.enqueue("tests.identity.report", 1), report.delay(1),
                pq.upsert(report, 1, client_id="r-1")):
        assert (job.queue, job.serial, job.priority) == ("reports", True, 70)
        assert dt.timedelta(minutes=59) < job.run_at - now < dt.timedelta(minutes=61)
        assert job.expected_at is not None
    own = pq.enqueue(report, 2, queue="adhoc", run_at="10s")
    assert own.queue == "adhoc" and own.run_at - now < dt.timedelta(minutes=1)
    assert pq.queue("batch").enqueue(report, 3).queue == "batch"  # a Queue object is explicit
    plain = pq.enqueue(tasks.add, 1, 2)
    assert (plain.queue, plain.serial) == ("default", False)


def test_bulk_and_periodic_enqueue_of_a_task_use_its_queue(pq):
    @pq.task(name="tests.identity.bulk", queue="bulk")
    def bulk(n: int) -> int:
        return n

    assert {j.queue for j in pq.enqueue_many([(bulk, (i,)) for i in range(3)])} == {"bulk"}
    assert {j.queue for j in pq.group([(bulk, (1,)), (bulk, (2,))]).jobs} == {"bulk"}
    mixed = pq.enqueue_many([(bulk, (1,)), (tasks.add, (1, 2))])
    assert {j.queue for j in mixed} == {"default"}, "tasks of different queues: the default"
    assert pq.schedule(bulk, "1h", args=[1]).queue == "bulk"
    assert pq.schedule(bulk, "1h", key="elsewhere", queue="other", args=[1]).queue == "other"
