"""Job states, and who moves a job out of each.

::

    deferred ──(parents succeed: worker finishing the last parent)──▶ queued
    queued   ──(claim: a worker)──────────────────────────────────────▶ running
    running  ──(finish: the worker that holds the attempt)─────────────▶ succeeded | failed | queued (retry)
    running  ──(rescue: any worker's rescuer, once the job's lease expired)──▶ queued | failed
    running  ──(give back: the holder, when it lost the lease or was told to abort)──▶ queued | failed
    deferred | queued ──(pq.cancel / a failed dependency)──────────────▶ cancelled
    failed | cancelled | succeeded ──(pq.requeue)──────────────────────▶ queued

django-db-queue's states map onto these: NEW and READY are ``queued`` (READY is a multi-step job
between two of its tasks), PROCESSING is ``running``, COMPLETED is ``succeeded``, FAILED is
``failed``.
"""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    DEFERRED = "deferred"
    """Waiting for a dependency or an earlier flow step; the worker that finishes the last parent
    moves it to ``queued``, a failed parent moves it to ``cancelled`` or ``failed``."""

    QUEUED = "queued"
    """Ready once ``run_at`` has passed; a worker's claim moves it to ``running``."""

    RUNNING = "running"
    """Held by one worker for one attempt, under a lease its heartbeat renews; that worker's
    finish, or the rescuer once the lease expired, moves it on."""

    SUCCEEDED = "succeeded"
    """Final; kept ``result_ttl`` seconds, then deleted by the pruner."""

    FAILED = "failed"
    """Final after the retries are spent; kept until cleared (``pq.clear_failed``)."""

    CANCELLED = "cancelled"
    """Final; by ``pq.cancel``, by the task raising ``Cancel``, or because a dependency failed."""

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
PENDING_STATES = frozenset({JobStatus.DEFERRED, JobStatus.QUEUED})
ALL_STATES = tuple(s.value for s in JobStatus)

# django-db-queue names, for users arriving from it.
DBQ_STATES = {
    "NEW": JobStatus.QUEUED,
    "READY": JobStatus.QUEUED,
    "PROCESSING": JobStatus.RUNNING,
    "COMPLETED": JobStatus.SUCCEEDED,
    "FAILED": JobStatus.FAILED,
}
