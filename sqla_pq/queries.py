"""Every statement sqla_pq runs, named Noun+Verb, each with what it does in one line.

They are SQLAlchemy Core expressions on the tables of ``models.py``, so a schema set through
``schema_translate_map`` applies everywhere.  State transitions are one function each and every
one of them is a compare-and-set on the state it expects (and, for a running job, on the attempt
that holds it): a late rescuer or a stale worker cannot overwrite a newer outcome.

All times that decide anything are the database's ``now()``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    Integer,
    LargeBinary,
    Text,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .tables import (
    NOTIFY_CHANNEL,
    dependency_table,
    flow_table,
    job_id_seq,
    job_table,
    queue_table,
    schedule_table,
    tick_table,
    worker_table,
)

j = job_table
w = worker_table

SECOND = literal_column("interval '1 second'")


def _status(name: str) -> sa.ColumnElement[str]:
    """A state as a SQL literal, so the planner can match the partial indexes' predicates."""
    return literal_column(f"'{name}'")


def _states(names: Sequence[str]) -> list[sa.ColumnElement[str]]:
    from .states import ALL_STATES

    unknown = [n for n in names if n not in ALL_STATES]
    if unknown:
        raise ValueError(f"unknown job state(s) {unknown}; states are {', '.join(ALL_STATES)}")
    return [_status(n) for n in names]


QUEUED, RUNNING, DEFERRED = _status("queued"), _status("running"), _status("deferred")
SUCCEEDED, FAILED, CANCELLED = _status("succeeded"), _status("failed"), _status("cancelled")


def _seconds(param: str) -> sa.ColumnElement[Any]:
    return bindparam(param, type_=Double) * SECOND


