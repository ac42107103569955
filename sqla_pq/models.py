"""The tables, as declarative SQLAlchemy models on sqla_pq's own MetaData.  No queries live here.

Everything the queue knows is a row you can query with plain SQL or the ORM: jobs and their
history, workers, queues, schedules and their ticks, flows.  The tables carry a ``pq_`` prefix and
no schema; ``PQ(schema="jobs")`` (or ``SQLA_PQ_SCHEMA``) maps them into another schema through
SQLAlchemy's ``schema_translate_map``.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    SmallInteger,
    String,
    Text,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .states import ALL_STATES, JobStatus

if TYPE_CHECKING:
    from .pq import PQ

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)
"""sqla_pq's MetaData.  Add it to your alembic ``target_metadata`` list (see docs/alembic)."""

NOTIFY_CHANNEL = "sqla_pq"
"""The one LISTEN/NOTIFY channel; the payload is a queue name (or a ``!command``), never job data."""

Timestamp = DateTime(timezone=True)
_states_sql = ", ".join(f"'{s}'" for s in ALL_STATES)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dt.datetime: Timestamp,
        dict[str, Any]: JSONB,
        list[Any]: JSONB,
        bytes: LargeBinary,
    }


job_id_seq = Sequence("pq_job_id_seq", metadata=metadata)


