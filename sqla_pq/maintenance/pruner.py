"""The pruner: finished jobs leave once their keep-until time (``expires_at``) has passed.

Deletes in batches (``FOR UPDATE SKIP LOCKED``, so it never waits on anyone) through the partial
index on ``expires_at``; flows go with their last job, old tick markers after a week.
"""

from __future__ import annotations

from typing import Any

from .. import queries
from ..link import Link
from .base import Service


class Pruner(Service):
    name = "pruner"

    def __init__(self, interval: float, batch: int = 1000, max_batches: int = 20,
                 tick_keep: float = 7 * 86400) -> None:
        self.interval = interval
        self.batch = batch
        self.max_batches = max_batches
        self.tick_keep = tick_keep

    def run_once(self, link: Link) -> dict[str, Any]:
        deleted = 0
        for _ in range(self.max_batches):
            n = len(link.run(queries.job_prune(), {"batch": self.batch}))
            deleted += n
            if n < self.batch:
                break
        link.run(queries.flow_prune(), {"grace": 60.0})
        link.run(queries.tick_prune(), {"keep": float(self.tick_keep)})
        return {"deleted": deleted}
