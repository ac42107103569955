"""The typed ORM classes, mapped onto the Core tables of :mod:`sqla_pq.tables`.

Use them with your own Session (``session.get(Job, 42)``, ``select(Job).where(...)``) or through
``pq.get_job``.  The columns, their meaning and the indexes are documented where they are
defined, in ``sqla_pq/tables.py``; a worker process uses those tables alone and never imports
this module (nor ``sqlalchemy.orm``).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy.orm import DeclarativeBase, Mapped, synonym

from .states import JobStatus
from .tables import (  # noqa: F401 - re-exported: the tables were defined here before
    JOB_STORAGE_PARAMETERS,
    NAMING_CONVENTION,
    NOTIFY_CHANNEL,
    Timestamp,
    dependency_table,
    flow_table,
    job_id_seq,
    job_table,
    metadata,
    queue_table,
    schedule_table,
    tick_table,
    worker_table,
)

if TYPE_CHECKING:
    from .pq import PQ


class Base(DeclarativeBase):
    metadata = metadata


class _StoredCall:
    """The columns of a task's arguments, on jobs and schedules alike (``tables._stored_call``)."""

    encoding: Mapped[str]
    args: Mapped[list[Any] | None]
    kwargs: Mapped[dict[str, Any] | None]
    payload: Mapped[bytes | None]
    signature: Mapped[bytes | None]


class Job(_StoredCall, Base):
    """One unit of work: a task path, its arguments, and where it is in its life."""

    __table__ = job_table

    id: Mapped[int]
    queue: Mapped[str]
    task: Mapped[str | None]
    status: Mapped[str]
    priority: Mapped[int]
    run_at: Mapped[dt.datetime]
    expected_at: Mapped[dt.datetime | None]
    enqueued_at: Mapped[dt.datetime]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]
    attempts: Mapped[int]
    failures: Mapped[int]
    max_retries: Mapped[int]
    retry_policy: Mapped[dict[str, Any] | None]
    interruptions: Mapped[int]
    max_interruptions: Mapped[int]
    timeout: Mapped[float | None]
    result_ttl: Mapped[int]
    result: Mapped[Any | None]
    result_payload: Mapped[bytes | None]
    result_signature: Mapped[bytes | None]
    error: Mapped[str | None]
    traceback: Mapped[str | None]
    worker_id: Mapped[str | None]
    lease_until: Mapped[dt.datetime | None]
    client_id: Mapped[str | None]
    serial: Mapped[bool]
    flow_id: Mapped[int | None]
    waiting_on: Mapped[int]
    has_dependants: Mapped[bool]
    on_parent_failure: Mapped[str]
    schedule_id: Mapped[int | None]
    workspace: Mapped[dict[str, Any] | None]
    step: Mapped[int]
    meta: Mapped[dict[str, Any] | None]

    # The SPEC's field names (and python-pq's ``task.name``), usable in queries as well:
    # ``select(Job).where(Job.worker == name)``.
    worker: Mapped[str | None] = synonym("worker_id")
    """The id of the worker running (or that last ran) the job."""
    flow: Mapped[int | None] = synonym("flow_id")
    """The id of the flow the job is a step of."""
    name: Mapped[str | None] = synonym("task")
    """The task's name (python-pq's ``task.name``)."""

    # -- the Python side ------------------------------------------------------------------------
    _pq: ClassVar[PQ | None] = None  # overridden per instance by the PQ that returned it

    def __repr__(self) -> str:
        return f"<Job id={self.id} queue={self.queue!r} task={self.task!r} status={self.status}>"

    @property
    def state(self) -> JobStatus:
        return JobStatus(self.status)

    @property
    def is_finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    @property
    def description(self) -> str:
        """``say_hello('you')``: the call, as the worker's log line shows it."""
        from .serialization import describe_call

        return describe_call(self)

    def return_value(self) -> Any:
        """The task's return value (decoded), or None while the job has none."""
        from .serialization import decode_result

        pq = self._bound_pq()
        keys = pq.settings.secret_keys if pq is not None else ()
        return decode_result(self, keys)

    def refresh(self) -> Job:
        """Reload this job's columns from the database."""
        pq = self._bound_pq()
        if pq is None:
            from sqlalchemy.orm import object_session

            session = object_session(self)
            if session is None:
                raise RuntimeError("this Job is not bound to a PQ or a session")
            session.refresh(self)
            return self
        return pq.refresh_job(self)

    def wait(self, timeout: float | None = None, *, poll: float = 0.05) -> Any:
        """Block until the job is finished, then return its value (raise JobFailed if it failed)."""
        pq = self._bound_pq()
        if pq is None:
            raise RuntimeError("this Job is not bound to a PQ; use pq.wait(job_id)")
        return pq.wait(self.id, timeout=timeout, poll=poll)

    def _bound_pq(self) -> PQ | None:
        return self.__dict__.get("_pq")



class JobDependency(Base):
    """An edge: ``job_id`` waits for ``parent_id`` to succeed."""

    __table__ = dependency_table

    job_id: Mapped[int]
    parent_id: Mapped[int]


class FlowRecord(Base):
    """A named sequence of jobs (django-pq's FlowStore); it expires with its last job."""

    __table__ = flow_table

    id: Mapped[int]
    name: Mapped[str | None]
    queue: Mapped[str]
    created_at: Mapped[dt.datetime]


class WorkerRecord(Base):
    """A running worker process: who, where, what it serves, and its heartbeat (its lease)."""

    __table__ = worker_table

    id: Mapped[str]
    name: Mapped[str]
    hostname: Mapped[str]
    pid: Mapped[int]
    queues: Mapped[list[str] | None]
    isolation: Mapped[str]
    concurrency: Mapped[int]
    state: Mapped[str]
    current_job_id: Mapped[int | None]
    jobs_done: Mapped[int]
    started_at: Mapped[dt.datetime]
    heartbeat_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    stop_requested: Mapped[bool]
    version: Mapped[str | None]


class QueueSettings(Base):
    """Per-queue switches that every worker honours in its claim (pause)."""

    __table__ = queue_table

    name: Mapped[str]
    paused: Mapped[bool]
    updated_at: Mapped[dt.datetime]


class Schedule(_StoredCall, Base):
    """A repeating or periodic job: django-pq's schedule_call and python-pq's periodic tasks."""

    __table__ = schedule_table

    id: Mapped[int]
    task: Mapped[str]
    key: Mapped[str]
    queue: Mapped[str]
    priority: Mapped[int]
    job_options: Mapped[dict[str, Any] | None]
    cron: Mapped[str | None]
    interval: Mapped[float | None]
    interval_relative: Mapped[dict[str, Any] | None]
    timezone: Mapped[str | None]
    between_start: Mapped[dt.time | None]
    between_end: Mapped[dt.time | None]
    weekdays: Mapped[list[int] | None]
    anchor_at: Mapped[dt.datetime | None]
    runs: Mapped[int]
    repeats_left: Mapped[int | None]
    until: Mapped[dt.datetime | None]
    next_run_at: Mapped[dt.datetime | None]
    last_run_at: Mapped[dt.datetime | None]
    active: Mapped[bool]
    max_concurrent: Mapped[int | None]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]


class ScheduleTick(Base):
    """One fired tick of a schedule.  The primary key is the promise: a tick becomes one job."""

    __table__ = tick_table

    schedule_id: Mapped[int]
    tick_at: Mapped[dt.datetime]
    job_id: Mapped[int | None]
    skipped: Mapped[bool]
    created_at: Mapped[dt.datetime]