class Job(Base):
    """One unit of work: a task path, its arguments, and where it is in its life."""

    __tablename__ = "pq_job"

    id: Mapped[int] = mapped_column(
        BigInteger, job_id_seq, server_default=job_id_seq.next_value(), primary_key=True
    )
    queue: Mapped[str] = mapped_column(String(64))
    task: Mapped[str | None] = mapped_column(Text)
    """Import path or registered name; NULL for a message put on a ``pq["name"]`` queue."""
    status: Mapped[str] = mapped_column(String(16), server_default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(SmallInteger, server_default=text("50"))
    encoding: Mapped[str] = mapped_column(String(16), server_default="json")
    """How the arguments are stored: ``json`` in args/kwargs, ``dill`` or ``pickle`` in payload."""
    args: Mapped[list[Any] | None] = mapped_column(JSONB)
    kwargs: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    """HMAC-SHA256 of (id, task, payload) when a secret key is configured."""

    run_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    """Not before: the job is ready once the database's now() has passed it."""
    expected_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    """A run-by time (pq's expected_at): among equal priorities, earlier expectations go first."""
    enqueued_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    expires_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    """When the pruner may delete the finished job (finished_at + result_ttl); NULL keeps it."""

    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    """Executions started (claims).  Never reset: it is the fencing token that stops a stale
    worker's finish from overwriting a newer attempt."""
    failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    """Attempts that failed by the task's own doing (error, timeout, crash) since the job was
    (re)queued; compared with ``max_retries``."""
    max_retries: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    retry_policy: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """``{"delay": s, "factor": f, "max": s}``; the n-th retry waits delay * factor**(n-1)."""
    interruptions: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    """Attempts cut short by a worker's death; counted apart from failures."""
    max_interruptions: Mapped[int] = mapped_column(SmallInteger, server_default=text("3"))
    timeout: Mapped[float | None] = mapped_column(Double)
    """Seconds the job may run; NULL for no limit."""
    result_ttl: Mapped[int] = mapped_column(Integer, server_default=text("500"))
    """Seconds to keep the finished job: 0 deletes at once, -1 keeps it forever."""

    result: Mapped[Any | None] = mapped_column(JSONB)
    result_payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The return value when JSON cannot carry it (dill)."""
    result_signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)

    worker_id: Mapped[str | None] = mapped_column(String(128))
    """The worker holding (or that last held) the job."""
    lease_until: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    """While running: the attempt's lease, set by the claim and renewed by its worker's
    heartbeat.  Past it the rescuer gives the job back; a worker never renews an expired lease,
    so a worker that lost a job learns it and stops the job instead of running it twice."""
    client_id: Mapped[str | None] = mapped_column(String(255))
    serial: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    """Set for jobs of serial queues: at most one of them runs per queue."""

    flow_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("pq_flow.id", ondelete="SET NULL")
    )
    waiting_on: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    """Parents that have not succeeded yet; the job is ``deferred`` while it is above zero."""
    has_dependants: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    on_parent_failure: Mapped[str] = mapped_column(String(16), server_default="cancel")
    """What a failed or cancelled parent does to this job: ``cancel`` or ``fail``."""
    schedule_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("pq_schedule.id", ondelete="SET NULL")
    )
    workspace: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """Shared dict of a multi-step job (django-db-queue), saved between its tasks."""
    step: Mapped[int] = mapped_column(SmallInteger, server_default=text("0"))
    """Index of the next task of a multi-step job."""
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    __table_args__ = (
        CheckConstraint(f"status IN ({_states_sql})", name="status"),
        CheckConstraint("priority BETWEEN -32768 AND 32767", name="priority"),
        CheckConstraint("char_length(queue) BETWEEN 1 AND 64", name="queue_name"),
        CheckConstraint("on_parent_failure IN ('cancel', 'fail')", name="on_parent_failure"),
        # The claim: per queue, in order (priority first, then expectation, then run time).
        Index(
            "ix_pq_job_ready",
            "queue",
            text("priority DESC"),
            "expected_at",
            "run_at",
            "id",
            postgresql_where=text("status = 'queued'"),
        ),
        # The claim of a worker that serves every queue.  "priority IS NOT NULL" is always
        # true; it is a marker only that claim states, so a per-queue claim can never be
        # planned on this index (prepared statements use generic plans, blind to the queue).
        Index(
            "ix_pq_job_ready_any",
            text("priority DESC"),
            "expected_at",
            "run_at",
            "id",
            postgresql_where=text("status = 'queued' AND priority IS NOT NULL"),
        ),
        Index("ix_pq_job_running", "worker_id", postgresql_where=text("status = 'running'")),
        Index("ix_pq_job_deferred", "id", postgresql_where=text("status = 'deferred'")),
        # Serial queues: the database itself refuses a second running job in the queue.
        Index(
            "uq_pq_job_serial_running",
            "queue",
            unique=True,
            postgresql_where=text("status = 'running' AND serial"),
        ),
        Index(
            "uq_pq_job_client_id",
            "client_id",
            unique=True,
            postgresql_where=text("client_id IS NOT NULL"),
        ),
        Index("ix_pq_job_expires", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
        # Failed jobs are listed and cleared by hand; succeeded ones leave through expires_at,
        # so an index on every finished job would cost each completion for nothing.
        Index("ix_pq_job_failed", "finished_at", postgresql_where=text("status = 'failed'")),
        Index("ix_pq_job_flow", "flow_id", postgresql_where=text("flow_id IS NOT NULL")),
        Index(
            "ix_pq_job_schedule_active",
            "schedule_id",
            postgresql_where=text(
                "schedule_id IS NOT NULL AND status IN ('deferred', 'queued', 'running')"
            ),
        ),
    )

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

    __tablename__ = "pq_dependency"

    job_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("pq_job.id", ondelete="CASCADE"), primary_key=True
    )
    parent_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)

    __table_args__ = (Index("ix_pq_dependency_parent", "parent_id"),)


class FlowRecord(Base):
    """A named sequence of jobs (django-pq's FlowStore); it expires with its last job."""

    __tablename__ = "pq_flow"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(255))
    queue: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    __table_args__ = (Index("ix_pq_flow_name", "name"),)


class WorkerRecord(Base):
    """A running worker process: who, where, what it serves, and its heartbeat (its lease)."""

    __tablename__ = "pq_worker"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    """``name.<random>``: unique per process start, never inherited by a restart."""
    name: Mapped[str] = mapped_column(String(255))
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    """Served queues in priority order; NULL means every queue."""
    isolation: Mapped[str] = mapped_column(String(16))
    concurrency: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    state: Mapped[str] = mapped_column(String(16), server_default="starting")
    current_job_id: Mapped[int | None] = mapped_column(BigInteger)
    jobs_done: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    started_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    heartbeat_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    expires_at: Mapped[dt.datetime] = mapped_column(Timestamp)
    """heartbeat_at + lease: past it the worker counts as dead (its jobs carry their own
    leases, ``pq_job.lease_until``, renewed by the same heartbeat)."""
    stop_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    version: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (Index("ix_pq_worker_expires", "expires_at"),)


class QueueSettings(Base):
    """Per-queue switches that every worker honours in its claim (pause)."""

    __tablename__ = "pq_queue"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    updated_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())


