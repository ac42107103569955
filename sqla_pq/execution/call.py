"""How one job runs, whatever the isolation: resolve, load, call, and describe the outcome.

This is the code that runs *where the job runs* (a fork child, a worker thread, the caller's
process for ``is_async=False``).  It never touches the database: it turns a claimed row into a
call and the call into an :class:`Outcome` that the worker's parent side records.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import threading
import time
import traceback as tb_module
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import (
    Cancel,
    ChildDied,
    JobTimeout,
    LeaseLost,
    PayloadSignatureError,
    ResultNotStorable,
    Retry,
    SerializationError,
    TaskNotAllowed,
    TaskNotImportable,
)
from ..serialization import (
    DILL,
    JSON,
    RESULT_PURPOSE,
    decode_call,
    dumps_json,
    encode_result,
    sign,
    verify,
)
from ..tasks import import_object, registered, resolve, resolve_method
from ..timeparse import seconds

if TYPE_CHECKING:
    import asyncio

ERROR_LIMIT = 2000
TRACEBACK_LIMIT = 64 * 1024


@dataclass
class ClaimedJob:
    """A job as its worker holds it: the claimed row, plus a workspace the task may change.

    Hooks, exception handlers and multi-step tasks receive this object.
    """

    id: int
    queue: str
    task: str | None
    encoding: str
    args: Any
    kwargs: Any
    payload: bytes | None
    signature: bytes | None
    attempts: int
    failures: int
    max_retries: int
    retry_policy: dict[str, Any] | None
    timeout: float | None
    result_ttl: int
    interruptions: int
    max_interruptions: int
    serial: bool
    workspace: dict[str, Any] | None
    step: int
    flow_id: int | None
    schedule_id: int | None
    client_id: str | None
    priority: int
    expected_at: dt.datetime | None
    run_at: dt.datetime | None
    enqueued_at: dt.datetime | None
    meta: dict[str, Any] | None
    has_dependants: bool
    started_at: dt.datetime | None
    queue_rank: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_tuple(cls, row: Sequence[Any]) -> ClaimedJob:
        """From a row of ``queries.job_claim`` (or ``job_claim_by_id``)."""
        job = cls(*row)  # the claim's RETURNING lists the fields in this order (queries.CLAIM_KEYS)
        if job.payload is not None:
            job.payload = bytes(job.payload)
        if job.signature is not None:
            job.signature = bytes(job.signature)
        return job

    @property
    def name(self) -> str | None:
        """The task (django-db-queue calls a job's definition its name)."""
        return self.task

    @property
    def attempt(self) -> int:
        return self.attempts

    def sort_key(self) -> tuple[Any, ...]:
        return (self.queue_rank, -self.priority, self.expected_at or _FAR, self.run_at or _FAR, self.id)

    def __repr__(self) -> str:
        return f"<ClaimedJob id={self.id} task={self.task!r} attempt={self.attempts}>"


_FAR = dt.datetime.max.replace(tzinfo=dt.UTC)

_current_job: contextvars.ContextVar[ClaimedJob | None] = contextvars.ContextVar(
    "sqla_pq_current_job", default=None
)


def current_job() -> ClaimedJob | None:
    """The job the calling code runs for, inside a task; None elsewhere."""
    return _current_job.get()


@dataclass
class Outcome:
    """What became of one attempt, ready for the worker to record.

    ``kind`` is ``succeeded``, ``retry``, ``failed``, ``cancelled`` or ``step`` (the task's
    doing), or ``interrupted`` (the worker was stopped) or ``fenced`` (the worker lost the
    job's lease): those two give the job back with an interruption counted.
    """

    job_id: int
    attempt: int
    kind: str
    result_json: str | None = None
    result_payload: bytes | None = None
    result_signature: bytes | None = None
    error: str | None = None
    traceback: str | None = None
    retry_delay: float = 0.0
    workspace_json: str | None = None
    queue: str | None = None
    committed: bool = False
    """The completion was already written inside the task's own transaction (atomic tasks)."""
    stale: bool = False
    """With ``committed``: that transaction found the job taken from this attempt (rescued) and
    rolled back; nothing of the attempt is recorded, nor logged or counted as a success."""
    log_result: str | None = None
    duration: float | None = None
    """Seconds the attempt ran where it ran (hooks and the task).  For an attempt that could not
    say (a crash, a kill), the executor fills in how long its process or thread ran."""
    crash: BaseException | None = field(default=None, repr=False)
    """For an attempt that ended without reporting (:func:`crash_outcome`): the exception the
    worker hands to the exception handlers and the failure hook, which could not run where
    the job ran."""


@dataclass
class Hooks:
    """Callables that run where the job runs (the child in fork mode)."""

    pre_execute: Callable[[ClaimedJob], Any] | None = None
    post_execute: Callable[[ClaimedJob, BaseException | None], Any] | None = None
    exc_handlers: Sequence[Callable[..., Any]] = ()


@dataclass
class ExecutionContext:
    """What a run needs besides the job: settings-derived knobs and hooks."""

    allowed_tasks: tuple[str, ...] = ()
    secret_keys: tuple[bytes, ...] = ()
    max_result_bytes: int = 16 * 1024 * 1024
    hooks: Hooks = field(default_factory=Hooks)
    atomic_runner: Callable[[ClaimedJob, Callable[[], Any]], Outcome] | None = None
    """Runs an atomic task inside the transaction that records its completion (set by PQ)."""
    call_wrapper: Callable[[ClaimedJob, Callable[[], Any]], Any] | None = None
    """Runs around each task call, where the job runs: ``call_wrapper(job, call)`` must return
    ``call()``'s value (or let its exception through).  Integrations use it to run tasks inside
    an application's context (Flask) or transaction scope (Pyramid); hooks run outside it."""


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 3] + "..."


