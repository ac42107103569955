"""What the dashboard reads, in one read-only transaction with a ``statement_timeout``.

No statement here selects a payload or a signature: binary columns are read as their length,
JSON columns as text cut to a bound.  A dill or pickle payload is code to whoever loads it, and
only the process that runs the job may load it; the dashboard cannot even receive one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import LargeBinary, Select, Table, Text, cast, func, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from ..flows import flow_status
from ..models import FlowRecord, Job, JobDependency, QueueSettings, Schedule, WorkerRecord
from ..states import ALL_STATES

if TYPE_CHECKING:
    from ..pq import PQ

LIST_TEXT = 200
"""Characters of arguments and errors shown in a list (one more is read, to know there is more)."""
DETAIL_TEXT = 100_000
"""Characters of one JSON field, error or traceback on a detail page."""

job_table: Table = Job.__table__  # type: ignore[assignment]
schedule_table: Table = Schedule.__table__  # type: ignore[assignment]
worker_table: Table = WorkerRecord.__table__  # type: ignore[assignment]


@contextlib.contextmanager
def reading(pq: PQ, timeout: float) -> Iterator[Session]:
    """A read-only transaction whose statements give up after ``timeout`` seconds: a page must
    neither write nor keep a scan running on a large job table."""
    with pq.session() as session:
        session.execute(text("SET TRANSACTION READ ONLY"))
        session.execute(select(func.set_config("statement_timeout",
                                               str(max(1, int(timeout * 1000))), True)))
        yield session


def _safe_columns(table: Table, limit: int, pretty: bool = False) -> list[Any]:
    """Every column of ``table``, with binary ones as their length (``<name>`` holds the byte
    count) and JSON ones as text cut to ``limit`` characters."""
    columns: list[Any] = []
    for column in table.columns:
        if isinstance(column.type, LargeBinary):
            columns.append(func.octet_length(column).label(column.key))
        elif isinstance(column.type, JSONB):
            as_text = func.jsonb_pretty(column) if pretty else cast(column, Text)
            columns.append(func.left(as_text, limit + 1).label(column.key))
        elif isinstance(column.type, Text) and column.key in ("error", "traceback"):
            columns.append(func.left(column, limit + 1).label(column.key))
        else:
            columns.append(column)
    return columns


def _job_summary() -> Select[Any]:
    """The columns a job list shows."""
    j = job_table.c
    return select(
        j.id, j.queue, j.task, j.status, j.priority, j.encoding,
        func.left(cast(j.args, Text), LIST_TEXT + 1).label("args"),
        func.left(cast(j.kwargs, Text), LIST_TEXT + 1).label("kwargs"),
        func.octet_length(j.payload).label("payload"),
        j.run_at, j.enqueued_at, j.started_at, j.finished_at, j.attempts, j.max_retries,
        j.worker_id, j.flow_id, func.left(j.error, LIST_TEXT + 1).label("error"),
    )


# -- queues ------------------------------------------------------------------------------------


@dataclasses.dataclass
class QueueRow:
    name: str
    counts: dict[str, int]
    paused: bool

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def queues(session: Session) -> list[QueueRow]:
    """Every queue that has jobs or settings: job counts by state, and whether it is paused."""
    rows: dict[str, QueueRow] = {}
    counts = select(Job.queue, Job.status, func.count()).group_by(Job.queue, Job.status)
    for name, status, n in session.execute(counts):
        rows.setdefault(name, QueueRow(name, {}, False)).counts[status] = n
    for name, paused in session.execute(select(QueueSettings.name, QueueSettings.paused)):
        rows.setdefault(name, QueueRow(name, {}, False)).paused = bool(paused)
    return [rows[name] for name in sorted(rows)]


# -- jobs --------------------------------------------------------------------------------------


def recent_failures(session: Session, limit: int = 10) -> list[Any]:
    stmt = (_job_summary().where(job_table.c.status == "failed")
            .order_by(job_table.c.finished_at.desc().nulls_last()).limit(limit))
    return list(session.execute(stmt))


def job_page(session: Session, *, queue: str | None, state: str | None, before: int | None,
             limit: int) -> tuple[list[Any], bool]:
    """Newest first, older than job ``before``; and whether an older page exists."""
    stmt = _job_summary().order_by(job_table.c.id.desc()).limit(limit + 1)
    if queue:
        stmt = stmt.where(job_table.c.queue == queue)
    if state in ALL_STATES:
        stmt = stmt.where(job_table.c.status == state)
    if before is not None:
        stmt = stmt.where(job_table.c.id < before)
    rows = list(session.execute(stmt))
    return rows[:limit], len(rows) > limit


@dataclasses.dataclass
class JobDetail:
    row: Any
    parents: list[int]
    dependants: list[int]


def job_detail(session: Session, job_id: int) -> JobDetail | None:
    stmt = select(*_safe_columns(job_table, DETAIL_TEXT, pretty=True)).where(
        job_table.c.id == job_id)
    row = session.execute(stmt).first()
    if row is None:
        return None
    d = JobDependency
    parents = session.scalars(select(d.parent_id).where(d.job_id == job_id).order_by(d.parent_id))
    children = session.scalars(select(d.job_id).where(d.parent_id == job_id).order_by(d.job_id))
    return JobDetail(row, list(parents), list(children))


# -- workers and schedules ---------------------------------------------------------------------


def workers(session: Session, limit: int = 500) -> list[Any]:
    """Live workers first, then the dead ones the pruner has not forgotten yet."""
    alive = (worker_table.c.expires_at > func.now()).label("alive")
    stmt = (select(worker_table, alive)
            .order_by(alive.desc(), worker_table.c.started_at.desc()).limit(limit))
    return list(session.execute(stmt))


def schedules(session: Session, limit: int = 1000) -> list[Any]:
    stmt = (select(*_safe_columns(schedule_table, LIST_TEXT))
            .order_by(schedule_table.c.next_run_at.asc().nulls_last(), schedule_table.c.id)
            .limit(limit))
    return list(session.execute(stmt))


# -- flows -------------------------------------------------------------------------------------


@dataclasses.dataclass
class FlowRow:
    id: int
    name: str | None
    queue: str
    created_at: dt.datetime
    counts: dict[str, int]

    @property
    def status(self) -> str:
        return flow_status(self.counts)


def flows(session: Session, *, name: str | None = None, limit: int = 100) -> list[FlowRow]:
    """The newest flows (of one name), with their jobs counted by state."""
    stmt = select(FlowRecord.id, FlowRecord.name, FlowRecord.queue, FlowRecord.created_at)
    if name:
        stmt = stmt.where(FlowRecord.name == name)
    found = {r.id: FlowRow(r.id, r.name, r.queue, r.created_at, {})
             for r in session.execute(stmt.order_by(FlowRecord.id.desc()).limit(limit))}
    _count_flow_jobs(session, found)
    return list(found.values())


def flow(session: Session, flow_id: int) -> tuple[FlowRow, list[Any]] | None:
    """One flow and its jobs, in order."""
    record = session.get(FlowRecord, flow_id)
    if record is None:
        return None
    row = FlowRow(record.id, record.name, record.queue, record.created_at, {})
    jobs = list(session.execute(
        _job_summary().where(job_table.c.flow_id == flow_id).order_by(job_table.c.id)))
    for job in jobs:
        row.counts[job.status] = row.counts.get(job.status, 0) + 1
    return row, jobs


def _count_flow_jobs(session: Session, found: dict[int, FlowRow]) -> None:
    if not found:
        return
    stmt = (select(Job.flow_id, Job.status, func.count())
            .where(Job.flow_id.in_(list(found))).group_by(Job.flow_id, Job.status))
    for flow_id, status, n in session.execute(stmt):
        if flow_id is not None:
            found[flow_id].counts[status] = n

