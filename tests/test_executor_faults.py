"""Executors under faults: a job whose process cannot start (fork isolation) goes back to the
queue instead of staying ``running``; a stop meant for a job that just ended (thread isolation)
never reaches the next job, nor loses it."""

from __future__ import annotations

import collections
import errno
import linecache
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sqla_pq import queries
from sqla_pq.execution import fork, thread
from sqla_pq.execution.call import ClaimedJob
from sqla_pq.execution.fork import ForkExecutor
from sqla_pq.execution.thread import ThreadExecutor
from tests import tasks
from tests.helpers import BackgroundWorker, scalar

# -- helpers ------------------------------------------------------------------------------------


class FlakyOs:
    """``os`` as the fork executor sees it, where the listed calls (1-based) of ``pipe`` or
    ``fork`` fail with EAGAIN, as on a system out of processes or descriptors."""

    def __init__(self, **fail: set[int]) -> None:
        self.fail = fail
        self.calls: collections.Counter[str] = collections.Counter()
        self.pipes: list[tuple[int, int]] = []
        """(descriptor, inode) of every pipe end it opened: to tell a leaked one."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if self.calls[name] in self.fail.get(name, ()):
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    def pipe(self) -> tuple[int, int]:
        self._call("pipe")
        ends = os.pipe()
        self.pipes += [(fd, os.fstat(fd).st_ino) for fd in ends]
        return ends

    def fork(self) -> int:
        self._call("fork")
        return os.fork()

    def leaked(self) -> list[int]:
        """Pipe ends it opened that are still open (the same pipe, not a reused number)."""
        out = []
        for fd, inode in self.pipes:
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if stat.S_ISFIFO(st.st_mode) and st.st_ino == inode:
                out.append(fd)
        return out


def _claim(pq: Any, func: Callable[..., Any], *args: Any) -> ClaimedJob:
    """Enqueue and claim one job, as a worker would."""
    job = pq.enqueue(func, *args)
    with pq._cursor() as runner:
        row = runner.run(queries.job_claim(("default",)),
                         {"batch": 1, "worker": "w", "lease": 60.0})[0]
    claimed = ClaimedJob.from_tuple(row)
    assert claimed.id == job.id
    claimed.extra["lease_ok_at"] = time.monotonic()
    return claimed


# -- fork isolation: a job whose process cannot start --------------------------------------------


def test_a_job_whose_process_cannot_be_forked_goes_back_to_the_queue_and_runs_later(
        pq, engine, monkeypatch, caplog):
    flaky = FlakyOs(fork={1})
    monkeypatch.setattr(fork, "os", flaky)
    job = pq.enqueue(tasks.add, 2, 3)
    with BackgroundWorker(pq, ["default"], isolation="fork", maintenance=False):
        assert pq.wait(job.id, timeout=15) == 5
    done = pq.get_job(job.id)
    assert (done.attempts, done.failures, done.interruptions) == (1, 0, 0), \
        "a job that never started was charged for it"
    assert flaky.calls["fork"] == 2
    assert scalar(engine, "SELECT count(*) FROM pq_job WHERE status = 'running'") == 0
    assert f"could not start a process for job {job.id}" in caplog.text
    assert os.strerror(errno.EAGAIN) in caplog.text
    assert flaky.leaked() == []


def test_the_jobs_of_a_batch_after_one_that_cannot_be_forked_still_run(pq, engine, monkeypatch):
    flaky = FlakyOs(fork={2})
    monkeypatch.setattr(fork, "os", flaky)
    jobs = [pq.enqueue(tasks.add, i, 1) for i in range(4)]
    with BackgroundWorker(pq, ["default"], isolation="fork", concurrency=4, maintenance=False):
        for i, job in enumerate(jobs):
            assert pq.wait(job.id, timeout=15) == i + 1
    assert [pq.get_job(j.id).attempts for j in jobs] == [1] * 4
    assert flaky.calls["fork"] == 5
    assert scalar(engine, "SELECT count(*) FROM pq_job WHERE status = 'running'") == 0
    assert flaky.leaked() == []


def test_a_job_whose_pipe_cannot_be_opened_is_released_and_leaks_no_descriptor(pq, monkeypatch):
    flaky = FlakyOs(pipe={2})  # the lease pipe: the outcome pipe is open by then
    monkeypatch.setattr(fork, "os", flaky)
    claimed = _claim(pq, tasks.add, 1, 1)
    executor = ForkExecutor(1, pq.execution_context(), lambda: None, lease_guard=30.0)
    try:
        executor.submit(claimed)
        assert [(o.job_id, o.kind) for o in executor.collect()] == [(claimed.id, "released")]
        assert executor.running() == [] and flaky.calls["fork"] == 0
        assert executor.free() == 0, "it would claim again at once, and fail again"
    finally:
        executor.shutdown()
    assert len(flaky.pipes) == 2 and flaky.leaked() == []


# -- thread isolation: a stop raised as its job ends ---------------------------------------------

_events: dict[str, threading.Event] = {}


def _event(name: str) -> threading.Event:
    return _events.setdefault(name, threading.Event())


@pytest.fixture(autouse=True)
def _fresh_events() -> Iterator[None]:
    _events.clear()
    yield
    for event in list(_events.values()):
        event.set()  # no job thread is left waiting


def gated(name: str) -> str:
    """A job that says it started, then waits for the test to let it finish."""
    _event(f"{name}:started").set()
    assert _event(f"{name}:go").wait(30), "the test never let the job finish"
    return name


def _raise_late(monkeypatch, finish: Callable[[], None], moved_on: Callable[[], bool]) -> None:
    """Make the executor's next stop land late, as the scheduler may make it: the job ends
    first (``finish``), then the stop waits until its thread has moved on (``moved_on``), at
    most a second (a thread the executor holds back cannot move on: the stop goes in then)."""
    real = thread.async_raise

    def late(thread_id: int, exc_type: type[BaseException]) -> bool:
        monkeypatch.setattr(thread, "async_raise", real)
        finish()
        deadline = time.monotonic() + 1.0
        while not moved_on() and time.monotonic() < deadline:
            time.sleep(0.005)
        return real(thread_id, exc_type)

    monkeypatch.setattr(thread, "async_raise", late)


def _idle_in_inbox(t: threading.Thread) -> bool:
    """``t`` waits for its next job (blocked in the inbox)."""
    frame = sys._current_frames().get(t.ident or -1)
    return frame is not None and "_inbox.get()" in linecache.getline(frame.f_code.co_filename,
                                                                     frame.f_lineno)


@pytest.mark.parametrize("stop", ["timeout", "lease"])
def test_a_stop_for_a_job_that_just_ended_does_not_reach_the_next_job(pq, monkeypatch, stop):
    first, second = _claim(pq, gated, "first"), _claim(pq, gated, "second")
    first.extra["timeout"] = 60.0
    executor = ThreadExecutor(1, pq.execution_context(), lambda: None, prefetch=1)
    try:
        executor.submit(first)
        executor.submit(second)  # waits in the inbox for the one thread
        assert _event("first:started").wait(10)
        _raise_late(monkeypatch, _event("first:go").set, _event("second:started").is_set)
        if stop == "timeout":
            executor.check_deadlines(time.monotonic() + 120)
        else:
            executor.fence({first.id})
        _event("second:go").set()
        assert executor.wait_idle(10)
        outcomes = {o.job_id: o for o in executor.collect()}
    finally:
        executor.shutdown()
    assert outcomes[second.id].kind == "succeeded", outcomes[second.id].error
    if stop == "timeout":
        assert outcomes[first.id].kind == "failed" and "JobTimeout" in outcomes[first.id].error
    else:
        assert outcomes[first.id].kind == "fenced"


def test_a_stop_for_a_job_that_just_ended_loses_no_job_taken_from_the_inbox(pq, monkeypatch):
    first = _claim(pq, gated, "first")
    executor = ThreadExecutor(1, pq.execution_context(), lambda: None)
    try:
        executor.submit(first)
        assert _event("first:started").wait(10)
        _raise_late(monkeypatch, _event("first:go").set,
                    lambda: _idle_in_inbox(executor._threads[0]))
        executor.fence({first.id})
        second = _claim(pq, tasks.add, 2, 3)
        executor.submit(second)
        assert executor.wait_idle(5), "the next job never ran: its slot is lost"
        outcomes = {o.job_id: o for o in executor.collect()}
    finally:
        executor.shutdown()
    assert outcomes[first.id].kind == "fenced"
    assert outcomes[second.id].kind == "succeeded", outcomes[second.id].error
    assert executor.running() == [] and executor.free() == 1
