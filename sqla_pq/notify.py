"""LISTEN/NOTIFY wake-ups, and what to do when they cannot be trusted.

One connection per worker listens on the fixed channel ``sqla_pq``.  Payloads are queue names
(an insert trigger sends one per queue per transaction, at commit) or commands starting with
``!`` (``!stop <worker>``, ``!stop *``, ``!ping <token>``).  Notifications are lost while the
listener is disconnected, so every (re)connect is followed by a catch-up claim, and the worker
still polls every ``worker_ttl`` seconds.  A health check NOTIFYs a private token through another
connection and expects it back: a half-open socket, or a pooler that drops notifications
(pgbouncer in transaction mode), shows up as a missing echo.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from .db import app_name
from .tables import NOTIFY_CHANNEL

log = logging.getLogger("sqla_pq.worker")


def pending_payloads(conn: Any) -> list[str]:
    """The payloads of the notifications a LISTENing DBAPI connection has received, read
    without blocking: psycopg2's ``poll()``/``notifies`` list, or psycopg 3's ``notifies()``
    generator with no wait.  Raises if the connection broke."""
    if hasattr(conn, "poll"):  # psycopg2
        conn.poll()
        notes, conn.notifies[:] = list(conn.notifies), []
    else:  # psycopg 3.2+
        notes = list(conn.notifies(timeout=0))
    return [note.payload or "" for note in notes]


def _check_listenable(conn: Any) -> None:
    """psycopg 3 reads notifications without blocking only from 3.2 on (``notifies(timeout=)``)."""
    if hasattr(conn, "poll"):
        return
    import psycopg

    if tuple(int(p) for p in psycopg.__version__.split(".")[:2]) < (3, 2):
        from .errors import ConfigurationError

        raise ConfigurationError(
            f"LISTEN through psycopg {psycopg.__version__} is not supported: upgrade to psycopg "
            "3.2 or later, or give the workers a psycopg2 URL (listen_url, or the engine)")


@dataclass
class Wakeups:
    """What arrived since the last drain."""

    queues: set[str] = field(default_factory=set)
    commands: list[str] = field(default_factory=list)
    pongs: set[str] = field(default_factory=set)


class Listener:
    def __init__(self, engine: Engine, worker: str | None = None, *, keepalive_idle: int = 10,
                 label: bool = True) -> None:
        self.engine = engine
        self.app_name = app_name("listen", worker) if label else None
        self.keepalive_idle = keepalive_idle
        self._conn: Any = None
        self._fd = -1
        self.connected_at: float | None = None
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def connect(self) -> None:
        """Open the connection and LISTEN, here and now.  Raises on failure."""
        self.adopt(self.open())

    def open(self) -> Any:
        """A new LISTENing DBAPI connection (detached from the pool), not yet in use: the
        worker opens it in a thread, so a connect that hangs never stalls its loop."""
        fairy = self.engine.raw_connection()
        fairy.detach()  # ours for good: it must never go back to the pool while LISTENing
        conn = fairy.dbapi_connection
        try:
            _check_listenable(conn)
            conn.autocommit = True
            with conn.cursor() as cur:
                if self.app_name is not None:  # (SET takes no bound parameter in psycopg 3)
                    cur.execute("SELECT set_config('application_name', %s, false)",
                                (self.app_name,))
                cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except BaseException:
            try:
                conn.close()
            finally:
                raise
        return conn

    def adopt(self, conn: Any) -> None:
        """Start using a connection from :meth:`open`."""
        self.close()
        self._conn = conn
        self._fd = int(conn.fileno())
        self.connected_at = time.monotonic()

    def fileno(self) -> int:
        """The socket's descriptor as registered (still known once the connection broke)."""
        return self._fd

    def drain(self) -> Wakeups:
        """Read what the socket holds (call when it is readable).  Raises if the connection
        broke; the caller reconnects."""
        wake = Wakeups()
        for payload in pending_payloads(self._conn):
            if payload.startswith("!ping "):
                wake.pongs.add(payload[6:])
            elif payload.startswith("!"):
                wake.commands.append(payload[1:])
            elif payload:
                wake.queues.add(payload)
        return wake

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    @staticmethod
    def new_token() -> str:
        return secrets.token_hex(8)
