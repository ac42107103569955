"""Helpers for tests that run real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def plan_nodes(node: dict[str, Any]):
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first."""
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


class WorkerProcess:
    """``sqla-pq worker`` in its own process group."""

    def __init__(self, env: dict[str, str], args: Sequence[str] = (), name: str | None = None) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="sqla_pq_worker_", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "sqla_pq", "worker", *args]
        if name:
            cmd += ["--name", name]
        self.name = name
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_registered(self, engine: sa.Engine, timeout: float = 15.0) -> str:
        def registered() -> Any:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.output()}")
            with engine.connect() as c:
                return c.exec_driver_sql(
                    "SELECT id FROM pq_worker WHERE pid = %(pid)s AND state <> 'starting'",
                    {"pid": self.pid},
                ).scalar()

        return wait_until(registered, timeout, message="the worker to register")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        """SIGKILL the whole process group: the worker and its fork children."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit within {timeout}s:\n{self.output()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def scalar(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as c:
        return c.exec_driver_sql(sql, params or None).scalar()


def rows(engine: sa.Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as c:
        return list(c.exec_driver_sql(sql, params or None))


class BackgroundWorker:
    """``pq.worker(...).run()`` in a thread of this process; stopped on exit."""

    def __init__(self, pq: Any, queues: Any = None, **options: Any) -> None:
        import threading

        options.setdefault("install_signals", False)
        options.setdefault("isolation", "thread")
        self.worker = pq.worker(queues, **options)
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.worker.run()),
                                       daemon=True)

    def __enter__(self) -> Any:
        self.thread.start()
        wait_until(lambda: self.worker.state in ("idle", "busy"), 15, message="worker start")
        return self.worker

    def __exit__(self, *exc: Any) -> None:
        self.worker.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the worker did not stop"
