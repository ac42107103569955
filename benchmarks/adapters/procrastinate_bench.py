"""procrastinate (psycopg 3), run from the peers' environment.

Enqueue with ``task.defer()`` (E1: one call, one transaction each) and ``task.batch_defer()``
(E2); workers are ``procrastinate worker`` processes, ``--one-shot`` for the drains, with the
same concurrency as sqla_pq's thread worker.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from ..common import tool, worker_env
from .base import System

ARG_NAMES = {"noop": (), "sleep": ("seconds",), "stamp": ("ledger", "sent")}
APP = "benchmarks.adapters.procrastinate_app.app"


class Procrastinate(System):
    library = "procrastinate"
    variants = {"default": ("E1", "E2", "P1", "P2", "L", "S")}

    def __init__(self, target: str, sizes: Any, variant: str = "default") -> None:
        super().__init__(target, sizes, variant)
        os.environ["BENCH_PG_DSN"] = target  # read by procrastinate_app at import
        import psycopg

        from . import procrastinate_app

        self.tasks = procrastinate_app.BY_KIND
        self.app = procrastinate_app.app.open()
        self.conn = psycopg.connect(target, autocommit=True)

    @property
    def label(self) -> str:
        return f"procrastinate -c {self.sizes.concurrency}"

    def settings(self) -> str:
        s = self.sizes
        return (f"`procrastinate worker -c {s.concurrency}` (S: -c {s.sleep_concurrency}), "
                "`--one-shot` for P1/P2")

    def versions(self) -> dict[str, str]:
        return {"procrastinate": metadata.version("procrastinate"),
                "psycopg": metadata.version("psycopg")}

    def install(self) -> None:
        self.app.schema_manager.apply_schema()

    def _scalar(self, sql: str) -> int:
        return int(self.conn.execute(sql).fetchone()[0])

    def reset(self) -> None:
        self.conn.execute("TRUNCATE procrastinate_jobs, procrastinate_events, "
                          "procrastinate_periodic_defers, procrastinate_workers "
                          "RESTART IDENTITY CASCADE")

    def close(self) -> None:
        self.conn.close()
        self.app.close()

    def _kwargs(self, kind: str, args: Sequence[Any]) -> dict[str, Any]:
        return dict(zip(ARG_NAMES[kind], args, strict=True))

    def enqueue_each(self, n: int) -> None:
        defer = self.tasks["noop"].defer
        for _ in range(n):
            defer()

    def enqueue_bulk(self, n: int, kind: str = "noop", args: Sequence[Any] = ()) -> None:
        self.tasks[kind].batch_defer(*[self._kwargs(kind, args)] * n)

    def enqueue_one(self, kind: str, args: Sequence[Any] = ()) -> None:
        self.tasks[kind].defer(**self._kwargs(kind, args))

    def pending(self) -> int:
        return self._scalar("SELECT count(*) FROM procrastinate_jobs "
                            "WHERE status IN ('todo', 'doing')")

    def failed(self) -> int:
        return self._scalar("SELECT count(*) FROM procrastinate_jobs "
                            "WHERE status IN ('failed', 'cancelled', 'aborted')")

    def worker_env(self) -> dict[str, str]:
        return worker_env({"BENCH_PG_DSN": self.target})

    def worker_commands(self, purpose: str, count: int, burst: bool) -> list[list[str]]:
        c = self.sizes.sleep_concurrency if purpose == "sleep" else self.sizes.concurrency
        cmd = [tool("procrastinate"), f"--app={APP}", "worker", "--queues=bench",
               f"--concurrency={c}"]
        if burst:
            cmd.append("--one-shot")
        return [cmd] * count
