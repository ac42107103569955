"""PgQueuer (asyncpg), run from the peers' environment.

Enqueue with ``Queries.enqueue`` (E1: one call, one statement each; E2: one call with lists);
workers run PgQueuer's own supervisor (``pgqueuer.run``, what ``pgq run`` runs; see
``pgqueuer_app``) with its defaults (batch size 10, no concurrency cap), in drain mode for the
drains.  S caps the worker at 4 jobs in flight (``--batch-size 2
--max-concurrent-tasks 4``: PgQueuer wants the cap to be at least twice the batch).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from ..common import worker_env
from .base import System

WORKER = "benchmarks.adapters.pgqueuer_app"
ARG_NAMES = {"noop": (), "sleep": ("seconds",), "stamp": ("ledger", "sent")}


class PgQueuerSystem(System):
    library = "pgqueuer"
    variants = {"default": ("E1", "E2", "P1", "P2", "L", "S")}

    def __init__(self, target: str, sizes: Any, variant: str = "default") -> None:
        super().__init__(target, sizes, variant)
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(target))
        self.queries = Queries(AsyncpgDriver(self.conn))

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @property
    def label(self) -> str:
        return "pgqueuer batch 10"

    def settings(self) -> str:
        s = self.sizes
        return (f"`pgqueuer.run` (= `pgq run`) batch size 10, no cap (S: `--batch-size 2 --max-concurrent-tasks "
                f"{s.sleep_concurrency}`, asyncio.sleep), `--mode drain` for P1/P2")

    def versions(self) -> dict[str, str]:
        return {"pgqueuer": metadata.version("pgqueuer"), "asyncpg": metadata.version("asyncpg")}

    def install(self) -> None:
        self._run(self.queries.install())

    def reset(self) -> None:
        self._run(self.conn.execute(
            "TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics RESTART IDENTITY"))

    def close(self) -> None:
        self._run(self.conn.close())
        self.loop.close()

    @staticmethod
    def _payload(kind: str, args: Sequence[Any]) -> bytes | None:
        if not ARG_NAMES[kind]:
            return None
        return json.dumps(dict(zip(ARG_NAMES[kind], args, strict=True))).encode()

    def enqueue_each(self, n: int) -> None:
        async def each() -> None:
            enqueue = self.queries.enqueue
            for _ in range(n):
                await enqueue("noop", None)

        self._run(each())

    def enqueue_bulk(self, n: int, kind: str = "noop", args: Sequence[Any] = ()) -> None:
        payload = self._payload(kind, args)
        self._run(self.queries.enqueue([kind] * n, [payload] * n, [0] * n))

    def enqueue_one(self, kind: str, args: Sequence[Any] = ()) -> None:
        self._run(self.queries.enqueue(kind, self._payload(kind, args)))

    def pending(self) -> int:
        return int(self._run(self.conn.fetchval(
            "SELECT count(*) FROM pgqueuer WHERE status IN ('queued', 'picked')")))

    def failed(self) -> int:
        held = self._run(self.conn.fetchval(
            "SELECT count(*) FROM pgqueuer WHERE status = 'failed'"))
        logged = self._run(self.conn.fetchval(
            "SELECT count(*) FROM pgqueuer_log WHERE status IN ('exception', 'failed', 'canceled')"))
        return int(held) + int(logged)

    def worker_env(self) -> dict[str, str]:
        return worker_env({"BENCH_PG_DSN": self.target})

    def worker_commands(self, purpose: str, count: int, burst: bool) -> list[list[str]]:
        cmd = [sys.executable, "-m", WORKER, "--mode", "drain" if burst else "continuous"]
        if purpose == "sleep":
            c = self.sizes.sleep_concurrency
            cmd += ["--batch-size", str(max(1, c // 2)), "--max-concurrent-tasks", str(c)]
        if self.sizes.quiet_workers:
            cmd += ["--log-level", "WARNING"]
        return [cmd] * count
