"""The schema, as SQLAlchemy Core tables on sqla_pq's own MetaData.  No queries live here.

Everything the queue knows is a row you can query with plain SQL or the ORM: jobs and their
history, workers, queues, schedules and their ticks, flows.  The tables carry a ``pq_`` prefix and
no schema; ``PQ(schema="jobs")`` (or ``SQLA_PQ_SCHEMA``) maps them into another schema through
SQLAlchemy's ``schema_translate_map``.

Core, not declarative, so that a worker process needs no ORM: the claim and finish statements
are built on these tables, and ``sqla-pq worker`` starts ~0.1 s sooner without importing
``sqlalchemy.orm``.  The typed ORM classes (``Job``, ``Schedule``, ...) are mapped onto them in
:mod:`sqla_pq.models`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
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
    Table,
    Text,
    Time,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from .states import ALL_STATES, JobStatus

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
_states_array = ",".join(ALL_STATES)


def _required(name: str, type_: Any, *args: Any, **kw: Any) -> Column[Any]:
    """A NOT NULL column (the ORM's ``Mapped[T]``; ``Mapped[T | None]`` is a plain Column)."""
    return Column(name, type_, *args, nullable=False, **kw)


def _now(name: str) -> Column[Any]:
    return _required(name, Timestamp, server_default=func.now())


def _zero(name: str, type_: Any = Integer, doc: str | None = None) -> Column[Any]:
    return _required(name, type_, server_default=text("0"), doc=doc)


def _false(name: str) -> Column[Any]:
    return _required(name, Boolean, server_default=text("false"))


def _stored_call() -> tuple[Column[Any], ...]:
    """A task's arguments, as a job and a schedule both keep them."""
    return (
        _required("encoding", String(16), server_default="json",
                  doc="How the arguments are stored: ``json`` in args/kwargs, ``dill`` or "
                      "``pickle`` in payload."),
        Column("args", JSONB),
        Column("kwargs", JSONB),
        Column("payload", LargeBinary),
        Column("signature", LargeBinary,
               doc="HMAC-SHA256 over the payload (with the row's identity) when a secret key "
                   "is configured."),
    )


job_id_seq = Sequence("pq_job_id_seq", metadata=metadata)

job_table = Table(
    "pq_job",
    metadata,
    _required("id", BigInteger, job_id_seq, server_default=job_id_seq.next_value(),
              primary_key=True),
    _required("queue", String(64)),
    Column("task", Text, doc="Import path or registered name; NULL for a message put on a "
                             "``pq[\"name\"]`` queue."),
    _required("status", String(16), server_default=JobStatus.QUEUED.value),
    _required("priority", SmallInteger, server_default=text("50")),
    *_stored_call(),
    _required("run_at", Timestamp, server_default=func.now(),
              doc="Not before: the job is ready once the database's now() has passed it."),
    Column("expected_at", Timestamp,
           doc="A run-by time (pq's expected_at): among equal priorities, earlier "
               "expectations go first."),
    _now("enqueued_at"),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Column("expires_at", Timestamp,
           doc="When the pruner may delete the finished job (finished_at + result_ttl); "
               "NULL keeps it."),
    _zero("attempts", doc="Executions started (claims).  Never reset: it is the fencing token that stops a "
            "stale worker's finish from overwriting a newer attempt."),
    _zero("failures", doc="Attempts that failed by the task's own doing (error, timeout, crash) since "
                  "the job was (re)queued; compared with ``max_retries``."),
    _zero("max_retries"),
    Column("retry_policy", JSONB,
           doc='``{"delay": s, "factor": f, "max": s}``; the n-th retry waits '
               "delay * factor**(n-1)."),
    _zero("interruptions", doc="Attempts cut short by a worker's death; counted apart from failures."),
    _required("max_interruptions", SmallInteger, server_default=text("3")),
    Column("timeout", Double, doc="Seconds the job may run; NULL for no limit."),
    _required("result_ttl", Integer, server_default=text("500"),
              doc="Seconds to keep the finished job: 0 deletes at once, -1 keeps it forever."),
    Column("result", JSONB),
    Column("result_payload", LargeBinary,
           doc="The return value when JSON cannot carry it (dill)."),
    Column("result_signature", LargeBinary),
    Column("error", Text),
    Column("traceback", Text),
    Column("worker_id", String(128), doc="The worker holding (or that last held) the job."),
    Column("lease_until", Timestamp,
           doc="While running: the attempt's lease, set by the claim and renewed by its "
               "worker's heartbeat.  Past it the rescuer gives the job back; a worker never "
               "renews an expired lease, so a worker that lost a job learns it and stops the "
               "job instead of running it twice."),
    Column("client_id", String(255)),
    _required("serial", Boolean, server_default=text("false"),
              doc="Set for jobs of serial queues: at most one of them runs per queue."),
    Column("flow_id", BigInteger, ForeignKey("pq_flow.id", ondelete="SET NULL")),
    _zero("waiting_on", doc="Parents that have not succeeded yet; the job is ``deferred`` while it is "
                  "above zero."),
    _false("has_dependants"),
    _required("on_parent_failure", String(16), server_default="cancel",
              doc="What a failed or cancelled parent does to this job: ``cancel`` or ``fail``."),
    Column("schedule_id", BigInteger, ForeignKey("pq_schedule.id", ondelete="SET NULL")),
    Column("workspace", JSONB,
           doc="Shared dict of a multi-step job (django-db-queue), saved between its tasks."),
    _zero("step", SmallInteger, doc="Index of the next task of a multi-step job."),
    Column("meta", JSONB),
    # PostgreSQL reads and plans a table's CHECK expressions again at every INSERT and UPDATE
    # statement, so they are written in their cheapest form: one array constant instead of a
    # list of varchar literals (which the planner coerces each time).  The column types already
    # bound the rest: smallint the priority, varchar(64) the queue name's length.
    CheckConstraint(f"status::text = ANY ('{{{_states_array}}}'::text[])", name="status"),
    CheckConstraint("queue::text <> ''", name="queue_name"),
    CheckConstraint("on_parent_failure::text = ANY ('{cancel,fail}'::text[])",
                    name="on_parent_failure"),
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
    # The claim of a worker that serves every queue.  "priority IS NOT NULL" is always true; it
    # is a marker only that claim states, so a per-queue claim can never be planned on this
    # index (prepared statements use generic plans, blind to the queue).
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
    # Failed jobs are listed and cleared by hand; succeeded ones leave through expires_at, so an
    # index on every finished job would cost each completion for nothing.
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
"""One unit of work: a task path, its arguments, and where it is in its life."""

JOB_ATTRIBUTE_DEFAULTS: dict[str, Any] = {c.key: None for c in job_table.columns}
JOB_ATTRIBUTE_DEFAULTS.update(
    attempts=0, failures=0, interruptions=0, step=0, has_dependants=False, waiting_on=0,
    result=None, serial=False,
)
"""A Job's attributes for a row just inserted, where the statement did not set them."""

dependency_table = Table(
    "pq_dependency",
    metadata,
    Column("job_id", BigInteger, ForeignKey("pq_job.id", ondelete="CASCADE"), primary_key=True),
    Column("parent_id", BigInteger, primary_key=True),
    Index("ix_pq_dependency_parent", "parent_id"),
)
"""An edge: ``job_id`` waits for ``parent_id`` to succeed."""

flow_table = Table(
    "pq_flow",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("name", String(255)),
    _required("queue", String(64)),
    _now("created_at"),
    Index("ix_pq_flow_name", "name"),
)
"""A named sequence of jobs (django-pq's FlowStore); it expires with its last job."""

worker_table = Table(
    "pq_worker",
    metadata,
    Column("id", String(128), primary_key=True,
           doc="``name.<random>``: unique per process start, never inherited by a restart."),
    _required("name", String(255)),
    _required("hostname", String(255)),
    _required("pid", Integer),
    Column("queues", ARRAY(Text), doc="Served queues in priority order; NULL means every queue."),
    _required("isolation", String(16)),
    _required("concurrency", Integer, server_default=text("1")),
    _required("state", String(16), server_default="starting"),
    Column("current_job_id", BigInteger),
    _zero("jobs_done", BigInteger),
    _now("started_at"),
    _now("heartbeat_at"),
    _required("expires_at", Timestamp,
              doc="heartbeat_at + lease: past it the worker counts as dead (its jobs carry their "
                  "own leases, ``pq_job.lease_until``, renewed by the same heartbeat)."),
    _false("stop_requested"),
    Column("version", String(32)),
    Index("ix_pq_worker_expires", "expires_at"),
)
"""A running worker process: who, where, what it serves, and its heartbeat (its lease)."""

queue_table = Table(
    "pq_queue",
    metadata,
    Column("name", String(64), primary_key=True),
    _false("paused"),
    _now("updated_at"),
)
"""Per-queue switches that every worker honours in its claim (pause)."""

schedule_table = Table(
    "pq_schedule",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    _required("task", Text),
    _required("key", String(255), server_default="",
              doc="Tells apart several schedules of one task (python-pq's ``key``); '' for the "
                  "default."),
    _required("queue", String(64)),
    _required("priority", SmallInteger, server_default=text("50")),
    *_stored_call(),
    Column("job_options", JSONB,
           doc="Options each fired job gets: timeout, result_ttl, max_retries, retry_policy, "
               "serial."),
    Column("cron", String(255)),
    Column("interval", Double, doc="Seconds between runs (timedelta or number)."),
    Column("interval_relative", JSONB,
           doc="A relativedelta's fields (months, days, ...), for monthly and 'last day' "
               "schedules."),
    Column("timezone", String(64)),
    Column("between_start", Time),
    Column("between_end", Time),
    Column("weekdays", ARRAY(SmallInteger)),
    Column("anchor_at", Timestamp,
           doc="The start the repeats count from (relativedelta intervals step from it, not "
               "from the previous run, so month ends do not drift)."),
    _zero("runs", doc="Ticks fired so far."),
    Column("repeats_left", Integer,
           doc="Runs still to come after the next one; NULL repeats forever (or until "
               "``until``)."),
    Column("until", Timestamp),
    Column("next_run_at", Timestamp, doc="The next tick; NULL once the schedule is exhausted."),
    Column("last_run_at", Timestamp),
    _required("active", Boolean, server_default=text("true")),
    Column("max_concurrent", Integer,
           doc="Skip a tick while this many of its jobs are queued or running; NULL for no "
               "limit."),
    _now("created_at"),
    _now("updated_at"),
    Index("uq_pq_schedule_task_key", "task", "key", unique=True),
    Index("ix_pq_schedule_due", "next_run_at", postgresql_where=text("active")),
)
"""A repeating or periodic job: django-pq's schedule_call and python-pq's periodic tasks."""

tick_table = Table(
    "pq_tick",
    metadata,
    Column("schedule_id", BigInteger, ForeignKey("pq_schedule.id", ondelete="CASCADE"),
           primary_key=True),
    Column("tick_at", Timestamp, primary_key=True),
    Column("job_id", BigInteger,
           doc="The job the tick made; NULL when the tick was skipped (overlap control)."),
    _false("skipped"),
    _now("created_at"),
)
"""One fired tick of a schedule.  The primary key is the promise: a tick becomes one job."""

JOB_STORAGE_PARAMETERS = (
    "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
    "autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_limit = 2000, fillfactor = 90"
)
"""A queue table is mostly dead tuples: vacuum it early and often, leave room for HOT updates.
Applied by the migration and by ``metadata.create_all``."""


@event.listens_for(job_table, "after_create")
def _after_create_job_table(target: Any, connection: Any, **kw: Any) -> None:
    """What the migration adds beyond the table: storage parameters and the NOTIFY trigger."""
    from .ddl import job_table_extras

    schema_map = connection.get_execution_options().get("schema_translate_map") or {}
    for statement in job_table_extras(schema_map.get(None)):
        connection.exec_driver_sql(statement)
