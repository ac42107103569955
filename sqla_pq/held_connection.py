"""One pooled connection held between PQ's own one-statement transactions.

An enqueue without a session (and ``get_job``, ``cancel``...) is one autocommit statement.
Checking a connection out of SQLAlchemy's pool and back for it costs as much Python as the rest
of the call: the pool's lock and queue, checkout and checkin events, a weak reference, the reset
on return.  Measured on an enqueue loop: the bare statement 343 µs per call, the same with a
checkout and return around it 411 µs.  So each engine's first caller keeps one connection
checked out, in autocommit, and the next statements run on it; a thread that finds it busy
checks one out of the pool as before.

It goes back to the pool when nothing used it for ``idle`` seconds (the ``hold_connection``
setting of the PQ that first used it; a small thread returns it;
the next use then checks one out again, with the pool's pre-ping and recycle), when the engine
is disposed (closed then: a test that drops its database right after must not find it open),
after an error that leaves the connection in doubt, and at ``PQ.close`` (:func:`release`).  A fork child
never uses or closes its parent's: it keeps a reference to it, unused, and holds its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import QueuePool

from .db import is_dbapi_connection_error

log = logging.getLogger("sqla_pq")

DISCARD_WAIT = 0.1
"""Seconds ``discard`` waits for the connection to be free (the reaper holds it for
microseconds); past it, the thread running a statement on it lets go when that ends."""

_HELD: weakref.WeakKeyDictionary[Engine, HeldConnection] = weakref.WeakKeyDictionary()
_HELD_LOCK = threading.Lock()
_INHERITED: list[Any] = []
"""A fork child's references to its parent's held connections: never used, never closed
(closing would end the parent's session on the shared socket)."""


def held_for(engine: Engine, idle: float) -> HeldConnection | None:
    """The engine's held connection (one per engine per process), or None when ``idle`` is 0
    or the pool is not a queue pool: a ``NullPool`` user asked for no idle connections, and a
    ``SingletonThreadPool`` or ``StaticPool`` is cheap already."""
    if idle <= 0 or not isinstance(engine.pool, QueuePool):
        return None
    held = _HELD.get(engine)
    if held is not None:
        return held
    with _HELD_LOCK:
        held = _HELD.get(engine)
        if held is None:
            held = _HELD[engine] = HeldConnection(engine, idle)
            event.listen(engine, "engine_disposed", _on_disposed)
    return held


def _on_disposed(engine: Engine) -> None:
    held = _HELD.get(engine)
    if held is not None:
        held.discard(close=True)


class HeldConnection:
    """The held connection of one engine (see the module's docstring).  ``acquire`` gives its
    cursor and connection ``info``, or None when another thread has it; ``release`` after."""

    def __init__(self, engine: Engine, idle: float) -> None:
        self._engine = weakref.ref(engine)  # a strong one would keep the registry's key alive
        self.idle = idle
        self._lock = threading.Lock()
        self._fairy: Any = None
        self._cursor: Any = None
        self._last_used = 0.0
        self._pid = 0
        """The process that checked it out: another one (a fork child) never touches it."""
        self._let_go: bool | None = None
        """Set by :meth:`discard` while the connection is in use: its user gives it back
        (False) or closes it (True) instead of keeping it."""
        self._reaper: threading.Thread | None = None

    @property
    def holding(self) -> bool:
        return self._fairy is not None

    def acquire(self) -> tuple[Any, dict[str, Any]] | None:
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._fairy is not None and self._pid != os.getpid():
                self._forget_inherited()  # a fork the at-fork hook did not see (uWSGI)
            elif self._fairy is not None and self._let_go is not None:
                self._give_back(close=self._let_go)  # disposed while it was in use
            elif self._fairy is not None and time.monotonic() - self._last_used > self.idle:
                self._give_back()  # the reaper is late: check one out afresh
            if self._fairy is None:
                self._check_out()
            return self._cursor, self._fairy.info
        except BaseException:
            self._lock.release()
            raise

    def release(self, exc: BaseException | None = None) -> None:
        """After the statement: keep the connection, unless ``exc`` leaves it in doubt."""
        try:
            if self._fairy is None:
                return
            if exc is not None and _in_doubt(exc, self._fairy.dbapi_connection):
                self._give_back(exc, close=bool(self._let_go))
            elif self._let_go is not None:
                self._give_back(close=self._let_go)
            else:
                self._last_used = time.monotonic()
        finally:
            self._lock.release()

    def discard(self, close: bool = False) -> None:
        """Let go of the connection: now if it is free, else when its user releases it.
        ``close`` closes it instead of pooling it (its engine was disposed)."""
        # Said first: a user who releases it while this waits finds it and lets go.
        self._let_go = bool(self._let_go) or close
        if not self._lock.acquire(timeout=DISCARD_WAIT):
            return  # a statement is running on it: its user lets go when it ends
        try:
            if self._fairy is None:
                self._let_go = None
            elif self._pid != os.getpid():
                self._forget_inherited()
            else:
                self._give_back(close=bool(self._let_go))
        finally:
            self._lock.release()

    # -- internals (called with the lock held) --------------------------------------------------

    def _check_out(self) -> None:
        engine = self._engine()
        if engine is None:  # pragma: no cover - its caller holds the engine
            raise RuntimeError("the engine of this held connection is gone")
        self._let_go = None  # said of the connection before; one said from here on stays
        fairy = engine.raw_connection()
        try:
            dbapi = fairy.dbapi_connection
            dbapi.autocommit = True
            self._cursor = dbapi.cursor()
        except BaseException:
            fairy.invalidate()
            raise
        self._fairy = fairy
        self._pid = os.getpid()
        self._last_used = time.monotonic()
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="sqla_pq-held-connection",
                                            daemon=True)
            self._reaper.start()

    def _give_back(self, exc: BaseException | None = None, close: bool = False) -> None:
        """To the pool, which resets it; closed instead when ``close``, when it is broken or
        when it cannot leave autocommit (a statement still running after an interrupt)."""
        fairy, self._fairy, cursor, self._cursor = self._fairy, None, self._cursor, None
        self._let_go = None
        dbapi = fairy.dbapi_connection
        try:
            cursor.close()
        except Exception:  # noqa: BLE001 - a broken connection's cursor: decided below
            pass
        if close or getattr(dbapi, "closed", 0) or (exc is not None and is_dbapi_connection_error(exc)):
            fairy.invalidate(exc if isinstance(exc, Exception) else None)
            return
        try:
            dbapi.autocommit = False
        except Exception:  # noqa: BLE001
            fairy.invalidate()
            return
        fairy.close()

    def _reap(self) -> None:
        """Give the connection back once it has been idle for ``idle`` seconds, then end."""
        left = self.idle
        while True:
            time.sleep(left + 0.01)
            left = self.idle
            if self._lock.acquire(blocking=False):  # else it is in use: not idle
                try:
                    if self._fairy is None:
                        self._reaper = None
                        return
                    left = self._last_used + self.idle - time.monotonic()
                    if left <= 0:
                        self._reaper = None
                        try:
                            self._give_back(close=bool(self._let_go))
                        except Exception:  # noqa: BLE001 - the pool's reset failed: it is gone
                            log.debug("could not give the held connection back", exc_info=True)
                        return
                finally:
                    self._lock.release()

    def _forget_inherited(self) -> None:
        """In a fork child: drop the parent's connection without touching its socket.  It is
        detached from the child's copy of the pool (which frees that pool's slot and touches
        nothing but bookkeeping) and kept referenced for good: a psycopg2 connection that is
        garbage collected sends the server its goodbye, which would end the parent's session."""
        fairy = self._fairy
        if fairy is not None:
            _INHERITED.append((fairy, self._cursor))
            try:
                fairy.detach()
            except Exception:  # noqa: BLE001 - bookkeeping only; the slot stays taken
                pass
        self._fairy = self._cursor = self._reaper = None
        self._let_go = None

    def _forked(self) -> None:
        """The at-fork hook, in the child: no thread holds anything here any more."""
        self._lock = threading.Lock()
        self._forget_inherited()


def _in_doubt(exc: BaseException, dbapi: Any) -> bool:
    """After ``exc``, is the connection's state unknown?  Yes for a lost or closed connection
    and for an interrupt (KeyboardInterrupt, SystemExit) that may have come in the middle of a
    statement; no for a statement the server refused or an error of the caller's own
    (``JobNotFound`` after the statement ran): the connection is fine, keep it."""
    return (not isinstance(exc, Exception) or bool(getattr(dbapi, "closed", 0))
            or is_dbapi_connection_error(exc))


def release(engine: Engine) -> None:
    """Give the engine's held connection back to its pool (``PQ.close``)."""
    held = _HELD.get(engine)
    if held is not None:
        held.discard()


def _after_fork_in_child() -> None:
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # a parent thread may have held it at the fork
    for held in list(_HELD.values()):
        held._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
