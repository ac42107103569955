"""The rescuer: jobs whose lease expired go back to the queue.

A job's lease (``pq_job.lease_until``) is set by its claim and renewed by its worker's heartbeat.
Past it (three heartbeats by default: the worker died, froze, or lost the database), the job is
re-queued with one more interruption counted, or failed as interrupted after
``max_interruptions``.  The compare-and-set on ``status = 'running'`` and the attempt means a
worker that comes back late cannot overwrite what happened since, and a worker never renews an
expired lease: it stops the job instead.
"""

from __future__ import annotations

from typing import Any

from .. import queries
from ..link import Link
from ..record import cancel_dependants, notify
from .base import Service


class Rescuer(Service):
    name = "rescuer"

    def __init__(self, interval: float, failure_ttl: float, forget_after: float) -> None:
        self.interval = interval
        self.failure_ttl = failure_ttl
        self.forget_after = forget_after

    def run_once(self, link: Link) -> dict[str, Any]:
        rows = link.run(queries.job_rescue_stale(), {"failure_ttl": float(self.failure_ttl)})
        requeued = [r for r in rows if r[1] == "queued"]
        failed = [r for r in rows if r[1] == "failed"]
        doomed = [r[0] for r in failed if r[2]]
        if doomed:
            cancel_dependants(link, doomed, failure_ttl=self.failure_ttl)
        # the failed ones too: a serial queue they held is free, and idle workers leave a
        # busy serial queue out of their claims until told
        notify(link, {r[3] for r in rows})
        link.run(queries.worker_prune_dead(), {"grace": float(self.forget_after)})
        return {"requeued": len(requeued), "failed": len(failed)}
