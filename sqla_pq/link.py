"""A connection a worker holds for one role (claim, heartbeat, maintenance).

Checked out once from the application's own engine, so every connect argument, creator and pool
event the application configured applies; labelled with ``application_name =
sqla_pq:<role>:<worker>``; in autocommit, so a single statement is a single round trip, with an
explicit ``transaction()`` for the few multi-statement steps.  When the database goes away the
link is reset and the caller retries with backoff.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine, Result

from .db import Prepared, RawStatement, app_name, compile_raw, run_prepared, run_raw

log = logging.getLogger("sqla_pq.worker")


class Link:
    def __init__(self, engine: Engine, role: str, worker: str | None = None,
                 schema: str | None = None, prepare: bool = True,
                 settings: dict[str, str] | None = None, session_state: bool = True) -> None:
        self.engine = engine
        self.role = role
        self.app_name = app_name(role, worker) if session_state else None
        """The connection's label; None behind a transaction pooler, where a session-level
        SET would stick to a server connection other clients get next."""
        self.schema = schema
        self.prepare = prepare and session_state and engine.dialect.driver == "psycopg2"
        self._conn: Connection | None = None
        self._cursor: Any = None
        self._prepared: dict[str, Prepared | None] = {}
        self.settings = dict(settings or {}) if self.prepare else {}
        """Session settings for this connection (reset when it goes back to the pool)."""

    @property
    def conn(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._open()
        return self._conn

    def _open(self) -> Connection:
        conn = self.engine.connect()
        try:
            if self.app_name is not None:
                conn.exec_driver_sql(f"SET application_name = '{self.app_name}'")
            for name, value in self.settings.items():
                conn.exec_driver_sql(f"SET {name} = {value}")
            conn.commit()
            opts: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"}
            if self.schema:
                opts["schema_translate_map"] = {None: self.schema}
            conn = conn.execution_options(**opts)
        except BaseException:
            conn.close()
            raise
        return conn

    def execute(self, statement: Any, params: Any = None) -> Result[Any]:
        """One statement, one round trip, its own transaction."""
        return self.conn.execute(statement, params)

    def run(self, statement: Any, params: dict[str, Any] | None = None, *,
            prepare: bool = True) -> list[tuple[Any, ...]]:
        """A hot-path statement on the DBAPI cursor: one round trip, no SQLAlchemy overhead,
        and (once per connection) a server-side prepared plan: the claim is planned once, not
        at every call."""
        conn = self.conn
        if self._cursor is None or self._cursor.closed:
            self._cursor = conn.connection.dbapi_connection.cursor()
        raw = (statement if isinstance(statement, RawStatement)
               else compile_raw(statement, self.engine.dialect, self.schema))
        if not (self.prepare and prepare):
            return run_raw(self._cursor, raw, params)
        return run_prepared(self._cursor, raw, params, self._prepared,
                            in_transaction=not conn.connection.dbapi_connection.autocommit)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Link]:
        """Several statements in one transaction (BEGIN/COMMIT are extra round trips)."""
        conn = self.conn
        if conn.in_transaction():
            conn.commit()  # the logical autobegun transaction of autocommit mode; no round trip
        conn.execution_options(isolation_level="READ COMMITTED")
        try:
            with conn.begin():
                yield self
        finally:
            if not conn.invalidated and not conn.closed:
                conn.execution_options(isolation_level="AUTOCOMMIT")

    def reset(self) -> None:
        """Drop the connection after an error; the next use opens a new one."""
        conn, self._conn = self._conn, None
        self._cursor = None
        self._prepared = {}
        if conn is None:
            return
        try:
            conn.invalidate()
        except Exception:  # already gone
            pass
        try:
            conn.close()
        except Exception:
            pass

    def close(self) -> None:
        conn, self._conn = self._conn, None
        self._cursor = None
        prepared, self._prepared = self._prepared, {}
        if conn is None or conn.closed:
            return
        try:
            if not conn.invalidated:
                if any(prepared.values()):  # the connection goes back to your pool clean
                    conn.exec_driver_sql("DEALLOCATE ALL")
                for name in self.settings:
                    conn.exec_driver_sql(f"RESET {name}")
                if self.app_name is not None:
                    conn.execute(text("RESET application_name"))
        except Exception:
            pass
        try:
            conn.close()
        except Exception:
            pass

    def backend_pid(self) -> int:
        return int(self.execute(text("SELECT pg_backend_pid()")).scalar_one())

