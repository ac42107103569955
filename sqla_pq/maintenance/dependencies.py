"""The dependency sweeper: repairs what a crash between two steps of a finish left undone.

Finishing a parent and releasing its dependants are two statements; a worker killed between
them would leave a dependant deferred for ever.  This pass releases deferred jobs that wait on
nothing any more, and cancels (or fails) those whose parent failed or was cancelled.
"""

from __future__ import annotations

from typing import Any

from .. import queries
from ..link import Link
from ..record import cancel_dependants, notify
from .base import Service


class DependencySweeper(Service):
    name = "dependencies"

    def __init__(self, interval: float, failure_ttl: float) -> None:
        self.interval = interval
        self.failure_ttl = failure_ttl

    def run_once(self, link: Link) -> dict[str, Any]:
        released = link.run(queries.job_sweep_deferred())
        notify(link, {r[1] for r in released})
        doomed = [r[0] for r in link.run(queries.job_deferred_doomed())]
        cancelled = cancel_dependants(link, doomed, failure_ttl=self.failure_ttl) if doomed else []
        return {"released": len(released), "cancelled": len(cancelled)}
