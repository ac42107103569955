"""The central object: ``pq = PQ(Session)``.

It knows the database (through the application's own sessionmaker, engine or URL) and the
settings, hands out queues, and answers questions about jobs.  It keeps no state of its own
besides that; every job, queue switch and worker lives in the database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from sqlalchemy import select
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ResourceClosedError

from . import queries
from .db import (
    RawAutocommit,
    compile_raw,
    engine_from,
    is_dbapi_connection_error,
    raise_if_schema_missing,
    run_fixed,
    run_prepared,
    run_raw,
    translating_schema_errors,
)
from .enqueue import (
    CallPlan,
    FixedInsert,
    JobSpec,
    Queue,
    queue_for,
    queue_for_calls,
    split_options,
)
from .errors import (
    ConfigurationError,
    DuplicateClientId,
    InvalidOption,
    InvalidTransition,
    JobFailed,
    JobNotFound,
)
from .execution.call import ClaimedJob, ExecutionContext, Hooks, execute
from .held_connection import HeldConnection, held_for
from .held_connection import release as release_held
from .record import cancel_dependants, notify, record_outcomes
from .serialization import DILL, JSON, NO_ARGUMENTS_JSON, EncodedCall, sign
from .settings import Settings
from .states import FINAL_STATES, JobStatus
from .tables import JOB_ATTRIBUTE_DEFAULTS, job_table
from .tasks import TaskFunction, TaskOptions, check_task_options, register

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from .flows import Flow, FlowView, Group, MultiStepJob
    from .messages import MessageQueue
    from .metrics import MetricsHook
    from .models import Job, Schedule
    from .worker import Worker

log = logging.getLogger("sqla_pq")

_NO_PARENTS: dict[str, Any] = {}
"""The insert parameters ``_job_from`` reads (``waiting_on``, ``error``) of a job that waits
for nothing."""


class SessionRunner:
    """Runs statements in the caller's session: its transaction, its connection.

    Through ``session.connection()``, not ``session.execute()``: the latter autoflushes the
    caller's pending objects, and an enqueue must not flush more than it must.
    """

    def __init__(self, session: Session, execution_options: dict[str, Any]) -> None:
        self.session = session
        self.options = execution_options

    def run(self, statement: Any, params: dict[str, Any] | None = None, *,
            prepare: bool = True) -> list[Any]:
        conn = self.session.connection()
        result = conn.execute(statement, params or {}, execution_options=self.options)
        try:
            return list(result)
        except ResourceClosedError:  # a statement without RETURNING
            return []


class CursorRunner:
    """Runs compiled statements on a DBAPI cursor (PQ's own short transactions), prepared
    once per pooled connection when ``prepared`` holds that connection's cache."""

    def __init__(self, cursor: Any, dialect: Any, schema: str | None,
                 prepared: dict[str, Any] | None = None, in_transaction: bool = False) -> None:
        self.cursor = cursor
        self.dialect = dialect
        self.schema = schema
        self.prepared = prepared
        self.in_transaction = in_transaction

    def run(self, statement: Any, params: dict[str, Any] | None = None, *,
            prepare: bool = True) -> list[tuple[Any, ...]]:
        """``prepare=False`` for one-off statements (a bulk insert's shape varies: preparing
        it would cost a round trip and save nothing)."""
        raw = compile_raw(statement, self.dialect, self.schema)
        if self.prepared is None or not prepare:
            return run_raw(self.cursor, raw, params)
        return run_prepared(self.cursor, raw, params, self.prepared, self.in_transaction)

    def run_planned(self, insert: FixedInsert, encoded: EncodedCall) -> list[tuple[Any, ...]]:
        """A call plan's insert: its fixed values written into a statement this connection
        prepares once for the plan, so a call sends only its arguments."""
        if self.prepared is None:
            return self.run(insert.statement, insert.params(encoded))
        raw = compile_raw(insert.statement, self.dialect, self.schema)
        return run_fixed(self.cursor, raw, insert.fixed, insert, FixedInsert.VARYING,
                         (encoded.args_json, encoded.kwargs_json), NO_ARGUMENTS_JSON,
                         self.prepared, self.in_transaction)


class _OwnCursor:
    """``with pq._cursor() as runner``: a :class:`CursorRunner` in autocommit, on the engine's
    held connection when it is free (:mod:`~sqla_pq.held_connection`), else on one checked out
    of the pool for this statement (a class, not a generator: see
    :class:`~sqla_pq.db.RawAutocommit`)."""

    __slots__ = ("_pq", "_held", "_raw")

    def __init__(self, pq: PQ) -> None:
        self._pq = pq

    def __enter__(self) -> CursorRunner:
        pq = self._pq
        held = pq._held_connection()
        got = held.acquire() if held is not None else None
        if got is None:
            self._held = None
            self._raw = RawAutocommit(pq.engine)
            cursor, info = self._raw.__enter__()
        else:
            self._held = held
            cursor, info = got
        try:
            return CursorRunner(cursor, pq.engine.dialect, pq.schema, pq._cache(info))
        except BaseException as exc:  # __exit__ will not run: let go of the connection here
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if self._held is None:
            self._raw.__exit__(kind, exc, tb)
            return
        self._held.release(exc)
        if exc is not None:
            raise_if_schema_missing(exc)


class PQ:
    """A job queue on your PostgreSQL database.

    ``PQ(Session)`` takes your sessionmaker (or a scoped session, an Engine, or a URL; with
    nothing, ``DATABASE_URL``).  Settings default as in django-pq and can be given here or as
    ``SQLA_PQ_*`` environment variables (see :class:`~sqla_pq.settings.Settings`).
    """

    def __init__(
        self,
        target: Any = None,
        *,
        schema: str | None = None,
        secret_keys: Any = None,
        allowed_tasks: Any = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        if target is None:
            url = os.environ.get("DATABASE_URL")
            if not url:
                raise ConfigurationError(
                    "PQ() needs a sessionmaker, an Engine or a URL (or DATABASE_URL)"
                )
            target = url
        self.engine, factory = engine_from(target)
        self._owns_engine = isinstance(target, (str, URL))
        if settings is None:
            settings = Settings.from_env(
                schema=schema, secret_keys=secret_keys, allowed_tasks=allowed_tasks, **overrides
            )
        elif schema or secret_keys or allowed_tasks or overrides:
            settings = settings.replace(
                **{k: v for k, v in dict(schema=schema, secret_keys=secret_keys,
                                          allowed_tasks=allowed_tasks, **overrides).items()
                   if v is not None}
            )
        self.settings = settings
        self.schema = settings.schema
        self.execution_options: dict[str, Any] = (
            {"schema_translate_map": {None: self.schema}} if self.schema else {}
        )
        self._bound_engine: Engine = (
            self.engine.execution_options(**self.execution_options)
            if self.execution_options else self.engine
        )
        self._session_factory: sessionmaker[Session] | None = factory
        self.on_session_write: list[Callable[[Session], Any]] = []
        """Called with the caller's session after sqla_pq wrote in it.  Enqueue writes with
        Core statements (an ORM insert would autoflush the caller's pending objects), which
        transaction managers that watch ORM events do not see; the Pyramid integration adds
        zope.sqlalchemy's ``mark_changed`` here."""
        self._held: HeldConnection | bool | None = None
        self._call_plans: dict[Any, CallPlan] = {}
        """Queue.call_plan's plans, for every Queue of this PQ."""
        self.metrics_hooks: list[MetricsHook] = []
        """Called by this PQ's workers with a :class:`~sqla_pq.metrics.JobMetric` per attempt
        recorded (see :meth:`add_metrics_hook`)."""

    def __repr__(self) -> str:
        schema = f" schema={self.schema!r}" if self.schema else ""
        return f"<PQ {self.engine.url.render_as_string(hide_password=True)}{schema}>"

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def session_factory(self) -> sessionmaker[Session]:
        """Your sessionmaker, or one on the engine (made on first use: a worker never needs
        the ORM, and importing it costs a worker's start ~0.05 s)."""
        if self._session_factory is None:
            from sqlalchemy.orm import sessionmaker

            self._session_factory = sessionmaker(self.engine)
        return self._session_factory

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session from your factory on sqla_pq's schema; commits on success."""
        with self.session_factory(bind=self._bound_engine, expire_on_commit=False) as s:
            with translating_schema_errors():
                with s.begin():
                    yield s

    def _cursor(self) -> _OwnCursor:
        """One autocommit statement at a time on a pooled connection of your engine."""
        return _OwnCursor(self)

    def _held_connection(self) -> HeldConnection | None:
        """The engine's held connection, looked up once (False: the engine holds none)."""
        held = self._held
        if held is None:
            held = self._held = held_for(self.engine, self.settings.hold_connection) or False
        return held or None

    def close(self) -> None:
        """Give back the connection this PQ holds between its own statements, and dispose of
        the engine if PQ made it (from a URL).  PQ works again after, checking out anew."""
        release_held(self.engine)
        self._held = None
        if self._owns_engine:
            self.engine.dispose()

    def _cache(self, info: dict[str, Any]) -> dict[str, Any] | None:
        """This connection's prepared statements (its pool's ``info`` dies with it)."""
        if not self.settings.prepare or self.engine.dialect.driver != "psycopg2":
            return None
        return info.setdefault("sqla_pq_prepared", {})

    def _retrying(self, operation: Callable[[], Any]) -> Any:
        """Run an own-transaction operation; once more on a fresh connection when the pooled one
        was dead (a database restart while it idled): the statement never ran there."""
        try:
            return operation()
        except Exception as exc:
            if not is_dbapi_connection_error(exc):
                raise
            log.info("a pooled connection was dead (%s); retrying once", type(exc).__name__)
            return operation()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[CursorRunner]:
        """Several statements in one transaction on a pooled connection of your engine."""
        with translating_schema_errors():
            fairy = self.engine.raw_connection()
            try:
                cursor = fairy.cursor()
                try:
                    yield CursorRunner(cursor, self.engine.dialect, self.schema,
                                       self._cache(fairy.info), in_transaction=True)
                    fairy.commit()
                except BaseException as exc:
                    if is_dbapi_connection_error(exc):
                        fairy.invalidate()
                    else:
                        fairy.rollback()
                    raise
                finally:
                    cursor.close()
            finally:
                fairy.close()

    def _run(self, statement: Any, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        def once() -> list[tuple[Any, ...]]:
            with self._cursor() as runner:
                return runner.run(statement, params)

        return self._retrying(once)

    def _session_written(self, session: Session) -> None:
        for hook in self.on_session_write:
            hook(session)

    def execution_context(
        self,
        hooks: Hooks | None = None,
        call_wrapper: Callable[[ClaimedJob, Callable[[], Any]], Any] | None = None,
    ) -> ExecutionContext:
        from .atomic import AtomicRunner

        return ExecutionContext(
            allowed_tasks=self.settings.allowed_tasks,
            secret_keys=self.settings.secret_keys,
            max_result_bytes=self.settings.max_payload_bytes,
            hooks=hooks or Hooks(),
            atomic_runner=AtomicRunner(self),
            call_wrapper=call_wrapper,
        )

    # -- queues and enqueueing ----------------------------------------------------------------------

    def queue(
        self,
        name: str | None = None,
        *,
        session: Session | None = None,
        serial: bool | None = None,
        is_async: bool = True,
        **defaults: Any,
    ) -> Queue:
        """A queue (``"default"`` when unnamed).  With ``session=``, jobs join that session's
        transaction; ``serial=True`` runs one job of the queue at a time across all workers;
        ``is_async=False`` runs jobs at once in this process (tests, DEBUG)."""
        return Queue(self, name, session=session, serial=serial, is_async=is_async, **defaults)

    def enqueue(self, func: Any, *args: Any, **kwargs: Any) -> Job:
        """Enqueue on the task's queue (``@pq.task(queue=...)``) or the default one; ``queue=``
        picks another.  See :meth:`Queue.enqueue`."""
        queue_name = queue_for(func, kwargs.pop("queue", None))
        session = kwargs.pop("session", None)
        return self.queue(queue_name, session=session).enqueue(func, *args, **kwargs)

    def enqueue_call(self, func: Any, args: Sequence[Any] = (), kwargs: Any = None,
                     *, queue: str | None = None, session: Session | None = None,
                     **options: Any) -> Job:
        return self.queue(queue_for(func, queue), session=session).enqueue_call(
            func, args=args, kwargs=kwargs, **options)

    def enqueue_many(self, calls: Iterable[Any], *, queue: str | None = None,
                     session: Session | None = None, **options: Any) -> Sequence[Job]:
        """Bulk enqueue in one statement; see :meth:`Queue.enqueue_many`."""
        calls = list(calls)
        return self.queue(queue_for_calls(calls, queue), session=session).enqueue_many(
            calls, **options)

    def upsert(self, func: Any, *args: Any, client_id: str, **kwargs: Any) -> Job:
        """Insert a job, or replace the pending (or finished) job with this ``client_id``
        (debounce: only the latest call runs).  A running job is left alone: the new call is
        queued beside it and the running one keeps its ``client_id`` in ``meta``."""
        queue_name = queue_for(func, kwargs.pop("queue", None))
        session = kwargs.pop("session", None)
        options, task_kwargs = split_options(kwargs)
        q = self.queue(queue_name, session=session)
        spec = q.build(func, args, task_kwargs, client_id=client_id, **options)
        if spec.parents:
            raise InvalidTransition("upsert does not take depends_on")
        return self._insert([spec], session=session, upsert=True)[0]

    def _insert(self, specs: Sequence[JobSpec], *, session: Session | None = None,
                upsert: bool = False) -> Sequence[Job]:
        if not specs:
            return []
        needs_transaction = (
            upsert
            or any(s.parents for s in specs)
            or (len(specs) > 1 and any(s.client_id for s in specs))
        )
        if session is not None:
            jobs = self._insert_with(SessionRunner(session, self.execution_options), specs,
                                     upsert=upsert)
            self._session_written(session)
            return jobs
        def once() -> JobBatch:
            if needs_transaction:
                with self._transaction() as runner:
                    return self._insert_with(runner, specs, upsert=upsert)
            with self._cursor() as runner:
                return self._insert_with(runner, specs, upsert=upsert)

        return self._retrying(once)

    def _insert_one(self, spec: JobSpec, session: Session | None = None) -> Job:
        """One job.  The common case, in its own transaction with no parents and nothing to
        sign, is one autocommit statement and nothing else (E1 in benchmarks/README.md)."""
        if session is not None or spec.parents or (
            self.settings.secret_keys and spec.encoded.encoding == DILL
        ):
            return self._insert([spec], session=session)[0]
        statement, given = spec.insert()

        def once() -> list[tuple[Any, ...]]:
            with self._cursor() as runner:
                return runner.run(statement, given)

        rows = self._retrying(once)
        if not rows:
            raise _duplicate(spec.client_id)
        return self._job_from(spec, _NO_PARENTS, rows[0])

    def _insert_planned(self, plan: CallPlan, encoded: EncodedCall) -> Job:
        """A plain call of a call plan in its own transaction: one EXECUTE of the statement
        this connection prepared for the plan, and a Job copied from the plan's values, with
        no per-call spec (:meth:`_insert_one` does the same for any spec; see E1 in
        benchmarks/README.md for what each step cost)."""
        insert = plan.insert
        if insert is None or encoded.encoding != JSON:
            return self._insert_one(plan.template.with_encoded(encoded))

        def once() -> list[tuple[Any, ...]]:
            with self._cursor() as runner:
                return runner.run_planned(insert, encoded)

        rows = self._retrying(once)
        if not rows:
            raise _duplicate(plan.template.client_id)
        values = plan.job_values.copy()
        values["id"], values["status"], values["run_at"], values["enqueued_at"] = rows[0]
        values["args"] = encoded.args_value
        values["kwargs"] = encoded.kwargs_value
        return self._new_job(values)

    def _insert_uniform(self, template: JobSpec, encodeds: Sequence[Any],
                        session: Session | None = None) -> Sequence[Job]:
        """Bulk enqueue of calls that differ only in their arguments: the column arrays are
        built straight from the encoded calls (no per-job spec or parameter dict)."""
        from .enqueue import UniformSpecs

        specs = UniformSpecs(template, encodeds)
        if template.parents or template.client_id or (
            self.settings.secret_keys and any(e.encoding == DILL for e in encodeds)
        ):
            return self._insert(specs, session=session)
        base = template.params()
        values = dict(base)
        values["args"] = [e.args_json for e in encodeds]
        values["kwargs"] = [e.kwargs_json for e in encodeds]
        varying = {"args", "kwargs"}
        if any(e.encoding != template.encoded.encoding for e in encodeds):
            values["encoding"] = [e.encoding for e in encodeds]
            values["payload"] = [e.payload for e in encodeds]
            varying |= {"encoding", "payload"}
        elif template.encoded.payload is not None:
            values["payload"] = [e.payload for e in encodeds]
            varying.add("payload")
        statement = queries.job_insert_many(frozenset(varying))

        def once(runner: Any) -> JobBatch:
            rows = sorted(runner.run(statement, values, prepare=False), key=lambda r: r[0])
            return JobBatch(self, specs, _Repeat(base, len(specs)), rows)

        if session is not None:
            batch = once(SessionRunner(session, self.execution_options))
            self._session_written(session)
            return batch

        def own() -> JobBatch:
            with self._cursor() as runner:
                return once(runner)

        return self._retrying(own)

    def _insert_with(self, runner: Any, specs: Sequence[JobSpec], *,
                     upsert: bool = False) -> JobBatch:
        keys = self.settings.secret_keys
        signed = [s for s in specs if keys and s.encoded.encoding == DILL]
        if signed:
            ids = [r[0] for r in runner.run(queries.job_ids_reserve(), {"n": len(signed)})]
            for spec, job_id in zip(signed, ids):
                spec.id = job_id
                spec.signature = sign(keys, job_id, spec.task, spec.encoded.payload or b"")
        params = [s.params() for s in specs]
        pending: dict[int, list[int]] = {}
        for index, spec in enumerate(specs):
            if spec.parents:
                pending[index] = self._resolve_parents(runner, spec, params[index])
        if upsert:
            rows = runner.run(queries.job_upsert(), params[0])
            if not rows:  # the holder of the client_id is running: queue the successor beside it
                runner.run(queries.job_detach_client_id(), {"cid": specs[0].client_id})
                rows = runner.run(queries.job_upsert(), params[0])
            if not rows:
                raise InvalidTransition(
                    f"the job with client_id {specs[0].client_id!r} changed while it was replaced; "
                    "try again"
                )
        elif len(specs) == 1:
            rows = runner.run(*queries.job_insert_for(params[0]))
            if not rows:
                raise _duplicate(specs[0].client_id)
        else:
            values, varying = queries.split_varying(params)
            rows = runner.run(queries.job_insert_many(varying), values, prepare=False)
            if len(rows) != len(specs):
                inserted = {r[4] for r in rows}
                duplicates = [s.client_id for s in specs if s.client_id and s.client_id not in inserted]
                runner.run(queries.job_delete_inserted(), {"ids": [r[0] for r in rows]})
                raise DuplicateClientId(
                    f"jobs with client_id {', '.join(map(repr, duplicates))} already exist; "
                    "nothing was enqueued"
                )
            rows = sorted(rows, key=lambda r: r[0])
            if any(s.id is not None for s in specs):  # reserved ids need not be in input order
                by_id = {r[0]: r for r in rows}
                order = [s.id for s in specs]
                free = iter(r for r in rows if r[0] not in set(order))
                rows = [by_id[i] if i is not None else next(free) for i in order]
        edges = [(rows[i][0], parents) for i, parents in pending.items() if parents]
        if edges:
            runner.run(
                queries.dependency_insert(),
                {"job_ids": [j for j, ps in edges for _ in ps],
                 "parent_ids": [p for _, ps in edges for p in ps]},
            )
        return JobBatch(self, specs, params, rows)

    def _resolve_parents(self, runner: Any, spec: JobSpec, param: dict[str, Any]) -> list[int]:
        """Lock the parents and set the new job's state from theirs; return those to wait for."""
        rows = runner.run(queries.job_lock_parents(), {"parents": list(spec.parents)})
        statuses = {r[0]: r[1] for r in rows}
        missing = [p for p in spec.parents if p not in statuses]
        if missing:
            raise JobNotFound(
                f"depends_on names job(s) {', '.join(map(str, missing))}, which do not exist"
            )
        pending = [p for p in spec.parents if statuses[p] not in ("succeeded", "failed", "cancelled")]
        dead = [p for p in spec.parents if statuses[p] in ("failed", "cancelled")]
        if dead:
            param["status"] = "failed" if spec.on_parent_failure == "fail" else "cancelled"
            param["waiting_on"] = 0
            param["error"] = f"dependency {dead[0]} {statuses[dead[0]]}"
            return []
        param["status"] = "deferred" if pending else "queued"
        param["waiting_on"] = len(pending)
        return pending

    def _job_from(self, spec: JobSpec, param: dict[str, Any], row: Any) -> Job:
        values = dict(spec.job_values(JOB_ATTRIBUTE_DEFAULTS))
        e = spec.encoded
        values.update(
            id=row[0], status=row[1], run_at=row[2], enqueued_at=row[3], encoding=e.encoding,
            args=e.args_value, kwargs=e.kwargs_value, payload=e.payload, signature=spec.signature,
            waiting_on=param.get("waiting_on", 0), error=param.get("error"),
        )
        return self._new_job(values)

    def _new_job(self, values: dict[str, Any]) -> Job:
        """This PQ's Job of ``values``, a fresh copy of values kept for many jobs (a spec's, a
        plan's): the one dict among them must not be shared either."""
        if values["retry_policy"] is not None:
            values["retry_policy"] = dict(values["retry_policy"])
        return self._bind(_detached_job(values))

    def _bind(self, job: Job) -> Job:
        job.__dict__["_pq"] = self
        return job

    # -- running jobs in this process --------------------------------------------------------------

    def _run_inline(self, spec: JobSpec, session: Session | None = None) -> Job:
        """is_async=False: insert, claim and run the job here, recording the outcome as a worker
        would; inside the caller's session when there is one."""
        if session is not None:
            job = self._inline_with(SessionRunner(session, self.execution_options), spec)
            self._session_written(session)
            return job
        with self._transaction() as runner:
            return self._inline_with(runner, spec)

    def _inline_with(self, runner: Any, spec: JobSpec) -> Job:
        job = self._insert_with(runner, [spec])[0]
        if job.status != JobStatus.QUEUED.value:
            return job
        ctx = self.execution_context()
        while True:
            rows = runner.run(queries.job_claim_by_id(), self._inline_claim(job.id))
            if not rows:
                break
            claimed = ClaimedJob.from_tuple(rows[0])
            outcome = execute(claimed, ctx, async_timeout=claimed.timeout)
            record_outcomes(runner, [outcome], failure_ttl=self.settings.failure_ttl)
            if outcome.kind != "retry":
                break
        row = runner.run(queries.job_get(), {"job_id": job.id})
        if not row:
            job.status = JobStatus.SUCCEEDED.value  # result_ttl=0: deleted once finished
            return job
        return self._job_from_row(row[0])

    def _inline_claim(self, job_id: int) -> dict[str, Any]:
        s = self.settings
        return {"job_id": job_id, "worker": f"inline:{os.getpid()}",
                "lease": s.lease_seconds, "job_timeout": float(s.job_timeout)}

    def run_job(self, job_id: Job | int) -> Job:
        """Claim and run one queued job now, in this process (tests, scripts, debugging)."""
        job_id = _job_id(job_id, "run_job")
        with self._transaction() as runner:
            rows = runner.run(queries.job_claim_by_id(), self._inline_claim(job_id))
        if not rows:
            with self._cursor() as runner:
                self._exists_or_raise(runner, job_id, "run")
        claimed = ClaimedJob.from_tuple(rows[0])
        outcome = execute(claimed, self.execution_context(), async_timeout=claimed.timeout)
        with self._cursor() as runner:
            record_outcomes(runner, [outcome], failure_ttl=self.settings.failure_ttl)
        try:
            return self.get_job(job_id)
        except JobNotFound:  # result_ttl=0: deleted as soon as it finished
            return self._bind(_detached_job({**JOB_ATTRIBUTE_DEFAULTS, "id": job_id,
                                             "status": outcome.kind}))

    # -- looking at jobs ------------------------------------------------------------------------------

    def _job_from_row(self, row: Any) -> Job:
        mapping = row._mapping if hasattr(row, "_mapping") else None
        if mapping is not None:
            values = {k: mapping[k] for k in JOB_ATTRIBUTE_DEFAULTS}
        else:
            values = dict(zip([c.key for c in job_table.columns], row))
        for key in ("payload", "signature", "result_payload", "result_signature"):
            if isinstance(values.get(key), memoryview):
                values[key] = bytes(values[key])
        return self._bind(_detached_job(values))

    def get_job(self, job_id: Job | int) -> Job:
        """The job with this id (or a fresh copy of this Job); JobNotFound if there is none
        (it may have been pruned)."""
        job_id = _job_id(job_id, "get_job")
        rows = self._run(queries.job_get(), {"job_id": job_id})
        if not rows:
            raise JobNotFound(f"no job has id {job_id} (it may have been pruned after its result_ttl)")
        return self._job_from_row(rows[0])

    def get_job_by_client_id(self, client_id: str) -> Job:
        rows = self._run(queries.job_get_by_client_id(), {"client_id": client_id})
        if not rows:
            raise JobNotFound(f"no job has client_id {client_id!r}")
        return self._job_from_row(rows[0])

    get_task_by_client_id = get_job_by_client_id
    """python-pq's name."""

    def refresh_job(self, job: Job) -> Job:
        fresh = self.get_job(job.id)
        for key in JOB_ATTRIBUTE_DEFAULTS:
            job.__dict__[key] = fresh.__dict__[key]
        return job

    def wait(self, job_id: Job | int, timeout: float | None = None, *, poll: float = 0.05) -> Any:
        """Block until the job finishes; return its value, or raise JobFailed.  Polls with a
        growing interval (up to 1 s)."""
        job_id = _job_id(job_id, "wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = min(poll, 1.0)
        while True:
            rows = self._run(queries.job_status_many(), {"ids": [job_id]})
            if not rows:
                raise JobNotFound(f"no job has id {job_id}")
            status = rows[0][1]
            if status in FINAL_STATES:
                job = self.get_job(job_id)
                if status == JobStatus.SUCCEEDED:
                    return job.return_value()
                raise JobFailed(f"job {job_id} {status}: {job.error}", job=job)
            if deadline is not None and time.monotonic() >= deadline:
                from .errors import JobNotFinished

                raise JobNotFinished(f"job {job_id} is still {status} after {timeout}s")
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
            interval = min(interval * 1.5, 1.0)

    def list_jobs(self, *statuses: str, queue: str | None = None, limit: int = 100) -> list[Job]:
        statuses = statuses or tuple(s.value for s in JobStatus)
        rows = self._run(queries.job_list(statuses, queue is not None),
                         {"queue": queue, "limit": limit})
        return [self._job_from_row(r) for r in rows]

    def list_failed(self, queue: str | None = None, limit: int = 100) -> list[Job]:
        """Failed jobs, newest first (python-pq's list_failed; RQ's failed registry)."""
        return self.list_jobs("failed", queue=queue, limit=limit)

    def list_completed(self, queue: str | None = None, limit: int = 100) -> list[Job]:
        return self.list_jobs("succeeded", queue=queue, limit=limit)

    def clear_failed(self, before: dt.datetime | None = None, queue: str | None = None) -> int:
        """Delete failed jobs (finished before ``before`` when given); returns how many."""
        return self._clear(("failed",), before, queue)

    def clear_completed(self, before: dt.datetime | None = None, queue: str | None = None) -> int:
        """Delete succeeded jobs (finished before ``before`` when given); returns how many."""
        return self._clear(("succeeded",), before, queue)

    def _clear(self, statuses: tuple[str, ...], before: dt.datetime | None, queue: str | None) -> int:
        from .timeparse import aware

        with self._cursor() as runner:
            runner.run(queries.job_clear(statuses, before is not None, queue is not None),
                       {"before": aware(before) if before else None, "queue": queue})
            return int(runner.cursor.rowcount)

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting (queued) per queue; queues with none are absent (django-db-queue)."""
        return {q: n for q, s, n in self._run(queries.queue_depths()) if s == "queued"}

    def queue_stats(self) -> dict[str, dict[str, int]]:
        """Job counts per queue and state."""
        stats: dict[str, dict[str, int]] = {}
        for queue, status, n in self._run(queries.queue_depths()):
            stats.setdefault(queue, {})[status] = n
        return stats

    # -- changing jobs ------------------------------------------------------------------------------

    def _exists_or_raise(self, runner: Any, job_id: int, verb: str) -> None:
        rows = runner.run(queries.job_status_many(), {"ids": [job_id]})
        if not rows:
            raise JobNotFound(f"no job has id {job_id}")
        raise InvalidTransition(f"cannot {verb} job {job_id}: it is {rows[0][1]}")

    def cancel(self, job_id: Job | int, reason: str = "cancelled") -> None:
        """Cancel a job that has not started; its dependants are cancelled too."""
        job_id = _job_id(job_id, "cancel")
        with self._transaction() as runner:
            rows = runner.run(queries.job_cancel(), {"job_id": job_id, "error_text": reason})
            if not rows:
                self._exists_or_raise(runner, job_id, "cancel")
            if rows[0][1]:
                cancel_dependants(runner, [job_id], failure_ttl=self.settings.failure_ttl)

    def requeue(self, job_id: Job | int) -> Job:
        """Queue a finished (failed, cancelled or succeeded) job again, with its retries
        restored."""
        job_id = _job_id(job_id, "requeue")
        with self._transaction() as runner:
            rows = runner.run(queries.job_requeue(), {"job_id": job_id})
            if not rows:
                self._exists_or_raise(runner, job_id, "requeue")
            notify(runner, [rows[0][1]])
        return self.get_job(job_id)

    def delete(self, job_id: Job | int) -> None:
        """Delete a job whatever its state; dependants still waiting on it are cancelled."""
        job_id = _job_id(job_id, "delete")
        with self._transaction() as runner:
            rows = runner.run(queries.job_delete(), {"job_id": job_id})
            if not rows:
                raise JobNotFound(f"no job has id {job_id}")
            _, status, has_dependants, queue, serial = rows[0]
            if has_dependants and status != "succeeded":
                cancel_dependants(runner, [job_id], failure_ttl=self.settings.failure_ttl)
            if serial and status == "running":  # its serial queue is free: wake the workers
                notify(runner, [queue])

    # -- queues and workers ----------------------------------------------------------------------------

    def pause_queue(self, name: str) -> None:
        """Workers stop claiming from this queue (jobs already running finish)."""
        from .enqueue import check_queue_name

        self._run(queries.queue_set(paused=True), {"name": check_queue_name(name)})

    def resume_queue(self, name: str) -> None:
        from .enqueue import check_queue_name

        with self._cursor() as runner:
            runner.run(queries.queue_set(paused=False), {"name": check_queue_name(name)})
            notify(runner, [name])

    def paused_queues(self) -> list[str]:
        return [r.name for r in self._session_rows(queries.queue_list()) if r.paused]

    def _session_rows(self, statement: Any) -> list[Any]:
        with self.session() as s:
            return list(s.execute(statement))

    def workers(self) -> list[Any]:
        """Worker rows, each with ``alive`` (its lease has not expired)."""
        return self._session_rows(queries.worker_list())

    def stop_worker(self, worker: str) -> bool:
        """Ask one worker (by id or name) to stop after the jobs in hand."""
        with self._cursor() as runner:
            rows = runner.run(queries.worker_request_stop(False), {"wid": worker})
            for (worker_id,) in rows:
                runner.run(queries.notify(), {"payload": f"!stop {worker_id}"})
        return bool(rows)

    def terminate_workers(self, wait: bool = True, timeout: float | None = None) -> int:
        """Ask every worker to stop after the jobs in hand; with ``wait``, block until they
        are gone (django-pq's ``pqworker --terminate``).  Returns how many were asked."""
        with self._cursor() as runner:
            rows = runner.run(queries.worker_request_stop(True))
            runner.run(queries.notify(), {"payload": "!stop *"})
        asked = {r[0] for r in rows}
        deadline = None if timeout is None else time.monotonic() + timeout
        while wait and asked:
            alive = {w.id for w in self.workers() if w.alive}
            if not alive & asked:
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return len(asked)

    # -- tasks ---------------------------------------------------------------------------------------

    @overload
    def task(self, func: Callable[..., Any], /) -> TaskFunction[Any, Any]: ...
    @overload
    def task(self, func: None = None, /, **options: Any) -> Callable[[Callable[..., Any]], TaskFunction[Any, Any]]: ...

    def task(self, func: Callable[..., Any] | None = None, /, *, name: str | None = None,
             queue: str | None = None, priority: int | None = None, timeout: Any = None,
             max_retries: int | None = None, retry_in: Any = None, result_ttl: int | None = None,
             atomic: bool = False, **extra: Any) -> Any:
        """Register a task: ``@pq.task(queue="emails", max_retries=3)``.  The function stays
        directly callable; ``.delay(...)`` enqueues it.  A ``name`` makes the stored identity
        independent of where the function lives (safe renames).  ``schedule_at``/``run_at`` and
        ``expected_at`` are defaults for each ``.delay()``; ``serial=True`` runs its jobs one at a
        time; ``failure_hook(job, exc)`` runs when a job fails.  Any other option is an error."""
        check_task_options(extra)

        def decorate(f: Callable[..., Any]) -> TaskFunction[Any, Any]:
            task_name = name or f"{f.__module__}.{f.__qualname__}"
            options = TaskOptions(queue=queue, priority=priority, timeout=timeout,
                                  max_retries=max_retries, retry_in=retry_in,
                                  result_ttl=result_ttl, atomic=atomic, extra=dict(extra))
            register(task_name, f, options)
            return TaskFunction(self, f, task_name, options)

        return decorate(func) if func is not None else decorate

    job = task  # django-pq's @job

    # -- workflows ----------------------------------------------------------------------------------

    def flow(self, queue: Queue | str | None = None, name: str | None = None, *,
             session: Session | None = None) -> Flow:
        """``with pq.flow(q, name="x") as f: f.enqueue(...)``: each step starts after the previous
        one succeeded; all steps are written in one transaction (yours with ``session=``)."""
        from .flows import Flow

        return Flow(self, queue, name, session=session)

    def get_flow(self, flow_id: Flow | FlowView | int) -> FlowView:
        """A flow and its jobs (FlowNotFound once its last job was pruned)."""
        from .flows import Flow, FlowView, load_flows

        flow_id = _id_of(flow_id, (Flow, FlowView), "get_flow", "a flow")

        return load_flows(self, flow_id=flow_id)[0]

    def find_flows(self, name: str | None = None) -> list[FlowView]:
        from .flows import load_flows

        return load_flows(self, name=name)

    def group(self, calls: Iterable[Any], *, queue: str | None = None,
              session: Session | None = None, **options: Any) -> Group:
        """Enqueue several jobs at once (fan-out); ``depends_on=group`` waits for them all."""
        from .flows import Group

        calls = list(calls)
        return Group(list(self.queue(queue_for_calls(calls, queue), session=session)
                          .enqueue_many(calls, **options)))

    def define_job(self, name: str, tasks: Sequence[Any], **options: Any) -> MultiStepJob:
        """django-db-queue's job: ``tasks`` (import paths or callables) run in order, each given
        the job; ``job.workspace`` changes persist from one task to the next.  ``failure_hook``
        (job, exception) runs in the worker when the job fails; ``creation_hook`` (job) runs in
        the process that creates it."""
        from .flows import define_job

        return define_job(name, tasks, **options)

    def define_jobs(self, jobs: dict[str, Any]) -> list[MultiStepJob]:
        """Load django-db-queue's ``JOBS`` setting."""
        from .flows import define_jobs

        return define_jobs(jobs)

    def create_job(self, name: str, *, workspace: dict[str, Any] | None = None,
                   queue: str | None = None, priority: int | None = None,
                   session: Session | None = None, **options: Any) -> Job:
        """Create a job of a defined kind with its initial workspace (django-db-queue)."""
        from .flows import create_job

        return create_job(self, name, workspace=workspace, queue=queue, priority=priority,
                          session=session, **options)

    def __getitem__(self, name: str) -> MessageQueue:
        """pq's message queue: ``pq["apples"].put({...})``, ``.get()``; ``pq["jobs/pickle"]``."""
        from .messages import MessageQueue

        return MessageQueue(self, name)

    # -- schedules ---------------------------------------------------------------------------------

    def schedule(self, func: Any, run_every: Any = None, cron: str | None = None, *,
                 key: str = "", max_concurrent: int | None = 1, active: bool = True,
                 timezone: Any = None, queue: str | None = None, priority: int | None = None,
                 args: Sequence[Any] = (), job_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> Schedule:
        """A periodic task (python-pq): every ``run_every`` (seconds, ``"5m"``, timedelta) or on
        a ``cron`` expression in ``timezone``.  Keyword arguments go to the task.  Calling it
        again with the same task and ``key`` updates the schedule in place: ``active=False``
        pauses it, ``active=True`` resumes it.  A tick is skipped while ``max_concurrent`` of its
        jobs are queued or running (None: no limit)."""
        from .schedules import periodic_request, store

        request = periodic_request(
            self, func, run_every=run_every, cron=cron, key=key, max_concurrent=max_concurrent,
            active=active, timezone=timezone, queue=queue_for(func, queue), priority=priority,
            args=args,
            kwargs=kwargs, job_options=job_options,
        )
        return store(self, request, update_existing=True)

    def unschedule(self, func: Any, key: str = "") -> bool:
        """Delete the periodic task of ``func`` (and ``key``); True if there was one."""
        from sqlalchemy import delete

        from .models import Schedule
        from .tasks import task_ref

        with self.session() as s:
            result = s.execute(delete(Schedule).where(Schedule.task == task_ref(func).name,
                                                      Schedule.key == key))
            return bool(result.rowcount)

    def schedules(self, task: Any = None) -> list[Schedule]:
        """Every schedule (of one task), with its ``next_run_at``."""
        from .schedules import list_schedules
        from .tasks import task_ref

        return list_schedules(self, task=task_ref(task).name if task is not None else None)

    def get_schedule(self, schedule_id: Schedule | int) -> Schedule:
        from .errors import ScheduleNotFound
        from .models import Schedule

        schedule_id = _schedule_id(schedule_id, "get_schedule")
        with self.session() as s:
            found = s.get(Schedule, schedule_id)
            if found is None:
                raise ScheduleNotFound(f"no schedule has id {schedule_id}")
            s.expunge(found)
            return found

    def pause_schedule(self, schedule_id: Schedule | int) -> None:
        self._set_schedule_active(_schedule_id(schedule_id, "pause_schedule"), False)

    def resume_schedule(self, schedule_id: Schedule | int) -> None:
        self._set_schedule_active(_schedule_id(schedule_id, "resume_schedule"), True)

    def _set_schedule_active(self, schedule_id: int, active: bool) -> None:
        from .models import Schedule

        with self.session() as s:
            found = s.get(Schedule, schedule_id, with_for_update=True)
            if found is None:
                from .errors import ScheduleNotFound

                raise ScheduleNotFound(f"no schedule has id {schedule_id}")
            found.active = active

    def delete_schedule(self, schedule_id: Schedule | int) -> None:
        from .models import Schedule

        schedule_id = _schedule_id(schedule_id, "delete_schedule")
        with self.session() as s:
            found = s.get(Schedule, schedule_id)
            if found is not None:
                s.delete(found)

    def _schedule_call(self, queue: Queue, when: Any, func: Any, args: Sequence[Any],
                       kwargs: Any, **options: Any) -> Job | Schedule:
        from .schedules import repeating_request, store

        repeating = any(options.get(k) is not None for k in ("repeat", "interval", "between",
                                                              "weekdays", "until"))
        if not repeating:
            from .timeparse import parse_moment

            moment = when if not isinstance(when, str) else parse_moment(when, what="when")
            return queue.enqueue_call(func, args=args, kwargs=kwargs, run_at=moment, **options)
        request = repeating_request(self, queue, when, func, args, kwargs, **options)
        return store(self, request, update_existing=options.get("key") is not None)

    # -- workers -----------------------------------------------------------------------------------

    def add_metrics_hook(self, hook: MetricsHook) -> MetricsHook:
        """Have every worker built from now on call ``hook(metric)`` for each attempt it records
        (a :class:`~sqla_pq.metrics.JobMetric`: task, queue, outcome, duration, wait).  Usable
        as a decorator; :class:`~sqla_pq.metrics.PrometheusMetrics` is a ready one."""
        self.metrics_hooks.append(hook)
        return hook

    def worker(self, queues: Sequence[str] | str | None = None, **options: Any) -> Worker:
        """A worker (not yet running); ``poll_interval`` is python-pq's name of ``worker_ttl``,
        the seconds between two polls when no NOTIFY came."""
        from .worker import Worker

        if "poll_interval" in options:
            if "worker_ttl" in options:
                raise InvalidOption("give worker_ttl or poll_interval (python-pq's name), not both")
            options["worker_ttl"] = options.pop("poll_interval")
        return Worker(self, queues, **options)

    def run_worker(self, queues: Sequence[str] | str | None = None, **options: Any) -> int:
        """Run a worker in this process until it is stopped (or, with ``burst=True``, until its
        queues are empty).  Returns the number of jobs it processed."""
        return self.worker(queues, **options).run()

    def run_worker_once(self, queues: Sequence[str] | str | None = None, **options: Any) -> bool:
        """Process at most one job, in this process; True if there was one (python-pq)."""
        options.setdefault("isolation", "thread")
        return self.worker(queues, burst=True, max_jobs=1, **options).run() > 0

    # -- schema --------------------------------------------------------------------------------------

    def migrate(self, revision: str = "heads") -> None:
        """Create or upgrade sqla_pq's tables (what ``sqla-pq migrate`` runs)."""
        from .migrations import upgrade

        upgrade(self.engine, revision=revision, schema=self.schema)

    def check_schema(self) -> None:
        """Raise SchemaMissing unless the tables exist."""
        self._run(select(job_table.c.id).limit(1))


class _Repeat(Sequence[Any]):
    """One value, n times, without a list of n references."""

    def __init__(self, value: Any, n: int) -> None:
        self.value, self.n = value, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> Any:
        return self.value


class JobBatch(Sequence["Job"]):
    """The jobs an enqueue just inserted.  ``ids`` is at hand at once; each :class:`Job` object
    is built when first looked at (a 10,000-job batch need not build 10,000 ORM objects)."""

    def __init__(self, pq: PQ, specs: Sequence[JobSpec], params: Sequence[dict[str, Any]],
                 rows: Sequence[Any]) -> None:
        self._pq = pq
        self._specs = specs
        self._params = params
        self._rows = rows
        self._jobs: list[Job | None] = [None] * len(rows)

    @property
    def ids(self) -> list[int]:
        return [row[0] for row in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> Job: ...
    @overload
    def __getitem__(self, index: slice) -> list[Job]: ...

    def __getitem__(self, index: int | slice) -> Job | list[Job]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        job = self._jobs[index]
        if job is None:
            job = self._pq._job_from(self._specs[index], self._params[index], self._rows[index])
            self._jobs[index] = job
        return job

    def __repr__(self) -> str:
        return f"<JobBatch of {len(self)} jobs>"


def _duplicate(client_id: str | None) -> DuplicateClientId:
    return DuplicateClientId(
        f"a job with client_id {client_id!r} already exists; use pq.upsert(...) to replace "
        "it, or pq.get_job_by_client_id(...) to find it"
    )


def _detached_job(values: dict[str, Any]) -> Job:
    """A Job for a row we already hold, without a session round trip: detached, every column
    loaded, nothing modified (what ``make_transient_to_detached`` makes).  ``values`` becomes
    the instance's ``__dict__``: filled attribute by attribute it cost three times as much, and
    a plain enqueue makes one Job per call (E1 in benchmarks/README.md).  A fresh state has no
    committed or expired attributes to reset."""
    mapper, state_attr = _job_orm()
    job = mapper.class_manager.new_instance()
    state = job.__dict__[state_attr]
    values[state_attr] = state
    job.__dict__ = values
    state.key = mapper.identity_key_from_primary_key((values["id"],))
    return job


def _id_of(value: Any, kinds: tuple[type, ...], method: str, what: str) -> int:
    """The id of ``value``: an int as it is, or the ``id`` of one of ``kinds``.  Anything else
    is refused by name here, not as a driver's "can't adapt" error."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, kinds) and isinstance(value.id, int):
        return int(value.id)
    names = " or ".join(k.__name__ for k in kinds)
    raise InvalidOption(
        f"pq.{method}() takes {what} ({names}) or its id (an int), not {type(value).__name__} "
        f"{value!r}"
    )


def _job_id(job: Any, method: str) -> int:
    """python-pq's ``pq.cancel(pq.enqueue(f))`` passes what enqueue returned: a Job here."""
    if isinstance(job, int) and not isinstance(job, bool):
        return job  # the common case imports nothing (workers keep the ORM out)
    from .models import Job

    return _id_of(job, (Job,), method, "a job")


def _schedule_id(schedule: Any, method: str) -> int:
    """``pq.pause_schedule(pq.schedule(...))``: a Schedule or its id."""
    from .models import Schedule

    return _id_of(schedule, (Schedule,), method, "a schedule")


@functools.cache
def _job_orm() -> tuple[Any, str]:
    """Job's configured mapper and the key of its instances' state, imported on first use:
    the ORM stays out of worker processes."""
    from sqlalchemy.orm import configure_mappers

    from .models import Job

    if not Job.__mapper__.configured:
        configure_mappers()
    return Job.__mapper__, Job.__mapper__.class_manager.STATE_ATTR
