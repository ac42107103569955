"""Turning calls into job rows, and adding them to a unit of work.

A ``Queue`` bound to the caller's session executes its INSERT in the caller's transaction and
never commits or flushes: the job exists if and only if that transaction commits, and the NOTIFY
its insert trigger raises is delivered only then.  A queue without a session writes in its own
one-statement transaction.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import queries
from .errors import InvalidOption, InvalidQueueName, TaskNotImportable
from .serialization import JSON, EncodedCall, dumps_json, encode_call
from .states import JobStatus
from .tables import JOB_ATTRIBUTE_DEFAULTS
from .tasks import (
    TaskRef,
    check_allowed,
    registered_options,
    registry_generation,
    task_ref,
)
from .timeparse import Duration, When, parse_when, seconds

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .models import Job
    from .pq import PQ
    from .settings import Settings

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-/:]{1,64}$")

RESERVED_OPTIONS = frozenset(
    {
        "run_at", "schedule_at", "expected_at", "priority", "timeout", "result_ttl",
        "max_retries", "retry_in", "client_id", "depends_on",
    }
)
"""Keyword names ``Queue.enqueue`` keeps for itself; the rest go to the task.  To pass one of
these to the task, use ``enqueue_call(func, kwargs={...})``."""


SCHEDULE_KEYWORDS = frozenset(
    {"repeat", "interval", "between", "weekdays", "until", "timezone", "key", "max_concurrent"}
)
"""Keyword names ``Queue.schedule`` keeps for the schedule itself."""


def check_queue_name(name: str) -> str:
    if not isinstance(name, str) or not QUEUE_NAME.match(name):
        raise InvalidQueueName(
            f"invalid queue name {name!r}: use 1-64 letters, digits and _ . - / :"
        )
    return name


class Priority:
    """Named priorities (python-pq's five levels); any int from -32768 to 32767 works."""

    BATCH = 0
    LOW = 25
    NORMAL = 50
    HIGH = 75
    CRITICAL = 100


@dataclass(frozen=True)
class Backoff:
    """A retry delay that grows: ``delay * factor ** (n - 1)`` for the n-th retry, capped."""

    delay: Duration = 1
    factor: float = 2.0
    max: Duration = "1h"

    def policy(self) -> dict[str, float]:
        if self.factor < 1:
            raise InvalidOption(f"Backoff factor must be >= 1, not {self.factor!r}")
        return {
            "delay": seconds(self.delay, what="retry delay"),
            "factor": float(self.factor),
            "max": seconds(self.max, what="retry max delay"),
        }


def retry_policy(retry_in: Any) -> dict[str, float] | None:
    if retry_in is None:
        return None
    if isinstance(retry_in, Backoff):
        return retry_in.policy()
    if isinstance(retry_in, Mapping):
        return Backoff(**retry_in).policy()
    return {"delay": seconds(retry_in, what="retry_in"), "factor": 1.0, "max": 0.0}


def retry_delay(policy: Mapping[str, Any] | None, failures: int) -> float:
    """Seconds before the ``failures``-th retry."""
    if not policy:
        return 0.0
    delay = float(policy.get("delay", 0))
    factor = float(policy.get("factor", 1.0))
    cap = float(policy.get("max") or 0)
    value = delay * factor ** max(failures - 1, 0)
    return min(value, cap) if cap > 0 and factor > 1 else value


class FixedInsert:
    """The insert of one job with JSON arguments, and its parameters but ``args`` and
    ``kwargs``: the same for every call of a plan.  Compared by identity, so a connection can
    key the statement it prepared for this plan on it."""

    __slots__ = ("statement", "fixed")
    VARYING = ("args", "kwargs")

    def __init__(self, statement: Any, fixed: dict[str, Any]) -> None:
        self.statement = statement
        self.fixed = fixed

    def params(self, encoded: EncodedCall) -> dict[str, Any]:
        """Every parameter of the insert of this call."""
        return {**self.fixed, "args": encoded.args_json, "kwargs": encoded.kwargs_json}


@dataclass
class JobSpec:
    """One job row before insertion (the values of ``queries.INSERT_COLUMNS``)."""

    queue: str
    ref: TaskRef | None
    encoded: EncodedCall
    status: str = JobStatus.QUEUED.value
    priority: int = Priority.NORMAL
    run_at: dt.datetime | None = None
    delay: float | None = None
    expected_at: dt.datetime | None = None
    max_retries: int = 0
    retry_policy: dict[str, float] | None = None
    timeout: float | None = None
    result_ttl: int = 500
    client_id: str | None = None
    serial: bool = False
    flow_id: int | None = None
    parents: tuple[int, ...] = ()
    on_parent_failure: str = "cancel"
    schedule_id: int | None = None
    workspace: dict[str, Any] | None = None
    max_interruptions: int = 3
    meta: dict[str, Any] | None = None
    id: int | None = None
    signature: bytes | None = None

    @property
    def task(self) -> str | None:
        return self.ref.name if self.ref is not None else None

    def with_encoded(self, encoded: EncodedCall) -> JobSpec:
        """A copy for other arguments (``copy.copy`` of a dataclass is three times slower).
        Memos (``insert``, ``job_values``) are shared: they do not depend on the arguments."""
        spec = object.__new__(JobSpec)
        spec.__dict__.update(self.__dict__)
        spec.encoded = encoded
        return spec

    def job_values(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """``defaults`` (every column of the Job) updated with what this spec sets of its
        Job that does not depend on the call's arguments or the inserted row.  Kept with the
        spec, so the copies of a call plan's template share it."""
        values = self.__dict__.get("_job_values")
        if values is None:
            values = self.__dict__["_job_values"] = {**defaults, **dict(
                queue=self.queue, task=self.task, priority=self.priority,
                expected_at=self.expected_at, max_retries=self.max_retries,
                retry_policy=self.retry_policy, timeout=self.timeout, result_ttl=self.result_ttl,
                client_id=self.client_id, serial=self.serial, flow_id=self.flow_id,
                on_parent_failure=self.on_parent_failure, schedule_id=self.schedule_id,
                workspace=self.workspace, max_interruptions=self.max_interruptions,
                meta=self.meta,
            )}
        return values

    def insert(self) -> tuple[Any, dict[str, Any]]:
        """``queries.job_insert_for(self.params())``: the one-job insert and its parameters.
        For JSON arguments only ``args`` and ``kwargs`` vary from call to call, so the statement
        and the other parameters are kept with the spec (shared by a plan's copies)."""
        memo = self.fixed_insert()
        if memo is None:
            return queries.job_insert_for(self.params())
        return memo.statement, memo.params(self.encoded)

    def fixed_insert(self) -> FixedInsert | None:
        """The insert of this spec's jobs with JSON arguments, made once and kept with the spec;
        None when it takes another encoding, an id or a signature."""
        e = self.encoded
        if e.encoding != JSON or self.id is not None or self.signature is not None:
            return None
        memo = self.__dict__.get("_json_insert")
        if memo is None:
            statement, given = queries.job_insert_for(self.params())
            fixed = {k: v for k, v in given.items() if k not in FixedInsert.VARYING}
            memo = self.__dict__["_json_insert"] = FixedInsert(statement, fixed)
        return memo

    def params(self) -> dict[str, Any]:
        e = self.encoded
        return {
            "id": self.id,
            "queue": self.queue,
            "task": self.task,
            "status": self.status,
            "priority": self.priority,
            "encoding": e.encoding,
            "args": e.args_json,
            "kwargs": e.kwargs_json,
            "payload": e.payload,
            "signature": self.signature,
            "run_at": self.run_at,
            "delay": self.delay,
            "expected_at": self.expected_at,
            "max_retries": self.max_retries,
            "retry_policy": dumps_json(self.retry_policy) if self.retry_policy else None,
            "timeout": self.timeout,
            "result_ttl": self.result_ttl,
            "client_id": self.client_id,
            "serial": self.serial,
            "flow_id": self.flow_id,
            "waiting_on": 0,
            "on_parent_failure": self.on_parent_failure,
            "schedule_id": self.schedule_id,
            "workspace": dumps_json(self.workspace) if self.workspace is not None else None,
            "max_interruptions": self.max_interruptions,
            "meta": dumps_json(self.meta) if self.meta is not None else None,
            "error": None,
        }


@dataclass(frozen=True)
class CallPlan:
    """What :meth:`Queue.build` makes of a call of one task with no per-call option, but its
    arguments, and what it was made from: reused while those stay the same."""

    settings: Settings
    generation: int
    """The task registry's generation (:func:`~sqla_pq.tasks.registry_generation`)."""
    template: JobSpec
    insert: FixedInsert | None
    """The template's insert with JSON arguments (:meth:`JobSpec.fixed_insert`).  Only a
    plan's insert is worth preparing with its fixed values written in
    (:func:`~sqla_pq.db.run_fixed`): a spec built for one call would prepare per call."""
    job_values: dict[str, Any]
    """The attributes of every Job of the plan with JSON arguments, but its arguments and what
    the insert returns (``queries.INSERT_RETURNING``): copied, not rebuilt, for each call."""

    @classmethod
    def of(cls, settings: Settings, generation: int, template: JobSpec) -> CallPlan:
        values = dict(template.job_values(JOB_ATTRIBUTE_DEFAULTS))
        values.update(encoding=JSON, payload=None, signature=None, waiting_on=0, error=None)
        return cls(settings, generation, template, template.fixed_insert(), values)


MAX_CALL_PLANS = 256
"""Call plans a PQ keeps (one per queue, queue defaults and task enqueued without options);
past it they are dropped and made again."""


class UniformSpecs(Sequence[JobSpec]):
    """Job specs that differ only in their arguments, built when looked at."""

    def __init__(self, template: JobSpec, encodeds: Sequence[EncodedCall]) -> None:
        self.template = template
        self.encodeds = encodeds

    def __len__(self) -> int:
        return len(self.encodeds)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.template.with_encoded(self.encodeds[index])


def queue_for(func: Any, queue: str | None) -> str | None:
    """Where ``pq.enqueue(func)`` puts a call that names no queue: the registered task's own
    queue (``@pq.task(queue="emails")``), as ``func.delay()`` would; else the default."""
    if queue is not None:
        return queue
    try:
        options = registered_options(task_ref(func).name)
    except TaskNotImportable:
        return None  # building the job says what is wrong with func
    return options.queue if options is not None else None


def queue_for_calls(calls: Sequence[Any], queue: str | None) -> str | None:
    """:func:`queue_for` of a bulk enqueue: the task's queue when every call is of tasks that
    share one (else the default queue, or the ``queue=`` given)."""
    if queue is not None or not calls:
        return queue
    try:
        funcs = {call if callable(call) or isinstance(call, str) else tuple(call)[0]
                 for call in calls}
    except (TypeError, IndexError):  # unhashable or malformed: Queue.enqueue_many says what
        return None
    queues = {queue_for(func, None) for func in funcs}
    return queues.pop() if len(queues) == 1 else None


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the reserved options from the task's own keyword arguments."""
    options = {k: kwargs[k] for k in kwargs if k in RESERVED_OPTIONS}
    rest = {k: v for k, v in kwargs.items() if k not in RESERVED_OPTIONS}
    return options, rest


def parent_ids(depends_on: Any) -> tuple[int, ...]:
    if depends_on is None:
        return ()
    items: Iterable[Any] = (
        depends_on if isinstance(depends_on, (list, tuple, set, frozenset)) else (depends_on,)
    )
    ids: list[int] = []
    for item in items:
        members = getattr(item, "job_ids", None)  # a Group: wait for all its jobs
        if members is not None:
            ids.extend(members)
            continue
        value = getattr(item, "id", item)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidOption(f"depends_on takes jobs or job ids, not {item!r}")
        ids.append(value)
    return tuple(dict.fromkeys(ids))


class Queue:
    """A named queue.  ``pq.queue("emails", session=session)`` binds it to your transaction."""

    def __init__(
        self,
        pq: PQ,
        name: str | None = None,
        *,
        session: Session | None = None,
        serial: bool | None = None,
        is_async: bool = True,
        timeout: Duration | None = None,
        result_ttl: int | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        retry_in: Any = None,
    ) -> None:
        self.pq = pq
        self.name = check_queue_name(name or pq.settings.default_queue)
        self.session = session
        self.serial = (
            bool(serial) if serial is not None else self.name in pq.settings.serial_queues
        )
        self.is_async = is_async
        self.timeout = timeout
        self.result_ttl = result_ttl
        self.priority = priority
        self.max_retries = max_retries
        self.retry_in = retry_in

    def __repr__(self) -> str:
        bound = " session-bound" if self.session is not None else ""
        return f"<Queue {self.name!r}{' serial' if self.serial else ''}{bound}>"

    # -- building rows -------------------------------------------------------------------------

    def build(
        self,
        func: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        run_at: When | None = None,
        schedule_at: When | None = None,
        expected_at: When | None = None,
        priority: int | None = None,
        timeout: Duration | None | bool = False,
        result_ttl: int | None = None,
        max_retries: int | None = None,
        retry_in: Any = None,
        client_id: str | None = None,
        depends_on: Any = None,
        on_parent_failure: str = "cancel",
        flow_id: int | None = None,
        schedule_id: int | None = None,
        workspace: dict[str, Any] | None = None,
        max_interruptions: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> JobSpec:
        """Validate the options and encode the call; touches no database."""
        settings = self.pq.settings
        ref = task_ref(func) if func is not None else None
        task_defaults = registered_options(ref.name) if ref is not None else None
        if ref is not None and task_defaults is None:
            # the workers would refuse it; say so now (the CLI's enqueue goes through here too)
            check_allowed(ref.name, settings.allowed_tasks)
        what = ref.name if ref is not None else f"message on {self.name}"
        encoded = encode_call(
            tuple(args), dict(kwargs or {}), instance=ref.instance if ref else None,
            max_bytes=settings.max_payload_bytes, warn_bytes=settings.warn_payload_bytes, what=what,
        )

        if run_at is not None and schedule_at is not None:
            raise InvalidOption("give run_at or schedule_at, not both (they are the same option)")
        td = task_defaults
        if td is not None and run_at is None and schedule_at is None:
            run_at = td.extra.get("run_at")  # @pq.task(schedule_at="1h"); a call's own wins
        if td is not None and expected_at is None:
            expected_at = td.extra.get("expected_at")
        when = parse_when(run_at if run_at is not None else schedule_at, what="run_at")
        expected = parse_when(expected_at, what="expected_at") if expected_at is not None else None

        def pick(value: Any, *fallbacks: Any) -> Any:
            for v in (value, *fallbacks):
                if v is not None:
                    return v
            return None

        prio = pick(priority, td and td.priority, self.priority, Priority.NORMAL)
        if isinstance(prio, bool) or not isinstance(prio, int) or not -32768 <= prio <= 32767:
            raise InvalidOption(f"priority must be an int from -32768 to 32767, not {prio!r}")
        retries = pick(max_retries, td and td.max_retries, self.max_retries, 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidOption(f"max_retries must be a non-negative int, not {retries!r}")
        ttl = pick(result_ttl, td and td.result_ttl, self.result_ttl, settings.result_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < -1:
            raise InvalidOption(f"result_ttl must be -1 (forever), 0 (delete at once) or seconds, "
                                f"not {ttl!r}")
        if timeout is False:
            timeout = pick(td and td.timeout, self.timeout, settings.job_timeout)
        timeout_s = None if timeout is None or timeout is True else seconds(timeout, what="timeout")
        if timeout_s is not None and timeout_s <= 0:
            raise InvalidOption(f"timeout must be positive (or None for no limit), not {timeout!r}")
        policy = retry_policy(pick(retry_in, td and td.retry_in, self.retry_in))
        if client_id is not None and (not isinstance(client_id, str) or not 0 < len(client_id) <= 255):
            raise InvalidOption(f"client_id must be a string of 1-255 characters, not {client_id!r}")
        if on_parent_failure not in ("cancel", "fail"):
            raise InvalidOption(
                f"on_parent_failure must be 'cancel' or 'fail', not {on_parent_failure!r}"
            )
        interruptions = pick(max_interruptions, settings.max_interruptions)
        parents = parent_ids(depends_on)
        spec = JobSpec(
            queue=self.name,
            ref=ref,
            encoded=encoded,
            status=JobStatus.DEFERRED.value if parents else JobStatus.QUEUED.value,
            priority=prio,
            run_at=when.at,
            delay=when.delay,
            max_retries=retries,
            retry_policy=policy,
            timeout=timeout_s,
            result_ttl=ttl,
            client_id=client_id,
            serial=self.serial or bool(td and td.serial),
            flow_id=flow_id,
            parents=parents,
            on_parent_failure=on_parent_failure,
            schedule_id=schedule_id,
            workspace=workspace,
            max_interruptions=interruptions,
            meta=meta,
        )
        if expected is not None:
            # expected_at only orders jobs; the milliseconds between this clock and the
            # database's do not change an ordering expressed in seconds or more.
            spec.expected_at = expected.at or (
                dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expected.delay or 0.0)
            )
        return spec

    def call_plan(self, func: Any) -> CallPlan | None:
        """The plan of a call of ``func`` without options: the task's and the queue's defaults
        resolved at its first call and kept by the PQ (``pq.enqueue`` makes a Queue per call),
        since resolving them cost as much Python as the rest of a plain enqueue (see
        benchmarks/README.md, E1).  Made again when the settings, the task registry or the
        queue's defaults change; None for a call that must be built each time."""
        plans = self.pq._call_plans
        key = (self.name, self.serial, self.timeout, self.result_ttl, self.priority,
               self.max_retries, self.retry_in, func)
        try:
            plan = plans.get(key)
        except TypeError:  # an unhashable callable, or retry_in given as a dict
            return None
        settings = self.pq.settings
        if (plan is None or plan.settings is not settings
                or plan.generation != registry_generation()):
            plan = self._plan(func, settings)
            if plan is None:
                return None
            if len(plans) >= MAX_CALL_PLANS:
                plans.clear()
            plans[key] = plan
        return plan

    def _plan(self, func: Any, settings: Settings) -> CallPlan | None:
        """None for what must be built at every call: a bound method (it travels with its
        instance) and a task whose ``expected_at`` delay counts from each call's time."""
        generation = registry_generation()
        ref = task_ref(func)
        if ref.instance is not None:
            return None
        options = registered_options(ref.name)
        if options is not None and options.extra.get("expected_at") is not None:
            return None
        template = self.build(func)  # validates as every call would, raising the same errors
        return CallPlan.of(settings, generation, template)

    # -- enqueueing ----------------------------------------------------------------------------

    def enqueue(self, func: Any, *args: Any, **kwargs: Any) -> Job:
        """Enqueue ``func(*args, **kwargs)``; reserved option names (``run_at``, ``priority``,
        ``timeout``, ``result_ttl``, ``max_retries``, ``retry_in``, ``client_id``,
        ``depends_on``, ``expected_at``) configure the job instead."""
        if not kwargs:
            return self.enqueue_call(func, args)
        options, task_kwargs = split_options(kwargs)
        return self.enqueue_call(func, args=args, kwargs=task_kwargs, **options)

    def enqueue_call(
        self,
        func: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Job:
        """Enqueue with the task's arguments and the job's options kept apart (RQ's form)."""
        plan = None if options else self.call_plan(func)
        if plan is None:
            spec = self.build(func, args, kwargs, **options)
        else:
            settings = plan.settings
            encoded = encode_call(args, kwargs or {}, max_bytes=settings.max_payload_bytes,
                                  warn_bytes=settings.warn_payload_bytes,
                                  what=plan.template.task or "")
            if self.is_async and self.session is None:
                return self.pq._insert_planned(plan, encoded)
            spec = plan.template.with_encoded(encoded)
        if not self.is_async:
            return self.pq._run_inline(spec, session=self.session)
        return self.pq._insert_one(spec, session=self.session)

    def enqueue_many(self, calls: Iterable[Any], **options: Any) -> Sequence[Job]:
        """Enqueue many calls in one statement.  Each call is ``func``, ``(func, args)``,
        ``(func, args, kwargs)`` or ``(func, args, kwargs, options)``; ``options`` apply to all."""
        specs = []
        shared: dict[str, JobSpec] = {}
        encodeds: list[EncodedCall] = []
        uniform = True  # every call a plain call of one task with the shared options
        for call in calls:
            if callable(call) or isinstance(call, str):
                func, args, kwargs, own = call, (), {}, {}
            else:
                parts = tuple(call)
                func = parts[0]
                args = parts[1] if len(parts) > 1 else ()
                kwargs = parts[2] if len(parts) > 2 else {}
                own = parts[3] if len(parts) > 3 else {}
            if own or not (callable(func) or isinstance(func, str)):
                uniform = False
                specs.append(self.build(func, args, kwargs, **{**options, **own}))
                continue
            # Calls of one task with the same options share everything but their arguments:
            # validate the options once, encode each call.
            ref = task_ref(func)
            template = shared.get(ref.name) if ref.instance is None else None
            if template is None:
                spec = self.build(func, args, kwargs, **options)
                if ref.instance is None:
                    shared[ref.name] = spec
                uniform = uniform and not specs and ref.instance is None
                specs.append(spec)
                encodeds.append(spec.encoded)
                continue
            settings = self.pq.settings
            encodeds.append(encode_call(
                tuple(args), dict(kwargs or {}), max_bytes=settings.max_payload_bytes,
                warn_bytes=settings.warn_payload_bytes, what=ref.name,
            ))
            if not uniform:
                specs.append(template.with_encoded(encodeds[-1]))
        if uniform and specs and self.is_async:
            # the common bulk case: one task, shared options; only the arguments vary
            return self.pq._insert_uniform(specs[0], encodeds, session=self.session)
        if uniform and specs:
            specs = UniformSpecs(specs[0], encodeds)
        if not self.is_async:
            return [self.pq._run_inline(spec, session=self.session) for spec in specs]
        return self.pq._insert(specs, session=self.session)

    def schedule(self, when: When, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``func`` at ``when`` (django-pq): a datetime, ``"now"``, an ISO 8601 string, or a
        delay.  With ``repeat``/``interval``/``between``/``weekdays``/``until`` among the
        keyword arguments it repeats (see :meth:`schedule_call`)."""
        schedule_options = {k: kwargs.pop(k) for k in list(kwargs) if k in SCHEDULE_KEYWORDS}
        options, task_kwargs = split_options(kwargs)
        return self.schedule_call(when, func, args=args, kwargs=task_kwargs,
                                  **schedule_options, **options)

    def schedule_call(self, when: When, func: Any, args: Sequence[Any] = (),
                      kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """django-pq's schedule_call.  Once at ``when`` (a Job, like ``enqueue(run_at=when)``),
        or a repeating Schedule with ``repeat`` (a count of repeats after the first run, -1 for
        ever, or a datetime), ``interval`` (seconds, timedelta, relativedelta), ``between``
        (``"2:00/18:30"``, ``"2.00-18.30"``, ``"2-18:30"``), ``weekdays`` (``MO``... or 0-6),
        ``until``, ``timezone``; plus the job options (timeout, max_retries, ...)."""
        return self.pq._schedule_call(self, when, func, args, kwargs, **options)

    def __len__(self) -> int:
        return self.pq.queue_depths().get(self.name, 0)

    @property
    def count(self) -> int:
        """Jobs waiting in this queue (queued), as RQ's ``Queue.count``."""
        return len(self)
