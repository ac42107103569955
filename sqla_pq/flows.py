"""Workflows: Flow (django-pq), groups (fan-out and fan-in), multi-step jobs (django-db-queue).

All three are built on one mechanism, job dependencies: a job with parents waits ``deferred``
until every parent succeeded; a parent that failed or was cancelled cancels (or fails, as each
dependant chose) everything downstream, saying which parent and why.

- ``with pq.flow(queue, name=...) as f:`` inserts each step depending on the one before, in one
  transaction (the steps exist together or not at all).  Flows are rows (``pq_flow``) and expire
  with their last job.
- ``pq.group(calls)`` fans out; ``depends_on=group`` (or ``f.group(...)`` inside a flow) fans in.
- ``pq.define_job(name, tasks=[...])`` and ``pq.create_job(name, workspace=...)``: one job whose
  tasks run in order, each given the job; ``job.workspace`` changes persist from one task to the
  next (between two tasks the job is back in the queue, django-db-queue's READY, so any worker may
  run the next one).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import queries
from .enqueue import Priority, Queue, split_options
from .errors import FlowNotFound, InvalidOption, PQError
from .execution.call import ClaimedJob, ExecutionContext, NextStep, call_task
from .tasks import TaskOptions, import_object, register, registered, resolve

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .models import Job
    from .pq import PQ


@dataclass
class Group:
    """Jobs enqueued together; ``depends_on=group`` waits for all of them (fan-in)."""

    jobs: list[Job]

    @property
    def job_ids(self) -> list[int]:
        return [j.id for j in self.jobs]

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.jobs)


class Flow:
    """A sequence of jobs, each started after the previous one succeeded."""

    def __init__(self, pq: PQ, queue: Queue | str | None = None, name: str | None = None,
                 session: Session | None = None) -> None:
        self.pq = pq
        self.queue = queue if isinstance(queue, Queue) else pq.queue(queue, session=session)
        self.name = name
        self.session = session or self.queue.session
        self.id: int | None = None
        self.created_at: dt.datetime | None = None
        self.jobs: list[Job] = []
        self._last: list[int] = []
        self._runner: Any = None
        self._close: Callable[[BaseException | None], None] | None = None

    def __repr__(self) -> str:
        return f"<Flow id={self.id} name={self.name!r} steps={len(self.jobs)}>"

    # -- the transaction the steps are written in ------------------------------------------------

    def __enter__(self) -> Flow:
        from .pq import CursorRunner, SessionRunner

        if self.session is not None:
            self._runner = SessionRunner(self.session, self.pq.execution_options)
            self._close = None
        else:
            fairy = self.pq.engine.raw_connection()
            cursor = fairy.cursor()
            self._runner = CursorRunner(cursor, self.pq.engine.dialect, self.pq.schema)

            def close(exc: BaseException | None) -> None:
                try:
                    if exc is None:
                        fairy.commit()
                    else:
                        fairy.rollback()
                finally:
                    cursor.close()
                    fairy.close()

            self._close = close
        row = self._runner.run(queries.flow_insert(), {"name": self.name, "queue": self.queue.name})
        self.id, self.created_at = row[0][0], row[0][1]
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._close is not None:
            self._close(exc)
        if self.session is not None and exc is None:
            self.pq._session_written(self.session)
        self._runner = None

    def _require_open(self) -> Any:
        if self._runner is None:
            raise PQError("add steps inside the flow's `with` block")
        return self._runner

    # -- steps -----------------------------------------------------------------------------------

    def enqueue(self, func: Any, *args: Any, **kwargs: Any) -> Job:
        options, task_kwargs = split_options(kwargs)
        return self.enqueue_call(func, args=args, kwargs=task_kwargs, **options)

    def enqueue_call(self, func: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                     **options: Any) -> Job:
        """The next step: it waits for the previous step (and any ``depends_on`` given)."""
        runner = self._require_open()
        extra = options.pop("depends_on", None)
        parents = list(self._last)
        if extra is not None:
            from .enqueue import parent_ids

            parents += [p for p in parent_ids(extra) if p not in parents]
        spec = self.queue.build(func, args, kwargs, depends_on=parents or None, flow_id=self.id,
                                **options)
        job = self.pq._insert_with(runner, [spec])[0]
        self.jobs.append(job)
        self._last = [job.id]
        return job

    def schedule(self, when: Any, func: Any, *args: Any, **kwargs: Any) -> Job:
        """A step that runs at ``when`` at the earliest, after the previous step."""
        options, task_kwargs = split_options(kwargs)
        options["run_at"] = when
        return self.enqueue_call(func, args=args, kwargs=task_kwargs, **options)

    def group(self, calls: Iterable[Any], **options: Any) -> Group:
        """Several steps at once (fan-out); the step after them waits for all (fan-in)."""
        runner = self._require_open()
        specs = []
        for call in calls:
            func, args, kwargs, own = _unpack(call)
            specs.append(self.queue.build(func, args, kwargs, depends_on=list(self._last) or None,
                                          flow_id=self.id, **{**options, **own}))
        jobs = list(self.pq._insert_with(runner, specs))
        self.jobs.extend(jobs)
        self._last = [j.id for j in jobs]
        return Group(jobs)


def _unpack(call: Any) -> tuple[Any, Sequence[Any], Mapping[str, Any], dict[str, Any]]:
    if callable(call) or isinstance(call, str):
        return call, (), {}, {}
    parts = tuple(call)
    return (parts[0], parts[1] if len(parts) > 1 else (), parts[2] if len(parts) > 2 else {},
            dict(parts[3]) if len(parts) > 3 else {})


@dataclass
class FlowView:
    """A stored flow and its jobs, as ``pq.get_flow`` finds it."""

    id: int
    name: str | None
    queue: str
    created_at: dt.datetime
    jobs: list[Job] = field(default_factory=list)

    @property
    def status(self) -> str:
        """See :func:`flow_status`."""
        from collections import Counter

        return flow_status(Counter(j.status for j in self.jobs))


def flow_status(counts: Mapping[str, int]) -> str:
    """A flow's state from its jobs' states counted: ``failed`` or ``cancelled`` if a step
    did, ``succeeded`` once all did, ``running`` while one runs, else ``pending``."""
    for final in ("failed", "cancelled"):
        if counts.get(final):
            return final
    if any(counts.values()) and all(s == "succeeded" for s, n in counts.items() if n):
        return "succeeded"
    return "running" if counts.get("running") else "pending"


def load_flows(pq: PQ, *, flow_id: int | None = None, name: str | None = None) -> list[FlowView]:
    from sqlalchemy import select

    from .models import FlowRecord as FlowRow
    from .models import Job as JobRow

    with pq.session() as s:
        stmt = select(FlowRow).order_by(FlowRow.id)
        if flow_id is not None:
            stmt = stmt.where(FlowRow.id == flow_id)
        if name is not None:
            stmt = stmt.where(FlowRow.name == name)
        flows = list(s.scalars(stmt))
        ids = [f.id for f in flows]
        jobs = list(s.scalars(select(JobRow).where(JobRow.flow_id.in_(ids)).order_by(JobRow.id))) if ids else []
        s.expunge_all()
    views = {f.id: FlowView(f.id, f.name, f.queue, f.created_at) for f in flows}
    for job in jobs:
        pq._bind(job)
        views[job.flow_id].jobs.append(job)  # type: ignore[index]
    if flow_id is not None and not views:
        raise FlowNotFound(f"no flow has id {flow_id} (it expires with its last job)")
    return list(views.values())


# -- multi-step jobs (django-db-queue) ---------------------------------------------------------------


class MultiStepJob:
    """A named job whose tasks run in order, each receiving the job (with its workspace)."""

    def __init__(self, name: str, tasks: Sequence[str | Callable[..., Any]],
                 failure_hook: str | Callable[..., Any] | None = None,
                 creation_hook: str | Callable[..., Any] | None = None) -> None:
        if not tasks:
            raise ValueError(f"job {name!r} needs at least one task")
        self.name = name
        self.tasks = list(tasks)
        self.failure_hook = failure_hook
        self.creation_hook = creation_hook
        self.__name__ = name
        self.__qualname__ = name
        self.__module__ = "sqla_pq.flows"

    def __repr__(self) -> str:
        return f"<job definition {self.name}: {len(self.tasks)} task(s)>"

    def _task(self, index: int, allowed: Sequence[str]) -> Callable[..., Any]:
        task = self.tasks[index]
        return resolve(task, allowed) if isinstance(task, str) else task

    def __sqla_pq_multistep__(self, job: ClaimedJob, ctx: ExecutionContext) -> Any:
        """Run the job's current task; more to come means back to the queue (READY)."""
        if job.workspace is None:
            job.workspace = {}
        index = job.step
        if index >= len(self.tasks):
            return None
        value = call_task(self._task(index, ctx.allowed_tasks), [job], {})
        if index + 1 < len(self.tasks):
            return NextStep(len(self.tasks))
        return value

    def __call__(self, job: Any) -> Any:
        """Run every task here, in order (what a test may want)."""
        value = None
        for index in range(len(self.tasks)):
            value = call_task(self._task(index, ()), [job], {})
        return value


