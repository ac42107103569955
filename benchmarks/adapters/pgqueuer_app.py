"""The factory the benchmark's PgQueuer workers run, and their command line:

    python -m benchmarks.adapters.pgqueuer_app [--mode drain] [--batch-size N]
        [--max-concurrent-tasks N] [--log-level LEVEL]

which calls ``pgqueuer.run(create, ...)``, the supervisor ``pgq run`` calls.  (``pgq run``
itself fails at start with typer 0.29, in ``setup_fancy_logger``: its ``--log-level`` parser
hands over a str where an enum is expected.)

PgQueuer takes async entrypoints only: the no-op and the stamp call the shared functions of
``benchmarks.tasks``; the 50 ms job awaits ``asyncio.sleep`` (a blocking sleep would stall the
event loop and every other job with it).  The database comes from ``BENCH_PG_DSN``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import asyncpg
from pgqueuer import PgQueuer
from pgqueuer.models import Job

from benchmarks import tasks


def register(pgq: PgQueuer) -> None:
    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        tasks.noop()

    @pgq.entrypoint("sleep")
    async def sleep(job: Job) -> None:
        await asyncio.sleep(json.loads(job.payload or b"{}").get("seconds", 0.05))

    @pgq.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        tasks.stamp(**json.loads(job.payload or b"{}"))


@asynccontextmanager
async def create() -> AsyncIterator[PgQueuer]:
    connection = await asyncpg.connect(os.environ["BENCH_PG_DSN"])
    pgq = PgQueuer.from_asyncpg_connection(connection)
    register(pgq)
    try:
        yield pgq
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> None:
    import pgqueuer
    from pgqueuer.core import logconfig
    from pgqueuer.types import QueueExecutionMode

    parser = argparse.ArgumentParser(prog="benchmarks.adapters.pgqueuer_app")
    parser.add_argument("--mode", choices=["continuous", "drain"], default="continuous")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--max-concurrent-tasks", type=int, default=None)
    parser.add_argument("--dequeue-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logconfig.setup_fancy_logger(logconfig.LogLevel[args.log_level.upper()])
    asyncio.run(pgqueuer.run(
        create,
        dequeue_timeout=timedelta(seconds=args.dequeue_timeout),
        batch_size=args.batch_size,
        mode=QueueExecutionMode[args.mode],
        max_concurrent_tasks=args.max_concurrent_tasks,
    ))


if __name__ == "__main__":
    main()
