"""Maintenance loops that run inside the workers: rescuer, pruner, dependency sweeper (and the
scheduler's ticks).  Each is a small :class:`~sqla_pq.maintenance.base.Service`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Maintainer, Service
from .dependencies import DependencySweeper
from .pruner import Pruner
from .rescuer import Rescuer
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..pq import PQ
    from ..worker import Worker


def default_services(pq: PQ, worker: Worker | None = None) -> list[Service]:
    s = pq.settings
    return [
        Rescuer(s.rescue_seconds, s.failure_ttl, forget_after=max(3600.0, 10 * s.lease_seconds)),
        DependencySweeper(max(s.rescue_seconds, 5.0), s.failure_ttl),
        Pruner(s.prune_interval),
        Scheduler(pq, s.schedule_interval),
    ]


__all__ = ["DependencySweeper", "Maintainer", "Pruner", "Rescuer", "Scheduler", "Service",
           "default_services"]