def _expiry(ttl: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """finished_at + ttl, or NULL (keep forever) for a negative ttl."""
    return case((ttl < 0, sa.null()), else_=func.now() + ttl * SECOND)


# -- enqueue ---------------------------------------------------------------------------------------

INSERT_COLUMNS = (
    "id", "queue", "task", "status", "priority", "encoding", "args", "kwargs", "payload",
    "signature", "run_at", "delay", "expected_at", "max_retries", "retry_policy", "timeout",
    "result_ttl", "client_id", "serial", "flow_id", "waiting_on", "on_parent_failure",
    "schedule_id", "workspace", "max_interruptions", "meta", "error",
)
"""Keys of the parameter dict of :func:`job_insert` (one per row for :func:`job_insert_many`)."""

_JSON_COLUMNS = frozenset({"args", "kwargs", "retry_policy", "workspace", "meta"})
_ARRAY_TYPES: dict[str, Any] = {
    "id": BigInteger, "queue": Text, "task": Text, "status": Text, "priority": Integer,
    "encoding": Text, "args": Text, "kwargs": Text, "payload": LargeBinary,
    "signature": LargeBinary, "run_at": sa.DateTime(timezone=True), "delay": Double,
    "expected_at": sa.DateTime(timezone=True), "max_retries": Integer, "retry_policy": Text,
    "timeout": Double, "result_ttl": Integer, "client_id": Text, "serial": Boolean,
    "flow_id": BigInteger, "waiting_on": Integer, "on_parent_failure": Text,
    "schedule_id": BigInteger, "workspace": Text, "max_interruptions": Integer, "meta": Text,
    "error": Text,
}

INSERT_RETURNING = (j.c.id, j.c.status, j.c.run_at, j.c.enqueued_at)


def _row_values(source: Any, varying: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Column values of one inserted row: bind parameters, or for the columns in ``varying``
    the columns of an unnest() row."""

    def get(name: str) -> Any:
        if source is not None and name in varying:
            return source.c[name]
        return bindparam(name, type_=_ARRAY_TYPES[name])

    values: dict[str, Any] = {}
    for name in INSERT_COLUMNS:
        if name in ("delay", "run_at", "id"):
            continue
        value = get(name)
        if name in _JSON_COLUMNS:
            value = cast(value, JSONB)
        values[name] = value
    values["id"] = func.coalesce(get("id"), job_id_seq.next_value())
    values["run_at"] = func.coalesce(get("run_at"), func.now() + func.coalesce(get("delay"), 0) * SECOND)
    return values


INSERT_SERVER_DEFAULTS: dict[str, Any] = {
    "status": "queued", "priority": 50, "encoding": "json", "max_retries": 0,
    "max_interruptions": 3, "result_ttl": 500, "serial": False, "waiting_on": 0,
    "on_parent_failure": "cancel",
}
"""The server defaults of ``pq_job`` (tables.py; a test keeps the two equal) that an insert
need not send: each parameter costs the client's formatting and the server's parsing."""


def job_insert_for(params: dict[str, Any]) -> tuple[sa.Insert, dict[str, Any]]:
    """The insert of one job and its parameters, without the columns that are NULL or hold
    their server default: those take it (NULL, ``nextval``, ``now()``, 50...), so a plain
    enqueue sends 5 parameters instead of 27 and is planned without a conflict check."""
    given = {name: value for name, value in params.items() if value is not None}
    for name, default in INSERT_SERVER_DEFAULTS.items():
        value = given.get(name, _NO_DEFAULT)
        # the same type too: 0 == False, but only a bool column takes a bool
        if type(value) is type(default) and value == default:
            del given[name]
    return job_insert(frozenset(given)), given


_NO_DEFAULT = object()


@functools.lru_cache(maxsize=64)
def job_insert(present: frozenset[str]) -> sa.Insert:
    """Insert one job, writing the columns in ``present`` (the others take their server
    defaults).  With a client_id, a duplicate inserts nothing and returns no row (the caller's
    transaction stays usable); without one there is nothing to conflict with, and a plain
    INSERT skips the speculative insertion ON CONFLICT costs.  A Core statement: an ORM insert
    would autoflush the caller's session."""
    stmt = pg_insert(j).values(_present_values(present))
    if "client_id" in present:
        stmt = stmt.on_conflict_do_nothing(
            index_elements=[j.c.client_id], index_where=j.c.client_id.isnot(None)
        )
    return stmt.returning(*INSERT_RETURNING)


def _present_values(present: frozenset[str]) -> dict[str, Any]:
    """Bind parameters for the given columns (``delay`` becomes ``run_at``; given both,
    ``run_at`` wins as in :func:`_row_values`)."""
    values: dict[str, Any] = {}
    for name in INSERT_COLUMNS:
        if name not in present or name == "delay":
            continue
        value: Any = bindparam(name, type_=_ARRAY_TYPES[name])
        if name in _JSON_COLUMNS:
            value = cast(value, JSONB)
        values[name] = value
    if "run_at" not in present and "delay" in present:
        values["run_at"] = func.now() + bindparam("delay", type_=Double) * SECOND
    return values


def split_varying(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], frozenset[str]]:
    """Parameters for :func:`job_insert_many`: a column whose value is the same in every row
    is sent once, the others as arrays (a bulk enqueue mostly varies in its arguments)."""
    n = len(rows)
    values: dict[str, Any] = {}
    varying = {"args"}
    for name in INSERT_COLUMNS:
        column = [r[name] for r in rows]
        first = column[0]
        if name in varying or column.count(first) != n:
            varying.add(name)
            values[name] = column
        else:
            values[name] = first
    return values, frozenset(varying)


@functools.lru_cache(maxsize=256)
def job_insert_many(varying: frozenset[str] = frozenset(INSERT_COLUMNS)) -> sa.Insert:
    """Insert many jobs in one statement, the varying columns as arrays (``unnest``): one round
    trip for thousands of jobs.  Duplicate client_ids are skipped; the caller compares counts."""
    names_varying = [n for n in INSERT_COLUMNS if n in varying]
    arrays = [bindparam(name, type_=ARRAY(_ARRAY_TYPES[name])) for name in names_varying]
    rows = (
        func.unnest(*arrays)
        .table_valued(*names_varying, with_ordinality="ord")
        .render_derived(name="r")
    )
    values = _row_values(rows, varying)
    names = list(values)
    source = select(*[values[n] for n in names]).select_from(rows).order_by(rows.c.ord)
    return (
        pg_insert(j)
        .from_select(names, source)
        .on_conflict_do_nothing(
            index_elements=[j.c.client_id], index_where=j.c.client_id.isnot(None)
        )
        .returning(*INSERT_RETURNING, j.c.client_id)
    )


@functools.cache
def job_ids_reserve() -> sa.Select:
    """Reserve ids ahead of the insert (a signed dill payload covers its job's id)."""
    return select(job_id_seq.next_value()).select_from(
        func.generate_series(1, bindparam("n", type_=Integer))
    )


UPSERT_RESET = (
    "task", "status", "priority", "encoding", "args", "kwargs", "payload", "signature", "run_at",
    "expected_at", "max_retries", "retry_policy", "timeout", "result_ttl", "serial", "flow_id",
    "waiting_on", "on_parent_failure", "workspace", "max_interruptions", "meta", "queue",
)


@functools.cache
def job_upsert() -> sa.Insert:
    """Insert a job, or replace the not-running job with the same client_id (debounce).  The
    attempt counter is kept (it fences stale workers); failures and interruptions restart."""
    stmt = pg_insert(j).values(_row_values(None))
    excluded = stmt.excluded
    sets: dict[str, Any] = {name: excluded[name] for name in UPSERT_RESET}
    sets.update(
        failures=0, interruptions=0, error=None, traceback=None, result=None,
        result_payload=None, result_signature=None, started_at=None, finished_at=None,
        expires_at=None, enqueued_at=func.now(), step=0,
    )
    return stmt.on_conflict_do_update(
        index_elements=[j.c.client_id],
        index_where=j.c.client_id.isnot(None),
        set_=sets,
        where=j.c.status != RUNNING,
    ).returning(*INSERT_RETURNING)


@functools.cache
def job_detach_client_id() -> sa.Update:
    """Free a running job's client_id (kept in meta) so an upsert can queue its successor."""
    return (
        update(j)
        .where(j.c.client_id == bindparam("cid"), j.c.status == RUNNING)
        .values(
            client_id=None,
            meta=func.coalesce(j.c.meta, cast(literal_column("'{}'"), JSONB)).op("||")(
                func.jsonb_build_object("client_id", bindparam("cid", type_=Text))
            ),
        )
        .returning(j.c.id)
    )


@functools.cache
def job_lock_parents() -> sa.Update:
    """Mark the parents of a job being enqueued and lock them: a parent finishing at the same
    moment waits for this transaction, so its release of dependants sees the new job."""
    return (
        update(j)
        .where(j.c.id == sa.any_(bindparam("parents", type_=ARRAY(BigInteger))))
        .values(has_dependants=True)
        .returning(j.c.id, j.c.status)
    )


@functools.cache
def dependency_insert() -> sa.Insert:
    """Record which parents a job waits for (edges from unfinished parents only)."""
    rows = func.unnest(
        bindparam("job_ids", type_=ARRAY(BigInteger)),
        bindparam("parent_ids", type_=ARRAY(BigInteger)),
    ).table_valued("job_id", "parent_id").render_derived(name="d")
    return (
        insert(dependency_table)
        .from_select(["job_id", "parent_id"], select(rows.c.job_id, rows.c.parent_id))
    )


@functools.cache
def flow_insert() -> sa.Insert:
    """Create a flow row."""
    return insert(flow_table).values(
        name=bindparam("name"), queue=bindparam("queue")
    ).returning(flow_table.c.id, flow_table.c.created_at)


# -- claim -----------------------------------------------------------------------------------------

CLAIM_COLUMNS = (
    j.c.id, j.c.queue, j.c.task, j.c.encoding, j.c.args, j.c.kwargs, j.c.payload, j.c.signature,
    j.c.attempts, j.c.failures, j.c.max_retries, j.c.retry_policy, j.c.timeout, j.c.result_ttl,
    j.c.interruptions, j.c.max_interruptions, j.c.serial, j.c.workspace, j.c.step, j.c.flow_id,
    j.c.schedule_id, j.c.client_id, j.c.priority, j.c.expected_at, j.c.run_at, j.c.enqueued_at,
    j.c.meta, j.c.has_dependants, j.c.started_at,
)


def _distinct_on(stmt: sa.Select, column: Any) -> sa.Select:
    """``SELECT DISTINCT ON (column)`` on SQLAlchemy 2.0 and 2.1 alike."""
    try:
        from sqlalchemy.dialects.postgresql import distinct_on
    except ImportError:  # SQLAlchemy 2.0
        return stmt.distinct(column)
    return stmt.ext(distinct_on(column))


CLAIM_KEYS = tuple(c.key for c in CLAIM_COLUMNS) + ("queue_rank",)


def claim_size(free: int) -> int:
    """The batch to claim for ``free`` slots: rounded down to 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
    The batch size is a literal of the claim (see ``_batch_limit``), so each size is a
    statement compiled and PREPAREd on its own: a worker meets a handful of sizes, not one per
    count of free slots (16 slots would mean 32 statements to plan, ~10 ms each, in a drain
    that lasts two seconds)."""
    if free < 4:
        return max(free, 0)
    power = 1 << (free.bit_length() - 1)
    return power + power // 2 if free >= power + power // 2 else power


def _batch_limit(batch: int | None) -> Any:
    """A literal batch size when given: a prepared claim's generic plan then knows it touches
    at most that many rows (with an unknown LIMIT it may plan a sequential scan)."""
    if batch is None:
        return bindparam("batch", type_=Integer)
    return literal_column(str(int(batch)))


def _open_queues(queue: str | None) -> list[Any]:
    """Leave out paused queues, and serial queues while one of their jobs runs (all of their
    jobs: the serial job runs alone).  Each test reads no job row: for one queue it is a
    one-time filter, so a blocked queue's backlog is not even scanned; for all queues, a
    list of names read once per statement (the serial one from ``uq_pq_job_serial_running``)."""
    r = j.alias("r")
    serial_running = select(r.c.queue).where(r.c.status == RUNNING, r.c.serial)
    if queue is not None:
        paused = select(queue_table.c.name).where(queue_table.c.name == queue, queue_table.c.paused)
        return [~exists(paused), ~exists(serial_running.where(r.c.queue == queue))]
    # One list, not two tests: each "<> ALL" of unknown length halves the planner's estimate
    # of the ready rows, and with two it sorted the whole table instead of reading the index.
    closed = union_all(select(queue_table.c.name).where(queue_table.c.paused), serial_running)
    return [j.c.queue != sa.all_(func.array(closed.scalar_subquery()))]


def _of_priorities(priorities: tuple[int, ...] | None) -> list[Any]:
    if not priorities:
        return []
    return [j.c.priority.in_([literal_column(str(int(p))) for p in priorities])]


def _claim_branch(queue: str | None, rank: int, priorities: tuple[int, ...] | None,
                  limit: Any) -> sa.Select:
    conditions = [j.c.status == QUEUED, j.c.run_at <= func.now(), *_open_queues(queue),
                  *_of_priorities(priorities)]
    if queue is not None:
        conditions.append(j.c.queue == queue)
    else:
        # The marker of the all-queues index (see models.py): only this branch states it, so a
        # per-queue claim is never planned on that index, even by a generic plan blind to
        # which queue $1 is (it would walk other queues' backlogs).
        conditions.append(j.c.priority.isnot(None))
    return (
        select(
            j.c.id, j.c.queue, j.c.serial, j.c.priority, j.c.expected_at, j.c.run_at,
            literal_column(str(rank)).label("queue_rank"),
        )
        .where(*conditions)
        .order_by(j.c.priority.desc(), j.c.expected_at, j.c.run_at, j.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


@functools.lru_cache(maxsize=1024)
def job_claim(queues: tuple[str, ...] | None, priorities: tuple[int, ...] | None = None,
              batch: int | None = None) -> sa.Update:
    """Claim up to ``:batch`` ready jobs for ``:worker`` in one statement.

    Order: the worker's queues in the order given (each queue is one branch of a UNION ALL
    that PostgreSQL reads in order and stops reading once the batch is full), then priority,
    then expected_at, then run_at, then insertion order.  The candidates are locked with
    ``FOR UPDATE SKIP LOCKED`` inside a MATERIALIZED CTE: without that fence the planner may
    re-run the locking subquery in a nested loop and lock more rows than the batch (Oban's
    note in its basic engine).  A serial queue gives at most one job, and no job at all while
    one of its serial jobs runs (so its backlog cannot fill the batch and starve the other
    queues); the unique index ``uq_pq_job_serial_running`` turns a race into an error the
    worker retries.  Paused queues give nothing.
    """
    # FOR UPDATE is not allowed in a UNION member, but is in a subquery each member reads.
    limit = _batch_limit(batch)
    branches = [
        select(_claim_branch(q, rank, priorities, limit).subquery(f"q{rank}"))
        for rank, q in enumerate(queues or (None,))
    ]
    union = union_all(*branches).subquery("u") if len(branches) > 1 else branches[0].subquery("u")
    candidates = select(union).limit(limit).cte("candidates").prefix_with("MATERIALIZED")
    c = candidates.c
    serial_pick = _distinct_on(
        select(c.id, c.queue_rank, c.queue).where(c.serial), c.queue
    ).order_by(c.queue, c.priority.desc(), c.expected_at, c.run_at, c.id).cte("serial_pick")
    s = serial_pick.c
    # a serial job starts alone: its queue's unmarked jobs wait for the next claim
    plain = select(c.id, c.queue_rank).where(~c.serial, c.queue != sa.all_(
        func.array(select(s.queue).scalar_subquery())))
    picked = union_all(plain, select(s.id, s.queue_rank)).cte("picked")
    return (
        update(j)
        .where(j.c.id == picked.c.id)
        .values(
            status=RUNNING,
            attempts=j.c.attempts + 1,
            started_at=func.now(),
            worker_id=bindparam("worker"),
            lease_until=func.now() + _seconds("lease"),
        )
        .returning(*CLAIM_COLUMNS, picked.c.queue_rank)
    )


@functools.cache
def job_claim_by_id() -> sa.Update:
    """Claim one given job if it is ready (pq.run_job, is_async queues, tests).  Nothing
    heartbeats for such a run, so its lease covers the job's timeout (or ``:job_timeout``) plus
    ``:lease``: the rescuer leaves it alone while it may still be running."""
    runtime = func.coalesce(j.c.timeout, bindparam("job_timeout", type_=Double))
    return (
        update(j)
        .where(j.c.id == bindparam("job_id"), j.c.status == QUEUED)
        .values(status=RUNNING, attempts=j.c.attempts + 1, started_at=func.now(),
                worker_id=bindparam("worker"),
                lease_until=func.now() + (runtime + bindparam("lease", type_=Double)) * SECOND)
        .returning(*CLAIM_COLUMNS)
    )


@functools.lru_cache(maxsize=256)
def job_next_run_at(queues: tuple[str, ...] | None,
                    priorities: tuple[int, ...] | None = None) -> sa.Select:
    """When the earliest job this worker could claim becomes ready (the idle worker's alarm).
    The claim's own filters: a job of a paused queue, of another priority or of a blocked
    serial queue is due but not claimable, and counting it would wake the worker at once,
    again and again."""
    stmt = select(func.min(j.c.run_at)).where(
        j.c.status == QUEUED, *_open_queues(None), *_of_priorities(priorities)
    )
    if queues:
        stmt = stmt.where(j.c.queue == sa.any_(bindparam("queues", list(queues), type_=ARRAY(Text))))
    return stmt


# -- finish (by the worker holding the attempt) ------------------------------------------------------


FINISH_RETURNING = (j.c.id, j.c.has_dependants, j.c.result_ttl, j.c.flow_id)


@functools.cache
def job_complete_many() -> sa.Update:
    """Mark many running jobs succeeded in one statement, storing results; each row only if
    it is still running the attempt that produced the result."""
    rows = func.unnest(
        bindparam("ids", type_=ARRAY(BigInteger)),
        bindparam("attempt_list", type_=ARRAY(Integer)),
        bindparam("results", type_=ARRAY(Text)),
        bindparam("payloads", type_=ARRAY(LargeBinary)),
        bindparam("signatures", type_=ARRAY(LargeBinary)),
        bindparam("workspaces", type_=ARRAY(Text)),
    ).table_valued("id", "attempt", "result", "payload", "signature", "workspace").render_derived(
        name="v"
    )
    return (
        update(j)
        .where(j.c.id == rows.c.id, j.c.status == RUNNING, j.c.attempts == rows.c.attempt)
        .values(
            status=SUCCEEDED,
            finished_at=func.now(),
            result=cast(rows.c.result, JSONB),
            result_payload=rows.c.payload,
            result_signature=rows.c.signature,
            error=None,
            traceback=None,
            workspace=func.coalesce(cast(rows.c.workspace, JSONB), j.c.workspace),
            expires_at=_expiry(j.c.result_ttl),
        )
        .returning(*FINISH_RETURNING)
    )


@functools.lru_cache(maxsize=1024)
def job_complete_and_claim(queues: tuple[str, ...] | None,
                           priorities: tuple[int, ...] | None = None,
                           batch: int | None = None) -> sa.Select:
    """Record a batch of successes and claim the next batch in one statement, so one commit
    (one WAL flush, one round trip) serves both: the worker's hot path.

    Returns one row per claimed job (the columns of :func:`job_claim`), or a single row of NULLs
    when nothing was claimed, plus three arrays: the ids written as succeeded, those among
    them with dependants, and those to delete at once (``result_ttl = 0``).  Only one row
    carries the arrays (the others have NULLs there): repeated on every row (64 rows x 3
    arrays of 64 ids), formatting them took 4 % of the claiming backend's CPU, and psycopg2
    parsed them again for each row.
    Both CTEs read the statement's snapshot: a serial queue whose job completes here is claimed
    from next time.
    """
    done = job_complete_many().cte("done")
    claimed = job_claim(queues, priorities, batch).cte("claimed")
    carrier = claimed.c.id.is_not_distinct_from(select(func.min(claimed.c.id)).scalar_subquery())

    def ids(*where: Any) -> Any:
        return case((carrier, select(func.array_agg(done.c.id)).where(*where).scalar_subquery()))

    one = select(literal_column("1").label("one")).subquery("one")
    return select(
        *claimed.c,
        ids().label("done_ids"),
        ids(done.c.has_dependants).label("done_with_dependants"),
        ids(done.c.result_ttl == 0).label("done_delete_now"),
    ).select_from(one.outerjoin(claimed, sa.true()))


@functools.cache
def job_fail() -> sa.Update:
    """Mark a running attempt failed for good (its retries are spent, or it cannot be retried)."""
    return (
        update(j)
        .where(j.c.id == bindparam("job_id"), j.c.status == RUNNING,
               j.c.attempts == bindparam("attempt"))
        .values(
            status=FAILED,
            finished_at=func.now(),
            failures=j.c.failures + 1,
            error=bindparam("error_text"),
            traceback=bindparam("tb"),
            workspace=func.coalesce(cast(bindparam("workspace_json", type_=Text), JSONB), j.c.workspace),
            expires_at=func.now() + _seconds("failure_ttl"),
        )
        .returning(*FINISH_RETURNING)
    )


@functools.cache
def job_retry() -> sa.Update:
    """Put a failed running attempt back in the queue after ``:delay`` seconds."""
    return (
        update(j)
        .where(j.c.id == bindparam("job_id"), j.c.status == RUNNING,
               j.c.attempts == bindparam("attempt"))
        .values(
            status=QUEUED,
            failures=j.c.failures + bindparam("count_failure", type_=Integer),
            run_at=func.now() + _seconds("delay"),
            error=bindparam("error_text"),
            traceback=bindparam("tb"),
            workspace=func.coalesce(cast(bindparam("workspace_json", type_=Text), JSONB), j.c.workspace),
        )
        .returning(j.c.id)
    )


@functools.cache
def job_cancel_running() -> sa.Update:
    """A running attempt stops its own job for good (the task raised Cancel)."""
    return (
        update(j)
        .where(j.c.id == bindparam("job_id"), j.c.status == RUNNING,
               j.c.attempts == bindparam("attempt"))
        .values(status=CANCELLED, finished_at=func.now(), error=bindparam("error_text"),
                expires_at=_expiry(j.c.result_ttl))
        .returning(*FINISH_RETURNING)
    )


@functools.cache
def job_next_step() -> sa.Update:
    """A multi-step job finished one of its tasks: back to the queue for the next one (any
    worker may run it), with its workspace and step saved (django-db-queue's READY)."""
    return (
        update(j)
        .where(j.c.id == bindparam("job_id"), j.c.status == RUNNING,
               j.c.attempts == bindparam("attempt"))
        .values(status=QUEUED, step=j.c.step + 1, run_at=func.now(), failures=0,
                workspace=cast(bindparam("workspace_json", type_=Text), JSONB))
        .returning(j.c.id)
    )


def _given_back(reason: str, *, holder: bool = False) -> sa.Update:
    rows = func.unnest(
        bindparam("ids", type_=ARRAY(BigInteger)), bindparam("attempt_list", type_=ARRAY(Integer))
    ).table_valued("id", "attempt").render_derived(name="v")
    conditions = [j.c.id == rows.c.id, j.c.status == RUNNING, j.c.attempts == rows.c.attempt]
    if holder:
        conditions.append(j.c.worker_id == bindparam("worker"))
    return _interrupt(update(j).where(*conditions), reason)


@functools.cache
def job_requeue_interrupted() -> sa.Update:
    """Give back jobs a stopping worker aborted (second signal): queued again, one more
    interruption counted, failed once ``max_interruptions`` is reached."""
    return _given_back("Interrupted: the worker was stopped while the job ran")


@functools.cache
def job_requeue_lost() -> sa.Update:
    """Give back jobs a worker stopped because it could not renew their leases (it was frozen,
    or the database was out of reach): an interruption, not a failure of the task.  A no-op for
    an attempt the rescuer already took back."""
    return _given_back("LeaseLost: the worker could not renew the job's lease and stopped it",
                       holder=True)


@functools.cache
def job_release() -> sa.Update:
    """Give back jobs a worker held but never started (prefetched, then it stopped or its
    lease was in doubt): queued again exactly as before the claim, no attempt or interruption
    counted.  Only the holder's current attempt: a no-op for a job the rescuer took back."""
    rows = func.unnest(
        bindparam("ids", type_=ARRAY(BigInteger)), bindparam("attempt_list", type_=ARRAY(Integer))
    ).table_valued("id", "attempt").render_derived(name="v")
    return (
        update(j)
        .where(j.c.id == rows.c.id, j.c.status == RUNNING, j.c.attempts == rows.c.attempt,
               j.c.worker_id == bindparam("worker"))
        .values(status=QUEUED, attempts=j.c.attempts - 1, started_at=None, worker_id=None,
                lease_until=None)
        .returning(j.c.id, j.c.queue)
    )


def _interrupt(stmt: sa.Update, reason: str) -> sa.Update:
    give_up = j.c.interruptions + 1 >= j.c.max_interruptions
    return stmt.values(
        status=case((give_up, FAILED), else_=QUEUED),
        interruptions=j.c.interruptions + 1,
        error=case((give_up, reason + " (max_interruptions reached)"), else_=reason),
        finished_at=case((give_up, func.now()), else_=None),
        expires_at=case((give_up, func.now() + _seconds("failure_ttl")), else_=None),
        run_at=func.now(),
    ).returning(j.c.id, j.c.status, j.c.has_dependants, j.c.queue, j.c.worker_id)


@functools.cache
def job_rescue_stale() -> sa.Update:
    """Re-queue (or fail, after max_interruptions) the running jobs whose lease expired.

    The candidates are locked in id order with SKIP LOCKED: a job whose worker is recording
    its outcome right now is left for the next sweep, and two sweeps (or a sweep and a batch
    completion, which also goes in id order) never wait on each other in opposite orders."""
    stale = (
        select(j.c.id)
        .where(j.c.status == RUNNING, j.c.lease_until < func.now())
        .order_by(j.c.id)
        .with_for_update(skip_locked=True)
        .cte("stale")
        .prefix_with("MATERIALIZED")
    )
    return _interrupt(
        update(j).where(j.c.id == stale.c.id),
        "WorkerLost: the worker stopped renewing the job's lease while it ran",
    )


@functools.cache
def job_sweep_deferred() -> sa.Update:
    """Release deferred jobs none of whose parents is still pending (a release that a crash
    between a parent's finish and its release step left undone).  Parents pruned after
    succeeding count as succeeded."""
    d = dependency_table
    p = j.alias("p")
    blocking = exists(
        select(d.c.parent_id)
        .select_from(d.join(p, p.c.id == d.c.parent_id))
        .where(d.c.job_id == j.c.id, p.c.status != SUCCEEDED)
    )
    return (
        update(j)
        .where(j.c.status == DEFERRED, ~blocking)
        .values(status=QUEUED, waiting_on=0)
        .returning(j.c.id, j.c.queue)
    )


@functools.cache
def job_deferred_doomed() -> sa.Select:
    """Parents that failed or were cancelled while dependants still wait on them."""
    d = dependency_table
    child = j.alias("c")
    return (
        select(j.c.id)
        .select_from(j.join(d, d.c.parent_id == j.c.id).join(child, child.c.id == d.c.job_id))
        .where(j.c.status.in_([FAILED, CANCELLED]), child.c.status == DEFERRED)
        .distinct()
    )


@functools.cache
def job_delete_inserted() -> sa.Delete:
    """Take back rows this transaction just inserted (a bulk enqueue that hit duplicates)."""
    return delete(j).where(j.c.id == sa.any_(bindparam("ids", type_=ARRAY(BigInteger))))


@functools.cache
def job_delete_ids() -> sa.Delete:
    """Delete finished jobs at once (result_ttl = 0)."""
    return delete(j).where(
        j.c.id == sa.any_(bindparam("ids", type_=ARRAY(BigInteger))),
        j.c.status.in_([SUCCEEDED, FAILED, CANCELLED]),
    )


# -- dependencies ------------------------------------------------------------------------------------


@functools.cache
def job_release_dependants() -> sa.Update:
    """Count down the dependants of parents that just succeeded; those with nothing left to
    wait for become queued.  Row locks serialise two parents finishing at once."""
    d = dependency_table
    counts = (
        select(d.c.job_id, func.count().label("n"))
        .where(d.c.parent_id == sa.any_(bindparam("parents", type_=ARRAY(BigInteger))))
        .group_by(d.c.job_id)
        .subquery("n")
    )
    left = j.c.waiting_on - counts.c.n
    return (
        update(j)
        .where(j.c.id == counts.c.job_id, j.c.status == DEFERRED)
        .values(waiting_on=left, status=case((left <= 0, QUEUED), else_=DEFERRED))
        .returning(j.c.id, j.c.status, j.c.queue)
    )


@functools.cache
def job_cancel_dependants() -> sa.Update:
    """Cancel (or fail, as each chose) the waiting dependants of parents that failed or were
    cancelled, saying which parent and why.  Callers repeat it down the graph."""
    d = dependency_table
    parent = j.alias("p")
    edge = (
        select(d.c.job_id, func.min(d.c.parent_id).label("parent_id"))
        .where(d.c.parent_id == sa.any_(bindparam("parents", type_=ARRAY(BigInteger))))
        .group_by(d.c.job_id)
        .subquery("e")
    )
    reason = func.concat(
        "dependency ", edge.c.parent_id, " ",
        func.coalesce(
            select(parent.c.status).where(parent.c.id == edge.c.parent_id).scalar_subquery(),
            "was deleted",
        ),
    )
    return (
        update(j)
        .where(j.c.id == edge.c.job_id, j.c.status.in_([DEFERRED, QUEUED]))
        .values(
            status=case((j.c.on_parent_failure == "fail", FAILED), else_=CANCELLED),
            error=reason,
            finished_at=func.now(),
            expires_at=func.now() + _seconds("failure_ttl"),
        )
        .returning(j.c.id, j.c.has_dependants)
    )


# -- the API's verbs on one job ----------------------------------------------------------------------


@functools.cache
def job_get() -> sa.Select:
    """One job by id."""
    return select(j).where(j.c.id == bindparam("job_id"))


@functools.cache
def job_get_by_client_id() -> sa.Select:
    """One job by client_id."""
    return select(j).where(j.c.client_id == bindparam("client_id"))


@functools.cache
def job_status_many() -> sa.Select:
    """States of several jobs (waiting for results)."""
    return select(j.c.id, j.c.status).where(
        j.c.id == sa.any_(bindparam("ids", type_=ARRAY(BigInteger)))
    )


@functools.cache
def job_cancel() -> sa.Update:
    """Cancel a job that has not started (queued or deferred)."""
    return (
        update(j)
        .where(j.c.id == bindparam("job_id"), j.c.status.in_([QUEUED, DEFERRED]))
        .values(status=CANCELLED, finished_at=func.now(),
                error=bindparam("error_text"), expires_at=_expiry(j.c.result_ttl))
        .returning(j.c.id, j.c.has_dependants)
    )


@functools.cache
def job_requeue() -> sa.Update:
    """Queue a finished job again (a failed one, typically), now, with its retries restored."""
    return (
        update(j)
        .where(j.c.id == bindparam("job_id"), j.c.status.in_([FAILED, CANCELLED, SUCCEEDED]))
        .values(
            status=QUEUED, run_at=func.now(), failures=0, interruptions=0, finished_at=None,
            expires_at=None, error=None, traceback=None, result=None, result_payload=None,
            result_signature=None, step=0,
        )
        .returning(j.c.id, j.c.queue)
    )


@functools.cache
def job_delete() -> sa.Delete:
    """Delete one job, whatever its state."""
    return delete(j).where(j.c.id == bindparam("job_id")).returning(
        j.c.id, j.c.status, j.c.has_dependants, j.c.queue, j.c.serial)


def job_list(statuses: Sequence[str], queue: bool) -> sa.Select:
    """Jobs in some states, newest first (list_failed and friends)."""
    stmt = select(j).where(j.c.status.in_(_states(statuses)))
    if queue:
        stmt = stmt.where(j.c.queue == bindparam("queue"))
    return stmt.order_by(j.c.id.desc()).limit(bindparam("limit", type_=Integer))


def job_clear(statuses: Sequence[str], before: bool, queue: bool) -> sa.Delete:
    """Delete finished jobs in some states (older than ``:before`` when given)."""
    conditions = [j.c.status.in_(_states(statuses))]
    if before:
        conditions.append(j.c.finished_at < bindparam("before"))
    if queue:
        conditions.append(j.c.queue == bindparam("queue"))
    return delete(j).where(*conditions)


@functools.cache
def queue_depths() -> sa.Select:
    """Job counts per queue and state."""
    return select(j.c.queue, j.c.status, func.count()).group_by(j.c.queue, j.c.status)


def queue_set(**values: Any) -> sa.Insert:
    """Create or update a queue's settings row (pause, serial)."""
    stmt = pg_insert(queue_table).values(name=bindparam("name"), **values)
    return stmt.on_conflict_do_update(
        index_elements=[queue_table.c.name], set_={**values, "updated_at": func.now()}
    )


@functools.cache
def queue_list() -> sa.Select:
    return select(queue_table).order_by(queue_table.c.name)


# -- messages (pq's put/get queues) ------------------------------------------------------------------


@functools.cache
def message_get() -> sa.Update:
    """Take the next ready message of a queue: consumed at once (or with the caller's
    transaction)."""
    pick = (
        select(j.c.id)
        .where(j.c.status == QUEUED, j.c.queue == bindparam("message_queue"),
               j.c.run_at <= func.now())
        .order_by(j.c.priority.desc(), j.c.expected_at, j.c.run_at, j.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .cte("pick")
        .prefix_with("MATERIALIZED")
    )
    return (
        update(j)
        .where(j.c.id == pick.c.id)
        .values(status=SUCCEEDED, attempts=j.c.attempts + 1,
                started_at=func.now(), finished_at=func.now(),
                expires_at=_expiry(j.c.result_ttl))
        .returning(j.c.id, j.c.encoding, j.c.args, j.c.payload, j.c.enqueued_at, j.c.run_at,
                   j.c.expected_at, j.c.priority)
    )


# -- schedules ---------------------------------------------------------------------------------------

sch = schedule_table


@functools.cache
def schedule_due() -> sa.Select:
    """Active schedules whose next tick has come, locked (SKIP LOCKED: several schedulers
    share the work), with the database's now()."""
    return (
        select(sch, func.now().label("db_now"))
        .where(sch.c.active, sch.c.next_run_at <= func.now())
        .order_by(sch.c.next_run_at)
        .limit(bindparam("batch", type_=Integer))
        .with_for_update(of=sch, skip_locked=True)
    )


@functools.cache
def tick_insert() -> sa.Insert:
    """Claim a tick: the primary key (schedule, tick time) makes it happen once, whatever the
    number of schedulers."""
    return (
        pg_insert(tick_table)
        .values(schedule_id=bindparam("schedule"), tick_at=bindparam("tick_at"),
                skipped=bindparam("skipped", type_=Boolean))
        .on_conflict_do_nothing(index_elements=[tick_table.c.schedule_id, tick_table.c.tick_at])
        .returning(tick_table.c.schedule_id)
    )


@functools.cache
def tick_set_job() -> sa.Update:
    """Record the job a tick made."""
    return (
        update(tick_table)
        .where(tick_table.c.schedule_id == bindparam("schedule"),
               tick_table.c.tick_at == bindparam("tick_at"))
        .values(job_id=bindparam("job", type_=BigInteger))
    )


@functools.cache
def schedule_active_jobs() -> sa.Select:
    """Jobs of a schedule still queued, waiting or running (overlap control)."""
    return select(func.count()).where(
        j.c.schedule_id == bindparam("schedule"),
        j.c.status.in_([DEFERRED, QUEUED, RUNNING]),
    )


@functools.cache
def schedule_advance() -> sa.Update:
    """Move a schedule past the tick it just fired (compare-and-set on that tick)."""
    return (
        update(sch)
        .where(sch.c.id == bindparam("schedule"), sch.c.next_run_at == bindparam("tick_at"))
        .values(
            next_run_at=bindparam("next_at"),
            last_run_at=bindparam("tick_at"),
            runs=bindparam("new_runs", type_=Integer),
            repeats_left=bindparam("left", type_=Integer),
            updated_at=func.now(),
        )
        .returning(sch.c.id)
    )


# -- maintenance -------------------------------------------------------------------------------------


@functools.cache
def job_prune() -> sa.Delete:
    """Delete up to ``:batch`` jobs whose keep-until time has passed (skipping locked rows)."""
    expired = (
        select(j.c.id)
        .where(j.c.expires_at < func.now())
        .limit(bindparam("batch", type_=Integer))
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return delete(j).where(j.c.id.in_(expired)).returning(j.c.id)


@functools.cache
def flow_prune() -> sa.Delete:
    """Delete flows none of whose jobs remain (a flow expires with its last job)."""
    f = flow_table
    return delete(f).where(
        ~exists(select(j.c.id).where(j.c.flow_id == f.c.id)),
        f.c.created_at < func.now() - _seconds("grace"),
    )


@functools.cache
def tick_prune() -> sa.Delete:
    """Forget tick markers older than ``:keep`` seconds (their jobs are long gone)."""
    return delete(tick_table).where(tick_table.c.tick_at < func.now() - _seconds("keep"))


@functools.cache
def maintenance_try_lock() -> sa.Select:
    """Take a transaction-scoped advisory lock, or not: one worker at a time runs a loop."""
    return select(func.pg_try_advisory_xact_lock(bindparam("key", type_=BigInteger)))


# -- workers -----------------------------------------------------------------------------------------


@functools.cache
def worker_register() -> Any:
    """Add this worker's row (its lease starts now)."""
    return pg_insert(w).values(
        id=bindparam("id"), name=bindparam("name"), hostname=bindparam("hostname"),
        pid=bindparam("pid"), queues=bindparam("queues", type_=ARRAY(Text)),
        isolation=bindparam("isolation"), concurrency=bindparam("concurrency"),
        state="starting", version=bindparam("version"),
        expires_at=func.now() + _seconds("lease"),
    ).on_conflict_do_update(  # re-registering after the row was deleted under a live worker
        index_elements=[w.c.id],
        set_={"expires_at": func.now() + _seconds("lease"), "heartbeat_at": func.now()},
    )


@functools.cache
def worker_heartbeat() -> sa.Select:
    """Renew the leases of the jobs this worker holds and its own row, in one statement.

    A job's lease is renewed only while it has not expired: once expired the rescuer may have
    given the job to another worker, so the holder must stop it, not take it back.  Returns one
    row: the ids renewed (the held ones missing from it are lost), whether the worker's row
    exists (it may have been deleted: re-register), and whether a stop was requested."""
    held = func.unnest(
        bindparam("held_ids", type_=ARRAY(BigInteger)),
        bindparam("held_attempts", type_=ARRAY(Integer)),
    ).table_valued("id", "attempt").render_derived(name="h")
    renewed = (
        update(j)
        .where(j.c.id == held.c.id, j.c.attempts == held.c.attempt, j.c.status == RUNNING,
               j.c.worker_id == bindparam("wid"), j.c.lease_until >= func.now())
        .values(lease_until=func.now() + _seconds("lease"))
        .returning(j.c.id)
        .cte("renewed")
    )
    beat = (
        update(w)
        .where(w.c.id == bindparam("wid"))
        .values(
            heartbeat_at=func.now(),
            expires_at=func.now() + _seconds("lease"),
            state=bindparam("wstate"),
            current_job_id=bindparam("current", type_=BigInteger),
            jobs_done=bindparam("done", type_=BigInteger),
        )
        .returning(w.c.stop_requested)
        .cte("beat")
    )
    return select(
        select(func.array_agg(renewed.c.id)).scalar_subquery().label("renewed"),
        exists(select(beat.c.stop_requested)).label("registered"),
        select(func.bool_or(beat.c.stop_requested)).scalar_subquery().label("stop_requested"),
    )


@functools.cache
def worker_unregister() -> sa.Delete:
    """Remove this worker's row at a clean exit."""
    return delete(w).where(w.c.id == bindparam("wid"))


def worker_request_stop(all_workers: bool) -> sa.Update:
    """Ask one worker (or all) to stop after the jobs in hand."""
    stmt = update(w).values(stop_requested=True).returning(w.c.id)
    if not all_workers:
        stmt = stmt.where(or_(w.c.id == bindparam("wid"), w.c.name == bindparam("wid")))
    return stmt


@functools.cache
def worker_list() -> sa.Select:
    return select(w, (w.c.expires_at > func.now()).label("alive")).order_by(w.c.started_at)


@functools.cache
def worker_prune_dead() -> sa.Delete:
    """Forget workers whose lease expired long ago and that hold no running job."""
    return delete(w).where(
        w.c.expires_at < func.now() - _seconds("grace"),
        ~exists(select(j.c.id).where(j.c.worker_id == w.c.id, j.c.status == RUNNING)),
    )


# -- notifications -----------------------------------------------------------------------------------


@functools.cache
def notify() -> sa.Select:
    """Wake listening workers; delivered at commit, one per distinct payload per transaction."""
    return select(func.pg_notify(NOTIFY_CHANNEL, bindparam("payload", type_=Text)))


@functools.cache
def now() -> sa.Select:
    """The database's clock."""
    return select(func.now())


__all__ = [name for name in dir() if "_" in name and name.split("_")[0] in {
    "job", "dependency", "flow", "queue", "tick", "worker", "maintenance", "message", "schedule",
}] + ["notify", "now"]