def format_traceback(exc: BaseException) -> str:
    text = "".join(tb_module.format_exception(type(exc), exc, exc.__traceback__))
    return text if len(text) <= TRACEBACK_LIMIT else "..." + text[-TRACEBACK_LIMIT:]


@dataclass(frozen=True)
class NextStep:
    """Returned by a multi-step job's runner when tasks remain after the one it ran."""

    total: int


class _Unrunnable(Exception):
    """The job cannot run at all (not allowed, not importable, bad payload): no retry."""


def load_call(job: ClaimedJob, ctx: ExecutionContext) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    """The callable and its arguments.  Signatures are checked before any payload is loaded,
    and a path outside allowed_tasks is refused before anything is imported."""
    if job.task is None:
        raise _Unrunnable(
            f"job {job.id} is a message (pq['{job.queue}'].put), not a task; read it with "
            f"pq['{job.queue}'].get() instead of running a worker on that queue"
        )
    try:
        if job.encoding == DILL:
            verify(ctx.secret_keys, job.id, job.task, job.payload or b"", job.signature)
        entry = registered(job.task)
        if job.encoding != DILL and entry is None:
            func = resolve(job.task, ctx.allowed_tasks)
            args, kwargs, _ = decode_call(job.encoding, job.args, job.kwargs, job.payload,
                                          import_object)
            return func, args, kwargs
        if entry is not None:
            args, kwargs, instance = decode_call(job.encoding, job.args, job.kwargs, job.payload,
                                                 import_object)
            return entry.func, args, kwargs
        from ..tasks import check_allowed

        check_allowed(job.task, ctx.allowed_tasks)
        args, kwargs, instance = decode_call(job.encoding, job.args, job.kwargs, job.payload,
                                             import_object)
        func = (
            resolve_method(job.task, instance, ctx.allowed_tasks)
            if instance is not None
            else resolve(job.task, ctx.allowed_tasks)
        )
        return func, args, kwargs
    except (TaskNotAllowed, TaskNotImportable, PayloadSignatureError, SerializationError) as exc:
        raise _Unrunnable(short_error(exc)) from exc
    except Exception as exc:  # a module that raises or does not compile: retrying won't help
        raise _Unrunnable(f"TaskNotImportable: {job.task}: {short_error(exc)}") from exc


_loops = threading.local()
ASYNC_THREADS: set[int] = set()
"""Threads running a coroutine job now: its timeout is asyncio's to enforce (a cancellation
the coroutine sees), so the thread executor raises into such a thread only as a last resort."""


