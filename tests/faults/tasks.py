"""Tasks the fault scenarios enqueue (importable by worker processes as ``tests.faults.tasks``).

``work`` writes the execution ledger: one ``fault_ledger`` row per execution, started, ticked
(``last_seen``) and finished with the database's clock, through a connection of its own that
is cached per process and thread (a fork child opens its own).  Ledger writes survive a
database restart (they retry until the server is back): the ledger must not be the thing that
fails a job.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import psycopg2

from sqla_pq import current_job

LEDGER_APP = "fault_ledger"
_START = ("INSERT INTO fault_ledger (job_id, attempt, pid, tag, token) VALUES (%s, %s, %s, %s, %s) "
          "ON CONFLICT (token) DO UPDATE SET token = EXCLUDED.token RETURNING id")
"""An execution's first row, idempotent: a retry after a commit whose answer was lost (a crash)
finds the row it already wrote instead of adding a second one."""
_conns: dict[tuple[int, int, str], Any] = {}


def _dsn(url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    from sqla_pq.db import psycopg2_dsn

    kw = psycopg2_dsn(make_url(url), application_name=LEDGER_APP)
    kw.setdefault("connect_timeout", 5)
    return kw


def _exec(url: str, sql: str, params: tuple[Any, ...], fetch: bool = False,
          patience: float = 120.0) -> Any:
    key = (os.getpid(), threading.get_ident(), url)
    deadline = time.monotonic() + patience
    while True:
        conn = _conns.get(key)
        try:
            if conn is None or conn.closed:
                conn = psycopg2.connect(**_dsn(url))
                conn.autocommit = True
                _conns[key] = conn
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone() if fetch else None
        except psycopg2.Error as exc:
            if not _retryable(exc):
                raise
            _conns.pop(key, None)
            try:
                if conn is not None:
                    conn.close()
            except Exception:  # noqa: BLE001
                pass
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _retryable(exc: BaseException) -> bool:
    """The database went away, or refuses writes for a while (read-only, shutting down)."""
    code = getattr(exc, "pgcode", None) or ""
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and not code:
        return True
    return code[:2] in ("08", "57") or code == "25006"


def work(url: str, seconds: float = 0.0, tick: float = 0.2, tag: str = "",
         first_attempt_only: bool = False) -> int:
    """One ledger execution: start, tick every ``tick`` s while sleeping ``seconds``, finish.
    ``first_attempt_only``: later attempts do not sleep (a retry that should be quick)."""
    job = current_job()
    attempt = job.attempts if job else None
    row = _exec(url, _START, (job.id if job else None, attempt, os.getpid(), tag, uuid.uuid4().hex), fetch=True)
    row_id = row[0]
    if first_attempt_only and attempt and attempt > 1:
        seconds = 0.0
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(tick, left))
        _exec(url, "UPDATE fault_ledger SET last_seen = clock_timestamp() WHERE id = %s", (row_id,))
    _exec(url, "UPDATE fault_ledger SET finished_at = clock_timestamp() WHERE id = %s", (row_id,))
    return row_id


def stuck(url: str, seconds: float, tag: str = "") -> int:
    """A job stuck outside Python for ``seconds`` on its first attempt (one ``time.sleep``:
    an exception raised into the thread lands only when the sleep returns)."""
    job = current_job()
    attempt = job.attempts if job else 0
    row = _exec(url, _START, (job.id if job else None, attempt, os.getpid(), tag, uuid.uuid4().hex), fetch=True)
    if attempt <= 1:
        try:
            time.sleep(seconds)
            _ = seconds + 1  # a bytecode boundary after the C call: a pending JobTimeout lands
        except BaseException:
            _exec(url, "UPDATE fault_ledger SET last_seen = clock_timestamp() WHERE id = %s", (row[0],))
            raise
    _exec(url, "UPDATE fault_ledger SET finished_at = clock_timestamp() WHERE id = %s", (row[0],))
    return row[0]


def spawn_sleeper(url: str, pidfile: str, seconds: float = 3600) -> None:
    """Start a grandchild (``sleep``) and wait for it: a timeout must kill it too."""
    import subprocess

    proc = subprocess.Popen(["sleep", str(seconds)])
    with open(pidfile, "w") as f:
        f.write(str(proc.pid))
    proc.wait()


async def async_work(url: str, seconds: float, tag: str = "") -> int:
    import asyncio

    job = current_job()
    row = _exec(url, _START, (job.id if job else None, job.attempts if job else None,
                                 os.getpid(), tag, uuid.uuid4().hex), fetch=True)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _exec(url, "UPDATE fault_ledger SET last_seen = clock_timestamp(), tag = tag || ':cancelled' "
                   "WHERE id = %s", (row[0],))
        raise
    _exec(url, "UPDATE fault_ledger SET finished_at = clock_timestamp() WHERE id = %s", (row[0],))
    return row[0]


def noop() -> None:
    return None


def returns_generator() -> Any:
    return (i for i in range(3))


def returns_lock() -> Any:
    return threading.Lock()


def echo(value: Any) -> Any:
    return value


def step(url: str, tag: str) -> int:
    return work(url, 0.0, tag=tag)


def fail_step(message: str = "step failed") -> None:
    raise RuntimeError(message)


def returns_socket() -> Any:
    import socket

    return socket.socket()