class Schedule(Base):
    """A repeating or periodic job: django-pq's schedule_call and python-pq's periodic tasks."""

    __tablename__ = "pq_schedule"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(String(255), server_default="")
    """Tells apart several schedules of one task (python-pq's ``key``); '' for the default."""
    queue: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(SmallInteger, server_default=text("50"))
    encoding: Mapped[str] = mapped_column(String(16), server_default="json")
    args: Mapped[list[Any] | None] = mapped_column(JSONB)
    kwargs: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    job_options: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """Options each fired job gets: timeout, result_ttl, max_retries, retry_policy, serial."""

    cron: Mapped[str | None] = mapped_column(String(255))
    interval: Mapped[float | None] = mapped_column(Double)
    """Seconds between runs (timedelta or number)."""
    interval_relative: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """A relativedelta's fields (months, days, ...), for monthly and 'last day' schedules."""
    timezone: Mapped[str | None] = mapped_column(String(64))
    between_start: Mapped[dt.time | None] = mapped_column()
    between_end: Mapped[dt.time | None] = mapped_column()
    weekdays: Mapped[list[int] | None] = mapped_column(ARRAY(SmallInteger))
    anchor_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    """The start the repeats count from (relativedelta intervals step from it, not from the
    previous run, so month ends do not drift)."""
    runs: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    """Ticks fired so far."""
    repeats_left: Mapped[int | None] = mapped_column(Integer)
    """Runs still to come after the next one; NULL repeats forever (or until ``until``)."""
    until: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    next_run_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    """The next tick; NULL once the schedule is exhausted."""
    last_run_at: Mapped[dt.datetime | None] = mapped_column(Timestamp)
    active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    """Skip a tick while this many of its jobs are queued or running; NULL for no limit."""
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())

    __table_args__ = (
        Index("uq_pq_schedule_task_key", "task", "key", unique=True),
        Index("ix_pq_schedule_due", "next_run_at", postgresql_where=text("active")),
    )


class ScheduleTick(Base):
    """One fired tick of a schedule.  The primary key is the promise: a tick becomes one job."""

    __tablename__ = "pq_tick"

    schedule_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("pq_schedule.id", ondelete="CASCADE"), primary_key=True
    )
    tick_at: Mapped[dt.datetime] = mapped_column(Timestamp, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    """The job the tick made; NULL when the tick was skipped (overlap control)."""
    skipped: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[dt.datetime] = mapped_column(Timestamp, server_default=func.now())


JOB_STORAGE_PARAMETERS = (
    "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
    "autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_limit = 2000, fillfactor = 90"
)
"""A queue table is mostly dead tuples: vacuum it early and often, leave room for HOT updates.
Applied by the migration and by ``metadata.create_all``."""

job_table = Job.__table__


@event.listens_for(job_table, "after_create")
def _after_create_job_table(target: Any, connection: Any, **kw: Any) -> None:
    """What the migration adds beyond the table: storage parameters and the NOTIFY trigger."""
    from .ddl import job_table_extras

    schema_map = connection.get_execution_options().get("schema_translate_map") or {}
    for statement in job_table_extras(schema_map.get(None)):
        connection.exec_driver_sql(statement)
dependency_table = JobDependency.__table__
flow_table = FlowRecord.__table__
worker_table = WorkerRecord.__table__
queue_table = QueueSettings.__table__
schedule_table = Schedule.__table__
tick_table = ScheduleTick.__table__