def run_coroutine(coro: Any, timeout: float | None = None) -> Any:
    """Run a coroutine on this thread's event loop (one per thread, reused)."""
    import asyncio  # here: a fork server that never runs a coroutine stays ~4 MB smaller

    loop = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _loops.loop = loop
    if timeout is not None:
        coro = asyncio.wait_for(coro, timeout)
    task = loop.create_task(coro)
    me = threading.get_ident()
    ASYNC_THREADS.add(me)
    try:
        return loop.run_until_complete(task)
    except TimeoutError:
        raise JobTimeout(f"the job ran past its timeout of {timeout:g}s") from None
    finally:
        ASYNC_THREADS.discard(me)
        if not task.done():  # stopped from outside (the thread executor's timeout, an abort):
            _cancel_and_wait(loop, task)  # the coroutine must not linger in the reused loop


def _cancel_and_wait(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and let it handle its CancelledError now, for a few seconds at most."""
    import asyncio

    task.cancel()
    try:
        loop.run_until_complete(asyncio.wait([task], timeout=5.0))
    except BaseException:  # noqa: BLE001 - the exception that stopped the job is what matters
        pass
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" warning


def call_task(func: Callable[..., Any], args: list[Any], kwargs: dict[str, Any],
              async_timeout: float | None = None) -> Any:
    value = func(*args, **kwargs)
    if isinstance(value, types.CoroutineType):  # not asyncio.iscoroutine: a generator is a value
        value = run_coroutine(value, async_timeout)
    return value


def execute(job: ClaimedJob, ctx: ExecutionContext, *, async_timeout: float | None = None) -> Outcome:
    """Run one attempt of ``job`` here and now, and say what became of it."""
    started = time.perf_counter()
    outcome = _execute(job, ctx, async_timeout)
    outcome.duration = time.perf_counter() - started
    outcome.queue = job.queue
    return outcome


def _execute(job: ClaimedJob, ctx: ExecutionContext, async_timeout: float | None) -> Outcome:
    token = _current_job.set(job)
    error: BaseException | None = None
    try:
        try:
            func, args, kwargs = load_call(job, ctx)
        except _Unrunnable as exc:
            return Outcome(job.id, job.attempts, "failed", error=str(exc),
                           traceback=format_traceback(exc))
        entry = registered(job.task or "")
        if ctx.hooks.pre_execute is not None:
            ctx.hooks.pre_execute(job)
        wrapper = ctx.call_wrapper

        def run(call: Callable[[], Any]) -> Any:
            return call() if wrapper is None else wrapper(job, call)

        try:
            multistep = getattr(func, "__sqla_pq_multistep__", None)
            if multistep is not None:
                value = run(lambda: multistep(job, ctx))
            elif entry is not None and entry.options.atomic and ctx.atomic_runner is not None:
                outcome = ctx.atomic_runner(
                    job, lambda: run(lambda: call_task(func, args, kwargs, async_timeout))
                )
                return outcome
            else:
                value = run(lambda: call_task(func, args, kwargs, async_timeout))
        except (KeyboardInterrupt, LeaseLost):
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit in a task is a failure too
            error = exc
            return failure_outcome(job, exc, ctx)
        if isinstance(value, NextStep):
            return Outcome(job.id, job.attempts, "step", workspace_json=_workspace(job),
                           log_result=f"task {job.step + 1} of {value.total} done")
        try:
            return success_outcome(job, value, ctx)
        except ResultNotStorable as exc:
            error = exc
            return Outcome(job.id, job.attempts, "failed", error=short_error(exc),
                           traceback=format_traceback(exc), workspace_json=_workspace(job))
    finally:
        if ctx.hooks.post_execute is not None:
            try:
                ctx.hooks.post_execute(job, error)
            except Exception:  # a hook must not change the recorded outcome
                import logging

                logging.getLogger("sqla_pq.worker").exception("post_execute hook failed")
        _current_job.reset(token)


def success_outcome(job: ClaimedJob, value: Any, ctx: ExecutionContext) -> Outcome:
    try:
        encoded = encode_result(value, max_bytes=ctx.max_result_bytes)
    except SerializationError as exc:
        raise ResultNotStorable(f"{exc}; the job is failed and not retried") from exc
    signature = None
    if encoded.payload is not None:
        signature = sign(ctx.secret_keys, job.id, RESULT_PURPOSE + (job.task or ""), encoded.payload)
    return Outcome(
        job.id, job.attempts, "succeeded",
        result_json=encoded.json_text, result_payload=encoded.payload,
        result_signature=signature, workspace_json=_workspace(job),
        log_result=_log_value(value),
    )


def failure_outcome(job: ClaimedJob, exc: BaseException, ctx: ExecutionContext) -> Outcome:
    """Decide retry / fail / cancel for an exception, run the exception handler chain, and the
    failure hook when the job fails for good."""
    text, tb = short_error(exc), format_traceback(exc)
    if isinstance(exc, Cancel):
        return Outcome(job.id, job.attempts, "cancelled", error=text, traceback=tb,
                       workspace_json=_workspace(job))
    run_handlers(job, exc, ctx.hooks.exc_handlers)
    if job.failures + 1 <= job.max_retries:
        # Retry("10s") counts an attempt like any failure, but chooses its own delay.
        delay = (
            seconds(exc.delay) if isinstance(exc, Retry) and exc.delay is not None
            else _policy_delay(job)
        )
        return Outcome(job.id, job.attempts, "retry", error=text, traceback=tb,
                       retry_delay=delay, workspace_json=_workspace(job))
    run_failure_hook(job, exc)
    return Outcome(job.id, job.attempts, "failed", error=text, traceback=tb,
                   workspace_json=_workspace(job))


def crash_outcome(job: ClaimedJob, error: str, traceback: str | None = None) -> Outcome:
    """An attempt that ended without reporting (killed, crashed, timed out): it counts against
    ``max_retries`` like an exception.  The worker runs the exception handlers and the failure
    hook for it (:func:`run_crash_hooks`): where the job ran, nothing is left to run them."""
    kind, _, message = error.partition(": ")
    crash = JobTimeout(message) if kind == "JobTimeout" else ChildDied(
        message if kind == "ChildDied" else error)
    if job.failures + 1 <= job.max_retries:
        return Outcome(job.id, job.attempts, "retry", error=error, traceback=traceback,
                       retry_delay=_policy_delay(job), queue=job.queue, crash=crash)
    return Outcome(job.id, job.attempts, "failed", error=error, traceback=traceback,
                   queue=job.queue, crash=crash)


def run_crash_hooks(job: ClaimedJob, outcome: Outcome, hooks: Hooks) -> None:
    """What :func:`failure_outcome` runs for an exception, for an attempt that crashed or timed
    out: the handler chain (Sentry's among them), then the failure hook if it failed for good."""
    if outcome.crash is None:
        return
    run_handlers(job, outcome.crash, hooks.exc_handlers)
    if outcome.kind == "failed":
        run_failure_hook(job, outcome.crash)


def _policy_delay(job: ClaimedJob) -> float:
    from ..enqueue import retry_delay

    return retry_delay(job.retry_policy, job.failures + 1)


def run_handlers(job: ClaimedJob, exc: BaseException, handlers: Sequence[Callable[..., Any]]) -> None:
    """RQ's chain: each handler gets (job, exc_type, exc_value, traceback); one that returns
    False stops the chain.  A handler that raises is logged and the chain goes on."""
    for handler in handlers:
        try:
            go_on = handler(job, type(exc), exc, exc.__traceback__)
        except Exception:
            import logging

            logging.getLogger("sqla_pq.worker").exception("exception handler %r failed", handler)
            continue
        if go_on is False:
            break


def run_failure_hook(job: ClaimedJob, exc: BaseException) -> None:
    """django-db-queue's failure hook (job, exception), for jobs defined with one."""
    hook = job.extra.get("failure_hook")
    if hook is None:
        from ..tasks import registered as lookup

        entry = lookup(job.task or "")
        hook = entry.options.extra.get("failure_hook") if entry else None
    if hook is None:
        return
    try:
        if isinstance(hook, str):
            hook = import_object(hook)
        hook(job, exc)
    except Exception:
        import logging

        logging.getLogger("sqla_pq.worker").exception("failure hook of job %s failed", job.id)


def _workspace(job: ClaimedJob) -> str | None:
    if job.workspace is None:
        return None
    try:
        return dumps_json(job.workspace)
    except (TypeError, ValueError):
        return None


def _log_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


__all__ = [
    "JSON", "ClaimedJob", "ExecutionContext", "Hooks", "Outcome", "current_job", "execute",
    "failure_outcome", "run_coroutine", "success_outcome",
]
