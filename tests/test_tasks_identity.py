"""A task is a stable string; bad callables are refused at enqueue; paths are allowed or not
before anything is imported."""

from __future__ import annotations

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
