"""``call_wrapper``: the hook the framework integrations run each task call inside."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqla_pq.testing import drain
from tests import tasks


def test_the_wrapper_runs_around_the_task_call_where_the_job_runs(pq, tmp_path: Path):
    """In fork mode the wrapper runs in the child, around the call, and gets the job."""
    marks = tmp_path / "marks"

    def wrapper(job: Any, call: Any) -> Any:
        with open(marks, "a") as f:
            f.write(f"before {job.id} {os.getpid()}\n")
        value = call()
        with open(marks, "a") as f:
            f.write(f"after {job.id} {value}\n")
        return value

    job = pq.enqueue(tasks.pid)
    drain(pq, isolation="fork", call_wrapper=wrapper)
    child = pq.get_job(job.id).return_value()
    assert child != os.getpid()
    assert marks.read_text().splitlines() == [f"before {job.id} {child}", f"after {job.id} {child}"]


def test_an_exception_from_the_wrapper_fails_the_job_like_the_tasks_own(pq):
    def wrapper(job: Any, call: Any) -> Any:
        raise LookupError("no app context for you")

    job = pq.enqueue(tasks.add, 1, 2)
    drain(pq, call_wrapper=wrapper)
    done = pq.get_job(job.id)
    assert done.status == "failed" and done.error == "LookupError: no app context for you"


def test_the_tasks_exception_goes_through_the_wrapper(pq):
    seen: list[str] = []

    def wrapper(job: Any, call: Any) -> Any:
        try:
            return call()
        except ValueError as exc:
            seen.append(str(exc))
            raise

    job = pq.enqueue(tasks.fail, "inner")
    drain(pq, call_wrapper=wrapper)
    assert seen == ["inner"]
    assert pq.get_job(job.id).status == "failed"
