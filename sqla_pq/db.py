"""Connections: from whatever the user hands us to engines for each role.

``PQ`` accepts a sessionmaker, a scoped session, an Engine or a URL.  Plain ``postgresql://``
URLs are pinned to psycopg2 (SQLAlchemy 2.1 would otherwise pick psycopg 3).  Workers open their
own small engines per *role* (claim, heartbeat, listen, maintenance, child) from the same URL, each
with ``application_name = sqla_pq:<role>:<worker>`` so operators, and the fault tests, can tell
them apart in ``pg_stat_activity``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError

from .errors import ConfigurationError, SchemaMissing

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

APP_NAME_PREFIX = "sqla_pq"


def normalize_url(url: str | URL) -> URL:
    """Accept plain PostgreSQL URLs and use psycopg2 unless the URL names a driver."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg2")
    if not u.drivername.startswith("postgresql"):
        raise ConfigurationError(
            f"sqla_pq needs PostgreSQL; {u.drivername!r} URLs are not supported"
        )
    return u


def engine_from(target: Any) -> tuple[Engine, sessionmaker[Session] | None]:
    """The Engine behind a sessionmaker / scoped_session / Engine / URL (and the factory)."""
    if isinstance(target, Engine):
        return target, None
    if isinstance(target, (str, URL)):
        return create_engine(target), None
    # anything else is an ORM object: the application has imported the ORM already
    from sqlalchemy.orm import Session, scoped_session, sessionmaker

    if isinstance(target, scoped_session):
        factory = target.session_factory
        return _bind_of(factory), factory
    if isinstance(target, sessionmaker):
        return _bind_of(target), target
    if isinstance(target, Session):
        raise ConfigurationError(
            "PQ() takes a sessionmaker, an Engine or a URL, not a Session; pass the session to "
            "pq.queue(name, session=session) to enqueue inside it"
        )
    raise ConfigurationError(
        f"PQ() takes a sessionmaker, an Engine or a URL, not {type(target).__name__}"
    )


def _bind_of(factory: sessionmaker[Session]) -> Engine:
    bind = factory.kw.get("bind")
    if isinstance(bind, Engine):
        return bind
    if isinstance(bind, Connection):
        return bind.engine
    with factory() as session:
        found = session.get_bind()
    if isinstance(found, Connection):
        return found.engine
    return found


def create_engine(url: str | URL, *, application_name: str | None = None, **kw: Any) -> Engine:
    u = normalize_url(url)
    connect_args = dict(kw.pop("connect_args", {}) or {})
    if application_name and u.get_dialect().driver == "psycopg2":
        connect_args.setdefault("application_name", application_name[:63])
    # No pre-ping (a round trip before every checkout): sqla_pq's own operations retry once
    # on a connection that turns out dead, and workers reconnect with backoff.
    kw.setdefault("pool_pre_ping", False)
    kw.setdefault("pool_recycle", 3600)
    return sa.create_engine(u, connect_args=connect_args, **kw)


def app_name(role: str, worker: str | None = None) -> str:
    name = f"{APP_NAME_PREFIX}:{role}"
    if worker:
        name += f":{worker}"
    return name[:63]


def role_engine(base: Engine, role: str, worker: str | None = None, *, pool_size: int = 2,
                schema_map: dict[Any, Any] | None = None) -> Engine:
    """An engine on the same database as ``base`` for one worker role.  Autocommit: each
    statement is its own short transaction unless a caller opens one with ``begin()``."""
    engine = create_engine(
        base.url,
        application_name=app_name(role, worker),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=3600,
    )
    opts: dict[str, Any] = {}
    if schema_map:
        opts["schema_translate_map"] = schema_map
    return engine.execution_options(**opts) if opts else engine


def psycopg2_dsn(engine_or_url: Engine | URL | str, *, application_name: str | None = None) -> dict[str, Any]:
    """psycopg2.connect() keyword arguments for a raw connection (the LISTEN socket)."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else normalize_url(engine_or_url)
    dialect = sa.dialects.registry.load("postgresql.psycopg2")()
    _, kwargs = dialect.create_connect_args(url)
    if application_name:
        kwargs["application_name"] = application_name[:63]
    return kwargs


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of a driver's error: psycopg2 calls it ``pgcode``, psycopg 3 ``sqlstate``."""
    return getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)


def _driver_connection_class(exc: BaseException | None) -> bool:
    """An OperationalError or InterfaceError of any driver, subclasses included (psycopg 3's
    ConnectionTimeout): without a SQLSTATE, the connection failed, not the statement."""
    return exc is not None and any(
        kind.__name__ in ("OperationalError", "InterfaceError") for kind in type(exc).__mro__)


