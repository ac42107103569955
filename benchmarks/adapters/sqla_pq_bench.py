"""sqla_pq, run from the repository's environment.

Enqueue through the public API (``PQ.queue(...).enqueue``, ``enqueue_many``); workers are
``python -m sqla_pq worker`` processes (the ``sqla-pq worker`` command) in burst mode for the
drains, importing the job functions with ``-I benchmarks.tasks``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .. import tasks
from .base import System

QUEUE = "bench"
KINDS = {"noop": tasks.noop, "sleep": tasks.sleep, "stamp": tasks.stamp}
NOT_FINISHED = ("queued", "running", "deferred")


class SqlaPq(System):
    library = "sqla_pq"
    variants = {
        "thread": ("E1", "E2", "P1", "P2", "L", "S", "M"),
        "fork": ("P1", "PF", "L"),
    }

    def __init__(self, target: str, sizes: Any, variant: str = "thread") -> None:
        super().__init__(target, sizes, variant)
        from sqla_pq import PQ

        self.pq = PQ(target)
        self.queue = self.pq.queue(QUEUE)
        self._poll: Any = None

    @property
    def label(self) -> str:
        if self.variant == "thread":
            return f"sqla_pq thread ×{self.sizes.concurrency} +{self.sizes.prefetch}"
        s = self.sizes
        return f"sqla_pq fork ×{s.fork_concurrency}" + (f" +{s.fork_prefetch}" if s.fork_prefetch else "")

    def settings(self) -> str:
        s = self.sizes
        if self.variant == "thread":
            return (f"`sqla-pq worker --isolation thread -c {s.concurrency} --prefetch "
                    f"{s.prefetch}` (S: -c {s.sleep_concurrency} --prefetch {s.sleep_prefetch}), "
                    "burst for P1/P2")
        return (f"`sqla-pq worker --isolation fork -c {s.fork_concurrency} --prefetch "
                f"{s.fork_prefetch}` (one job process at a time, forked by its fork server), "
                "burst for P1/PF")

    def versions(self) -> dict[str, str]:
        import sqla_pq

        return {"sqla_pq": sqla_pq.__version__}

    # -- state -------------------------------------------------------------------------------

    def _cursor(self) -> Any:
        """One autocommit DBAPI connection kept for the polls (no pool checkout per poll)."""
        if self._poll is None:
            self._poll = self.pq.engine.raw_connection()
            self._poll.driver_connection.autocommit = True
        return self._poll.cursor()

    def _scalar(self, sql: str) -> int:
        cur = self._cursor()
        try:
            cur.execute(sql)
            return int(cur.fetchone()[0])
        finally:
            cur.close()

    def reset(self) -> None:
        cur = self._cursor()
        try:
            cur.execute("TRUNCATE pq_job RESTART IDENTITY CASCADE")
            cur.execute("DELETE FROM pq_worker")
        finally:
            cur.close()

    def close(self) -> None:
        if self._poll is not None:
            self._poll.close()
            self._poll = None
        self.pq.engine.dispose()

    # -- enqueueing ----------------------------------------------------------------------------

    def enqueue_each(self, n: int) -> None:
        enqueue = self.queue.enqueue
        for _ in range(n):
            enqueue(tasks.noop)

    def enqueue_bulk(self, n: int, kind: str = "noop", args: Sequence[Any] = ()) -> None:
        func = KINDS[kind]
        self.queue.enqueue_many([(func, tuple(args))] * n)

    def enqueue_one(self, kind: str, args: Sequence[Any] = ()) -> None:
        self.queue.enqueue_call(KINDS[kind], args=tuple(args))

    def pending(self) -> int:
        states = ", ".join(f"'{s}'" for s in NOT_FINISHED)
        return self._scalar(f"SELECT count(*) FROM pq_job WHERE status IN ({states})")

    def failed(self) -> int:
        return self._scalar("SELECT count(*) FROM pq_job WHERE status IN ('failed', 'cancelled')")

    # -- workers ---------------------------------------------------------------------------------

    def worker_commands(self, purpose: str, count: int, burst: bool) -> list[list[str]]:
        s = self.sizes
        if self.variant == "fork":
            mode = ["--isolation", "fork", "-c", str(s.fork_concurrency),
                    "--prefetch", str(s.fork_prefetch)]
        else:
            sleepers = purpose == "sleep"
            c = s.sleep_concurrency if sleepers else s.concurrency
            prefetch = s.sleep_prefetch if sleepers else s.prefetch
            mode = ["--isolation", "thread", "-c", str(c), "--prefetch", str(prefetch)]
        url = self.pq.engine.url.render_as_string(hide_password=False)
        cmd = [sys.executable, "-m", "sqla_pq", "worker", QUEUE, "--url", url,
               "-I", "benchmarks.tasks", *mode]
        if burst:
            cmd.append("--burst")
        if s.quiet_workers:
            cmd.append("-q")
        return [cmd] * count
