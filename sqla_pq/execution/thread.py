"""In-process isolation: a pool of ``concurrency`` threads running jobs of one worker.

Cheap (no fork per job), so it suits short jobs.  With ``prefetch`` the worker holds that many
jobs more than it runs: they wait in the pool's inbox, so a thread that finishes starts the next
job at once instead of after a round trip to the database, and the claims come in bigger
batches.  A waiting job is leased like a running one; it never starts once its lease is in doubt
or the worker stops, and goes back to the queue as it was (``released``: no attempt counted).

A job past its timeout gets ``JobTimeout`` raised inside its thread
(``PyThreadState_SetAsyncExc``, what RQ's thread death penalty does); a coroutine job is
cancelled by asyncio at its timeout instead, and raised into only if it ignores that.  Python
cannot kill a thread, so one stuck in C code keeps running, and the worker keeps the job
``running`` and its lease renewed until the thread really ends: no retry overlaps it.  A job
whose lease the worker lost gets ``LeaseLost`` raised the same way.

Such a stop is raised only under the pool's lock, into a thread whose slot still holds the job
it is meant for; the thread frees its slot under that lock, dropping first any stop still
pending for it.  So a stop that comes as its job ends lands, at worst, in that job's
bookkeeping (which resumes where it was), never in the next job or in a thread idle in the
inbox.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import JobTimeout, LeaseLost
from .call import (
    ASYNC_THREADS,
    ClaimedJob,
    ExecutionContext,
    Outcome,
    crash_outcome,
    execute,
    failure_outcome,
    short_error,
)

log = logging.getLogger("sqla_pq.worker")


@dataclass
class _Slot:
    job: ClaimedJob
    thread_id: int
    started: float
    deadline: float | None
    timeout: float | None
    timed_out: bool = False
    warned: bool = False
    fenced: bool = False
    interrupted: bool = False
    stop_sent: bool = False
    """An exception was raised into its thread (under the pool's lock, like every read)."""


@dataclass
class _Turn:
    """A job thread's job in hand, kept across a stop that lands outside the job's own frames
    (as it starts or ends): the thread takes the turn again where it was, and neither the job
    nor its slot is lost."""

    slot: _Slot | None = None
    outcome: Outcome | None = None


_STOPS = (JobTimeout, LeaseLost, KeyboardInterrupt)
"""What the pool raises into a job's thread: a timeout, a lost lease, an abort."""


ASYNC_GRACE = 1.0
"""Seconds past its timeout a coroutine job gets to end by its own cancellation."""


def async_raise(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Raise ``exc_type`` in another thread at its next bytecode boundary."""
    import ctypes

    res = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    if res > 1:  # pragma: no cover - undo, as the C API documents
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
        return False
    return res == 1


def _drop_pending_stop() -> None:
    """Forget an exception raised into this thread that has not landed yet.

    Only after one was raised: CPython (3.11) marks the whole interpreter as having an
    exception to deliver at every ``PyThreadState_SetAsyncExc`` call, even one that clears,
    and only a thread that then receives one unmarks it.  Called at every job's end, it left
    every thread checking its eval breaker at every function call, and a worker whose main
    thread runs under a profiler (``python -m cProfile``) stopped taking turns."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)


class ThreadExecutor:
    mode = "thread"

    def __init__(self, concurrency: int, ctx: ExecutionContext, wake: Callable[[], None],
                 stuck_grace: float = 5.0, prefetch: int = 0) -> None:
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.ctx = ctx
        self.wake = wake
        self.stuck_grace = stuck_grace
        self._inbox: queue.SimpleQueue[ClaimedJob | None] = queue.SimpleQueue()
        self._outcomes: deque[Outcome] = deque()
        self._slots: dict[int, _Slot] = {}
        self._queued: dict[int, ClaimedJob] = {}
        """Jobs submitted and not started yet (at most ``concurrency + prefetch`` are held)."""
        self._waiting: dict[int, float] = {}
        """The earliest possible deadline of each queued job with a timeout (the worker's loop
        plans its wake-up from it, so a job thread need not wake it when a job starts)."""
        self._submitted = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"sqla_pq-job-{i}", daemon=True)
            for i in range(concurrency)
        ]
        for t in self._threads:
            t.start()

    # -- the worker's side --------------------------------------------------------------------

    def free(self) -> int:
        with self._lock:
            return self.concurrency + self.prefetch - self._submitted

    def busy(self) -> int:
        with self._lock:
            return self._submitted

    def submit(self, job: ClaimedJob) -> None:
        timeout = job.extra.get("timeout")
        with self._lock:
            self._submitted += 1
            self._queued[job.id] = job
            if timeout:
                self._waiting[job.id] = time.monotonic() + timeout
        self._inbox.put(job)

    def has_outcomes(self) -> bool:
        return bool(self._outcomes)

    def collect(self) -> list[Outcome]:
        out = []
        while self._outcomes:
            out.append(self._outcomes.popleft())
        return out

    def running(self) -> list[ClaimedJob]:
        """Every job in hand: started, or waiting in the inbox (its lease matters as much)."""
        with self._lock:
            return [s.job for s in self._slots.values()] + list(self._queued.values())

    def release_waiting(self, job_ids: set[int] | None = None) -> list[ClaimedJob]:
        """Take back queued jobs (these, or all) before they start: each is reported as
        ``released``, for the worker to give back to the queue as it was."""
        with self._lock:
            ids = list(self._queued) if job_ids is None else [i for i in job_ids if i in self._queued]
            dropped = [self._queued.pop(i) for i in ids]
            for job in dropped:
                self._waiting.pop(job.id, None)
                self._outcomes.append(Outcome(job.id, job.attempts, "released", queue=job.queue))
            self._submitted -= len(dropped)
        if dropped:
            self.wake()
        return dropped

    def check_deadlines(self, now: float) -> float | None:
        """Stop jobs past their deadline; return the next deadline (monotonic) to wake for."""
        with self._lock:
            slots = list(self._slots.values())
            # a queued job's deadline bound that passed is not planned for again: the thread
            # that starts the job wakes the loop instead (see _serve_one)
            upcoming = min((d for d in self._waiting.values() if d > now), default=None)
        for slot in slots:
            if slot.deadline is None:
                continue
            deadline = slot.deadline
            if slot.thread_id in ASYNC_THREADS:
                deadline += ASYNC_GRACE  # asyncio cancels it at the timeout itself
            if now >= deadline and not slot.timed_out:
                slot.timed_out = True
                if self._stop(slot, JobTimeout):
                    log.warning("job %s ran past its timeout of %gs; stopping it", slot.job.id,
                                slot.timeout)
            elif slot.timed_out and not slot.warned and now >= slot.deadline + self.stuck_grace:
                slot.warned = True
                log.error(
                    "job %s is still running %gs after its timeout (stuck outside Python?); its "
                    "lease is kept until the thread ends so that no retry overlaps it",
                    slot.job.id, self.stuck_grace,
                )
            if not slot.timed_out:
                upcoming = deadline if upcoming is None else min(upcoming, deadline)
        return upcoming

    def interrupt_all(self) -> list[ClaimedJob]:
        """Second signal: raise in every running job; they are given back by the caller.
        Queued jobs never start (released)."""
        self.release_waiting()
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            slot.interrupted = True
            self._stop(slot, KeyboardInterrupt)
        return [s.job for s in slots]

    def fence(self, job_ids: set[int]) -> None:
        """Stop these jobs (their leases were lost): ``LeaseLost`` is raised in their threads,
        and whatever they end with is reported as ``fenced`` (given back, not recorded).
        Those still queued never start."""
        self.release_waiting(job_ids)
        with self._lock:
            slots = [s for s in self._slots.values() if s.job.id in job_ids and not s.fenced]
            for slot in slots:
                slot.fenced = True
        for slot in slots:
            self._stop(slot, LeaseLost)

    def _stop(self, slot: _Slot, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` in ``slot``'s thread if that slot still runs its job (this
        attempt): under the lock, so that its thread cannot free the slot and take the next
        job meanwhile.  False: the job ended; the stop is too late, and is not raised."""
        with self._lock:
            if self._slots.get(slot.job.id) is not slot:
                return False
            slot.stop_sent = True  # before: the thread may end the job once it lands
            return async_raise(slot.thread_id, exc_type)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.busy()

    def shutdown(self) -> None:
        for _ in self._threads:
            self._inbox.put(None)

    # -- the job threads' side -----------------------------------------------------------------

    def _loop(self) -> None:
        turn = _Turn()
        while True:
            try:
                while self._serve_one(turn):
                    pass
                return
            except _STOPS:  # raised just as its job ended: the turn goes on where it was
                continue

    def _serve_one(self, turn: _Turn) -> bool:
        """Take a job from the inbox and run it (unless a turn is under way), then report
        it; False at shutdown."""
        if turn.slot is None:
            job = self._inbox.get()  # no stop can land here: see _end
            if job is None:
                return False
            slot = self._begin(job, turn)
            if slot is None:  # released while it waited
                return True
            turn.outcome = self._run(job, slot, slot.timeout)
        self._end(turn)
        return True

    def _begin(self, job: ClaimedJob, turn: _Turn) -> _Slot | None:
        """Give ``job`` a slot in this thread; None if it was released while it waited."""
        timeout = job.extra.get("timeout")
        start = time.monotonic()
        slot = _Slot(job, threading.get_ident(), start,
                     start + timeout if timeout else None, timeout)
        with self._lock:
            if self._queued.get(job.id) is not job:
                return None
            del self._queued[job.id]
            self._slots[job.id] = turn.slot = slot  # from here on it may be stopped
            planned = self._waiting.pop(job.id, None)
        if planned is not None and planned <= start:
            self.wake()  # it waited past its deadline bound: the loop must plan for it now
        return slot

    def _end(self, turn: _Turn) -> None:
        """Report the job in hand and free its slot.  A stop still pending is dropped first,
        under the lock: once the slot is gone none can be raised into this thread."""
        slot = turn.slot
        assert slot is not None
        with self._lock:
            if slot.stop_sent:
                _drop_pending_stop()
            outcome = turn.outcome if turn.outcome is not None else _stopped_outcome(slot)
            if outcome.duration is None:  # stopped before it reported: as long as it ran
                outcome.duration = time.monotonic() - slot.started
            self._outcomes.append(outcome)  # before the slot frees: idle implies collectable
            self._slots.pop(slot.job.id, None)
            self._submitted -= 1
            turn.slot = turn.outcome = None
        self.wake()

    def _run(self, job: ClaimedJob, slot: _Slot, timeout: float | None) -> Outcome:
        try:
            outcome = execute(job, self.ctx, async_timeout=timeout)
        except LeaseLost:
            outcome = Outcome(job.id, job.attempts, "fenced", queue=job.queue)
        except KeyboardInterrupt:
            outcome = Outcome(job.id, job.attempts, "interrupted", queue=job.queue)
        except BaseException as exc:  # JobTimeout landing outside the task's own frames
            try:
                outcome = failure_outcome(job, exc, self.ctx)
                outcome.queue = job.queue
            except BaseException as again:  # pragma: no cover - hooks that raise twice
                outcome = Outcome(job.id, job.attempts, "failed", error=short_error(again),
                                  queue=job.queue)
        if slot.fenced:  # whatever it ended with, another worker may hold the job now
            return Outcome(job.id, job.attempts, "fenced", queue=job.queue)
        if slot.timed_out and outcome.kind in ("succeeded", "retry", "failed"):
            text = f"JobTimeout: the job ran past its timeout of {timeout:g}s"
            if outcome.kind == "succeeded":
                # it finished after all, but after its deadline: a timeout is a failure
                outcome = crash_outcome(job, text)
            else:
                outcome.error = text
        return outcome


def _stopped_outcome(slot: _Slot) -> Outcome:
    """The outcome of a job whose stop landed outside its own frames, before it reported:
    what it was stopped for."""
    job = slot.job
    if slot.fenced:
        return Outcome(job.id, job.attempts, "fenced", queue=job.queue)
    if slot.interrupted:
        return Outcome(job.id, job.attempts, "interrupted", queue=job.queue)
    limit = f" of {slot.timeout:g}s" if slot.timeout else ""
    return crash_outcome(job, f"JobTimeout: the job ran past its timeout{limit}")


__all__ = ["ThreadExecutor", "async_raise"]