def is_connection_error(exc: BaseException) -> bool:
    """True when the database went away (restart, terminate, network), as opposed to a bad
    statement: the caller should reconnect and retry."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        pgcode = sqlstate(orig)
        if pgcode and pgcode[:2] in ("08", "57"):  # connection exception, operator intervention
            return True
        return _driver_connection_class(orig) and pgcode is None
    return False


def is_connection_lost(exc: BaseException) -> bool:
    """Narrower than :func:`is_connection_error`: the connection itself went away (class 08,
    a server shutdown, an invalidated connection), not a statement cancelled by
    ``statement_timeout`` or an operator (57014), which is the statement's own failure."""
    pgcode = sqlstate(getattr(exc, "orig", None))
    if pgcode:
        return pgcode[:2] == "08" or pgcode in ("57P01", "57P02", "57P03")
    return is_connection_error(exc)


def raise_if_schema_missing(exc: BaseException) -> None:
    """Translate 'relation pq_job does not exist' into SchemaMissing."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    pgcode = sqlstate(orig)
    if pgcode in ("42P01", "42883") and "pq_" in str(orig):
        raise SchemaMissing() from exc


@dataclass(frozen=True)
class RawStatement:
    """A Core statement compiled once to the driver's SQL, for the hot paths that run it on the
    DBAPI cursor directly (SQLAlchemy's execution layer costs as much as a round trip there)."""

    sql: str
    defaults: dict[str, Any]
    types: dict[str, str] = dataclasses.field(default_factory=dict)
    """Each parameter's SQL type, for PREPARE (where PostgreSQL cannot infer one)."""

    def params(self, given: dict[str, Any] | None) -> dict[str, Any]:
        if not self.defaults:
            return given or {}
        return {**self.defaults, **(given or {})}


SCHEMA_TOKEN = "__[SCHEMA__none]"


BATCH_PLACEHOLDER = 987654323
"""A batch size no claim asks for: :func:`compile_sized` compiles a claim once with it and
writes each real size into the SQL text."""


@functools.lru_cache(maxsize=256)
def compile_sized(builder: Any, queues: Any, priorities: Any, batch: int, dialect: Any,
                  schema: str | None) -> RawStatement:
    """``builder(queues, priorities, batch)`` compiled: one SQLAlchemy compile for every batch
    size (the size is a literal of the SQL, see ``queries._batch_limit``), each size then its
    own SQL text, so its own prepared statement and plan."""
    template = compile_raw(builder(queues, priorities, BATCH_PLACEHOLDER), dialect, schema)
    placeholder = str(BATCH_PLACEHOLDER)
    if placeholder not in template.sql:
        raise ValueError(f"{builder.__name__} does not write its batch size into the SQL")
    return dataclasses.replace(template, sql=template.sql.replace(placeholder, str(int(batch))))


@functools.lru_cache(maxsize=512)
def compile_raw(statement: Any, dialect: Any, schema: str | None) -> RawStatement:
    kw: dict[str, Any] = {}
    if schema:
        kw["schema_translate_map"] = {None: schema}
    compiled = statement.compile(dialect=dialect, **kw)
    if "__[POSTCOMPILE_" in compiled.string:
        raise ValueError("raw statements cannot take expanding IN parameters; use = ANY(array)")
    sql = compiled.string
    if schema:
        sql = sql.replace(SCHEMA_TOKEN, dialect.identifier_preparer.quote_schema(schema))
    if compiled.positiontup:
        raise ValueError("raw statements need a named paramstyle")
    defaults = {k: v for k, v in compiled.params.items()}
    return RawStatement(sql, defaults, _param_types(compiled, dialect))


def _param_types(compiled: Any, dialect: Any) -> dict[str, str]:
    from sqlalchemy.types import NullType

    types = {}
    for name, bind in compiled.binds.items():
        kind = bind.type
        if isinstance(kind, NullType):
            types[name] = "unknown"
            continue
        try:
            types[name] = kind.compile(dialect=dialect)
        except Exception:
            types[name] = "unknown"
    return types


def run_raw(cursor: Any, raw: RawStatement, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Execute on a DBAPI cursor; return all rows (empty for statements without RETURNING)."""
    cursor.execute(raw.sql, raw.params(params))
    if cursor.description is None:
        return []
    return cursor.fetchall()


_PARAM = re.compile(r"%\((\w+)\)s")
_UNSEEN: Any = object()


@dataclass(frozen=True)
class Prepared:
    """A statement PREPAREd on one connection: its $n body and the EXECUTE that calls it."""

    name: str
    prepare_sql: str
    execute_sql: str

    @classmethod
    def of(cls, sql: str, index: int, types: dict[str, str] | None = None) -> Prepared:
        order: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in order:
                order.append(name)
            return f"${order.index(name) + 1}"

        body = _PARAM.sub(number, sql).replace("%%", "%")
        name = f"sqla_pq_{index}_{hashlib.sha1(sql.encode()).hexdigest()[:10]}"
        args = ", ".join(f"%({n})s" for n in order)
        execute = f"EXECUTE {name}({args})" if order else f"EXECUTE {name}"
        signature = ""
        if order and types:
            signature = " (" + ", ".join(types.get(n, "unknown") for n in order) + ")"
        return cls(name, f"PREPARE {name}{signature} AS {body}", execute)


def run_prepared(cursor: Any, raw: RawStatement, params: dict[str, Any] | None,
                 cache: dict[Any, Any], in_transaction: bool = False) -> list[tuple[Any, ...]]:
    """Run ``raw`` through a server-side prepared statement of this connection (prepared on
    first use and remembered in ``cache``, the connection's own), so PostgreSQL parses and
    plans it once.  A statement that cannot be prepared runs plainly; a connection that lost
    its prepared statements (DISCARD ALL by a pool) prepares them again."""
    prepared = cache.get(raw.sql, _UNSEEN)
    if prepared is _UNSEEN:
        prepared = Prepared.of(raw.sql, len(cache), raw.types)
        if not _try(cursor, prepared.prepare_sql, in_transaction):
            cache[raw.sql] = None
            return run_raw(cursor, raw, params)
        cache[raw.sql] = prepared
    if prepared is None:
        return run_raw(cursor, raw, params)
    try:
        cursor.execute(prepared.execute_sql, raw.params(params))
    except Exception as exc:
        if in_transaction or not _forget_lost_statements(cursor, exc, cache):
            raise
        return run_prepared(cursor, raw, params, cache)
    return cursor.fetchall() if cursor.description is not None else []


MAX_FIXED_STATEMENTS = 64
"""Statements a connection prepares with a plan's values written in; past it, plans share the
generic prepared statement (each one costs the server a plan per connection)."""

_FIXED_COUNT = "sqla_pq:fixed statements"


@dataclass(frozen=True)
class FixedPrepared:
    """A statement PREPAREd on one connection with its fixed parameters written in as
    literals (quoted by psycopg2, as any parameter), so an EXECUTE sends, and the server
    evaluates, only the varying ones.  Quoting five parameters and evaluating them cost a
    one-job enqueue more than the rest of its Python (benchmarks/README.md, E1)."""

    name: str
    prepare_sql: bytes
    execute_sql: str
    constant_sql: bytes
    """The whole EXECUTE for ``constant``: a call without arguments quotes nothing."""
    constant: tuple[Any, ...]

    @classmethod
    def of(cls, cursor: Any, raw: RawStatement, fixed: dict[str, Any], varying: tuple[str, ...],
           constant: tuple[Any, ...], index: int) -> FixedPrepared:
        sql = raw.sql
        for number, name in enumerate(varying, 1):
            sql = sql.replace(f"%({name})s", f"${number}")
        params = raw.params(fixed)
        body = cursor.mogrify(sql, params) if params else sql.replace("%%", "%").encode()
        name = f"sqla_pq_f{index}_{hashlib.sha1(body).hexdigest()[:10]}"
        signature = ", ".join(raw.types.get(n, "unknown") for n in varying)
        execute = f"EXECUTE {name}(" + ", ".join(["%s"] * len(varying)) + ")"
        return cls(name, f"PREPARE {name} ({signature}) AS ".encode() + body, execute,
                   cursor.mogrify(execute, constant), constant)


def run_fixed(cursor: Any, raw: RawStatement, fixed: dict[str, Any], key: Any,
              varying: tuple[str, ...], values: tuple[Any, ...], constant: tuple[Any, ...],
              cache: dict[Any, Any], in_transaction: bool = False) -> list[tuple[Any, ...]]:
    """Run ``raw`` with ``fixed`` and ``dict(zip(varying, values))`` through a statement of
    this connection prepared for ``key`` (a call plan) with ``fixed`` written in.  Falls back
    to :func:`run_prepared` past :data:`MAX_FIXED_STATEMENTS` or when it cannot prepare."""
    prepared = cache.get(key, _UNSEEN)
    if prepared is _UNSEEN:
        count = cache.get(_FIXED_COUNT, 0)
        if count >= MAX_FIXED_STATEMENTS:  # not remembered: plans that come and go past the
            prepared = None                # cap must not grow the connection's cache
        else:
            cache[_FIXED_COUNT] = count + 1
            prepared = FixedPrepared.of(cursor, raw, fixed, varying, constant, len(cache))
            if not _try(cursor, prepared.prepare_sql, in_transaction):
                prepared = None
            cache[key] = prepared
    if prepared is None:
        return run_prepared(cursor, raw, {**fixed, **dict(zip(varying, values))}, cache,
                            in_transaction)
    try:
        if values == prepared.constant:
            cursor.execute(prepared.constant_sql)
        else:
            cursor.execute(prepared.execute_sql, values)
    except Exception as exc:
        if in_transaction or not _forget_lost_statements(cursor, exc, cache):
            raise
        return run_fixed(cursor, raw, fixed, key, varying, values, constant, cache)
    return cursor.fetchall() if cursor.description is not None else []


def _forget_lost_statements(cursor: Any, exc: BaseException, cache: dict[Any, Any]) -> bool:
    """True, with the connection's statements forgotten, when ``exc`` says they are lost
    (DISCARD ALL by a pool) or stale (a migration changed the columns a statement returns;
    PostgreSQL refuses to run it again): the caller prepares afresh.  Outside a transaction
    only, where the failed EXECUTE left nothing to roll back."""
    code = sqlstate(exc)
    if code == "0A000" and "cached plan must not change result type" in str(exc):
        cursor.execute("DEALLOCATE ALL")
    elif code != "26000":  # invalid_sql_statement_name
        return False
    cache.clear()
    return True


def _try(cursor: Any, sql: str | bytes, in_transaction: bool) -> bool:
    """Run a PREPARE; False when the statement cannot be prepared.  Inside a transaction a
    savepoint keeps the caller's transaction alive if it fails."""
    if in_transaction:
        cursor.execute("SAVEPOINT sqla_pq_prepare")
    try:
        cursor.execute(sql)
    except Exception as exc:
        if is_dbapi_connection_error(exc):
            raise
        if in_transaction:
            cursor.execute("ROLLBACK TO SAVEPOINT sqla_pq_prepare")
        return False
    if in_transaction:
        cursor.execute("RELEASE SAVEPOINT sqla_pq_prepare")
    return True


class RawAutocommit:
    """A pooled DBAPI connection in autocommit for one short operation: one statement, one
    round trip.  Entering gives a cursor and the connection's ``info`` dict (it lives as long
    as the DBAPI connection); the connection goes back to the pool as it came (autocommit off).
    A missing schema surfaces as :class:`SchemaMissing`.

    A class rather than a generator context manager: every own-transaction enqueue passes
    here, and on an enqueue that follows idle time (a web request's) each Python call runs
    with cold caches, so the calls saved count several times over."""

    __slots__ = ("_engine", "_fairy", "_cursor")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __enter__(self) -> tuple[Any, dict[str, Any]]:
        fairy = self._fairy = self._engine.raw_connection()
        try:
            dbapi = fairy.dbapi_connection
            dbapi.autocommit = True
            self._cursor = dbapi.cursor()
        except BaseException as exc:
            self._release(exc)
            raise
        return self._cursor, fairy.info

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self._cursor.close()
        finally:
            self._release(exc)
        if exc is not None:
            raise_if_schema_missing(exc)

    def _release(self, exc: BaseException | None) -> None:
        fairy = self._fairy
        dbapi = fairy.dbapi_connection
        broken = exc is not None and _dbapi_connection_broken(dbapi, exc)
        if broken:
            fairy.invalidate(exc if isinstance(exc, Exception) else None)
        else:
            try:
                dbapi.autocommit = False
            except Exception:
                fairy.invalidate()
        fairy.close()


def _dbapi_connection_broken(dbapi: Any, exc: BaseException) -> bool:
    closed = getattr(dbapi, "closed", 0)
    if closed:
        return True
    return _driver_connection_class(exc) and sqlstate(exc) is None


def is_dbapi_connection_error(exc: BaseException) -> bool:
    """Raw-driver counterpart of :func:`is_connection_error`."""
    if isinstance(exc, DBAPIError):
        return is_connection_error(exc)
    pgcode = sqlstate(exc)
    if pgcode and pgcode[:2] in ("08", "57"):
        return True
    return _driver_connection_class(exc) and pgcode is None


@contextlib.contextmanager
def translating_schema_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise_if_schema_missing(exc)
        raise


def protect_pool_across_fork(engine: Engine) -> None:
    """Make ``engine``'s pool safe in fork children, lazily (SQLAlchemy's documented recipe):
    a pooled connection remembers the pid that opened it, and a checkout in another process
    discards it without closing it (the parent still uses that socket) and connects anew.
    Cheaper than disposing the pool in every child: only a child that uses the engine pays.
    Existing idle connections are closed first, so every connection carries its pid."""
    import os

    from sqlalchemy import event, exc

    if engine.pool.__dict__.get("_sqla_pq_fork_safe"):
        return

    @event.listens_for(engine, "connect")
    def _remember_pid(dbapi_connection: Any, record: Any) -> None:
        record.info["sqla_pq_pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _refuse_foreign(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        pid = os.getpid()
        if record.info.get("sqla_pq_pid", pid) != pid:
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError(
                f"connection opened by process {record.info['sqla_pq_pid']}, not {pid}"
            )

    engine.dispose()  # idle connections opened before the listener: close them here, once
    engine.pool.__dict__["_sqla_pq_fork_safe"] = True
