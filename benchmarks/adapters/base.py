"""What a library must offer the scenarios (``benchmarks.scenarios``).

An adapter is one library in one worker configuration (a *variant*: sqla_pq's thread or fork
isolation, RQ's SimpleWorker or fork-per-job Worker...).  It enqueues the three job kinds of
``benchmarks.tasks`` with the library's own API, says how many jobs are not finished yet (one
cheap count: the drain poll), and gives the command lines of the library's own worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..common import Sizes, WorkerProcess, worker_env

PURPOSES = ("drain", "latency", "sleep", "memory")
"""What a worker is started for: drain (P1/P2/PF, burst), latency (L, idle worker), sleep (S,
concurrency ``sizes.sleep_concurrency``), memory (M, one long-running worker)."""


class System:
    library: str = ""
    variants: dict[str, tuple[str, ...]] = {}
    """Variant name -> the scenarios it runs."""

    def __init__(self, target: str, sizes: Sizes, variant: str) -> None:
        if variant not in self.variants:
            raise ValueError(f"{self.library} has no variant {variant!r}")
        self.target = target
        self.sizes = sizes
        self.variant = variant

    # -- describing ---------------------------------------------------------------------------

    @property
    def label(self) -> str:
        return f"{self.library} ({self.variant})"

    def settings(self) -> str:
        """The worker configuration, for the report."""
        return ""

    def versions(self) -> dict[str, str]:
        return {}

    # -- the state -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Remove every job (and worker record) this benchmark left behind."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- enqueueing ----------------------------------------------------------------------------

    def enqueue_each(self, n: int) -> None:
        """E1: ``n`` no-op jobs, one enqueue call (one transaction) each."""
        raise NotImplementedError

    def enqueue_bulk(self, n: int, kind: str = "noop", args: Sequence[Any] = ()) -> None:
        """E2 and the drains' fill: ``n`` jobs of ``kind`` in one call of the bulk API."""
        raise NotImplementedError

    def enqueue_one(self, kind: str, args: Sequence[Any] = ()) -> None:
        raise NotImplementedError

    # -- watching --------------------------------------------------------------------------------

    def pending(self) -> int:
        """Jobs enqueued and not finished yet (one cheap statement)."""
        raise NotImplementedError

    def failed(self) -> int:
        raise NotImplementedError

    # -- workers ---------------------------------------------------------------------------------

    def worker_commands(self, purpose: str, count: int, burst: bool) -> list[list[str]]:
        raise NotImplementedError

    def worker_env(self) -> dict[str, str]:
        return worker_env()

    def start_workers(self, purpose: str, count: int = 1, burst: bool = False) -> list[WorkerProcess]:
        env = self.worker_env()
        return [WorkerProcess(cmd, env) for cmd in self.worker_commands(purpose, count, burst)]