def define_job(name: str, tasks: Sequence[str | Callable[..., Any]], *,
               failure_hook: str | Callable[..., Any] | None = None,
               creation_hook: str | Callable[..., Any] | None = None,
               queue: str | None = None, priority: int | None = None,
               max_retries: int | None = None, timeout: Any = None) -> MultiStepJob:
    definition = MultiStepJob(name, tasks, failure_hook, creation_hook)
    register(name, definition, TaskOptions(queue=queue, priority=ddq_priority(priority),
                                           max_retries=max_retries,
                                           timeout=timeout,
                                           extra={"failure_hook": failure_hook,
                                                  "creation_hook": creation_hook}))
    return definition


def define_jobs(settings: Mapping[str, Any]) -> list[MultiStepJob]:
    """django-db-queue's JOBS setting: ``{"name": ["a.task", ...]}`` or ``{"name": {"tasks":
    [...], "failure_hook": "...", "creation_hook": "..."}}``."""
    out = []
    for name, value in settings.items():
        if isinstance(value, Mapping):
            extra = {k: value[k] for k in ("failure_hook", "creation_hook", "queue", "priority",
                                           "max_retries", "timeout") if k in value}
            out.append(define_job(name, list(value["tasks"]), **extra))
        else:
            out.append(define_job(name, list(value)))
    return out


def ddq_priority(priority: int | None) -> int | None:
    """django-db-queue's priority on sqla_pq's scale: there 0 is the default and any higher
    number runs sooner (``priority=1`` before every default job), so it counts up from
    ``Priority.NORMAL`` here."""
    if priority is None:
        return None
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidOption(f"priority must be an int (0 is the default), not {priority!r}")
    return Priority.NORMAL + priority


def create_job(pq: PQ, name: str, *, workspace: dict[str, Any] | None = None,
               queue: str | None = None, priority: int | None = None,
               session: Session | None = None, **options: Any) -> Job:
    entry = registered(name)
    if entry is None or not isinstance(entry.func, MultiStepJob):
        raise PQError(f"no job definition named {name!r}: call pq.define_job({name!r}, tasks=[...]) "
                      "(or pq.define_jobs(JOBS)) in this process first")
    definition: MultiStepJob = entry.func
    job = pq.queue(queue or entry.options.queue, session=session).enqueue_call(
        name, workspace=dict(workspace or {}), priority=ddq_priority(priority), **options)
    hook = definition.creation_hook
    if hook is not None:
        (import_object(hook) if isinstance(hook, str) else hook)(job)
    return job
