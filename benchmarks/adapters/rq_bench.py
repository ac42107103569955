"""RQ on Redis, run from the peers' environment.

Enqueue with ``Queue.enqueue`` (E1) and ``Queue.enqueue_many`` in one pipeline (E2); workers
are ``rq worker`` processes: ``SimpleWorker`` (in-process) or RQ's default ``Worker``, which
forks a work horse per job.  RQ runs one job at a time per process, so S starts
``sleep_concurrency`` processes.  The Redis database (``/15`` by default) is the benchmark's
own: ``reset`` deletes every ``rq:*`` key in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any

from .. import tasks
from ..common import BenchError, tool
from .base import System

QUEUE = "bench"
KINDS: dict[str, Any] = {"noop": tasks.noop, "sleep": tasks.sleep, "stamp": tasks.stamp}
WORKER_CLASSES = {"simple": "rq.worker.SimpleWorker", "fork": "rq.worker.Worker"}


class RQ(System):
    library = "rq"
    variants = {
        "simple": ("E1", "E2", "P1", "P2", "L", "S"),
        "fork": ("PF", "L", "S"),
    }

    def __init__(self, target: str, sizes: Any, variant: str = "simple") -> None:
        super().__init__(target, sizes, variant)
        import redis
        from rq import Queue

        self.redis = redis.Redis.from_url(target)
        self.queue = Queue(QUEUE, connection=self.redis)
        self.expected = 0

    @property
    def label(self) -> str:
        return "rq SimpleWorker" if self.variant == "simple" else "rq fork-per-job"

    def settings(self) -> str:
        cls = WORKER_CLASSES[self.variant]
        return (f"`rq worker -w {cls}`, one job at a time per process (S: "
                f"{self.sizes.sleep_concurrency} processes), `--burst` for the drains")

    def versions(self) -> dict[str, str]:
        return {"rq": metadata.version("rq"), "redis-py": metadata.version("redis"),
                "Redis": str(self.redis.info("server").get("redis_version"))}

    def install(self) -> None:
        self.redis.ping()

    def reset(self) -> None:
        keys = list(self.redis.scan_iter(match="rq:*", count=1000))
        for i in range(0, len(keys), 1000):
            self.redis.unlink(*keys[i:i + 1000])
        self.expected = 0

    def close(self) -> None:
        self.redis.close()

    def enqueue_each(self, n: int) -> None:
        enqueue = self.queue.enqueue
        for _ in range(n):
            enqueue(KINDS["noop"])
            self.expected += 1

    def enqueue_bulk(self, n: int, kind: str = "noop", args: Sequence[Any] = ()) -> None:
        func, args = KINDS[kind], tuple(args)
        with self.redis.pipeline() as pipe:
            jobs = self.queue.enqueue_many([self.queue.prepare_data(func, args) for _ in range(n)],
                                           pipeline=pipe)
            pipe.execute()
        self.expected += len(jobs)

    def enqueue_one(self, kind: str, args: Sequence[Any] = ()) -> None:
        self.queue.enqueue(KINDS[kind], *args)
        self.expected += 1

    def _done(self) -> int:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.queue.finished_job_registry.key)
            pipe.zcard(self.queue.failed_job_registry.key)
            pipe.llen(self.queue.key)
            finished, failed, queued = pipe.execute()
        if queued > self.expected - finished - failed:
            raise BenchError(f"{queued} jobs queued, more than the {self.expected} enqueued")
        return finished + failed

    def pending(self) -> int:
        """Jobs enqueued and neither finished nor failed: exact, where the queue's length plus
        the started registry misses the job a worker has popped and not registered yet."""
        return self.expected - self._done()

    def failed(self) -> int:
        return int(self.redis.zcard(self.queue.failed_job_registry.key))

    def worker_commands(self, purpose: str, count: int, burst: bool) -> list[list[str]]:
        if purpose == "sleep":
            count *= self.sizes.sleep_concurrency
        cmd = [tool("rq"), "worker", "--url", self.target, "-w", WORKER_CLASSES[self.variant]]
        if burst:
            cmd.append("--burst")
        if self.sizes.quiet_workers:
            cmd.append("-q")
        return [[*cmd, QUEUE]] * count
