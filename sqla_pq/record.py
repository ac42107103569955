"""Writing outcomes: the worker's side of finishing jobs, in as few round trips as it can.

All successes of a batch go in one statement; failures, retries and cancellations (rarer) go one
statement each.  Every write is a compare-and-set on (status = running, attempts = the attempt
that ran): an outcome whose job was rescued meanwhile changes nothing and is reported stale.
Then the consequences: dependants released or cancelled, ``result_ttl = 0`` jobs deleted, idle
workers woken for jobs that just became ready.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import queries
from .execution.call import Outcome

log = logging.getLogger("sqla_pq.worker")


class Runner(Protocol):
    """Runs one statement and returns its rows (a Link, or a session in is_async=False mode)."""

    def run(self, statement: Any, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]: ...


@dataclass
class Recorded:
    succeeded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    stepped: list[int] = field(default_factory=list)
    """Multi-step jobs that finished a task and went back to the queue for the next."""
    cancelled: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    """Outcomes that changed nothing: the attempt no longer held the job (it was rescued)."""
    released: list[int] = field(default_factory=list)
    cascaded: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Completed:
    """What a combined complete-and-claim statement already wrote for the successes."""

    ids: Sequence[int]
    with_dependants: Sequence[int]
    delete_now: Sequence[int]


def complete_params(successes: Sequence[Outcome]) -> dict[str, Any]:
    """In id order: the heartbeat renews leases in id order too, and two statements locking
    the same rows in different orders can deadlock."""
    successes = sorted(successes, key=lambda o: o.job_id)
    return {
        "ids": [o.job_id for o in successes],
        "attempt_list": [o.attempt for o in successes],
        "results": [o.result_json for o in successes],
        "payloads": [o.result_payload for o in successes],
        "signatures": [o.result_signature for o in successes],
        "workspaces": [o.workspace_json for o in successes],
    }


def record_outcomes(
    runner: Runner, outcomes: Sequence[Outcome], *, failure_ttl: float,
    completed: Completed | None = None,
) -> Recorded:
    done = Recorded()
    wake: set[str] = set()
    release: list[int] = []
    cascade: list[int] = []
    delete_now: list[int] = []

    successes = [o for o in outcomes if o.kind == "succeeded" and not o.committed]
    if successes and completed is None:
        rows = runner.run(queries.job_complete_many(), complete_params(successes))
        completed = Completed(
            [r[0] for r in rows], [r[0] for r in rows if r[1]], [r[0] for r in rows if r[2] == 0]
        )
    if successes and completed is not None:
        written = set(completed.ids)
        done.succeeded.extend(o.job_id for o in successes if o.job_id in written)
        release.extend(completed.with_dependants)
        delete_now.extend(completed.delete_now)
        done.stale.extend(o.job_id for o in successes if o.job_id not in written)

    for o in outcomes:
        if o.committed:
            (done.stale if o.stale else done.succeeded).append(o.job_id)
            continue
        if o.kind == "succeeded":
            continue
        if o.kind == "step":
            rows = runner.run(queries.job_next_step(), {
                "job_id": o.job_id, "attempt": o.attempt, "workspace_json": o.workspace_json})
            (done.stepped if rows else done.stale).append(o.job_id)
            if rows and o.queue:
                wake.add(o.queue)
            continue
        if o.kind == "retry":
            rows = runner.run(
                queries.job_retry(),
                {"job_id": o.job_id, "attempt": o.attempt, "delay": float(o.retry_delay),
                 "count_failure": 1, "error_text": o.error, "tb": o.traceback,
                 "workspace_json": o.workspace_json},
            )
            (done.retried if rows else done.stale).append(o.job_id)
            if rows and o.retry_delay <= 0 and o.queue:
                wake.add(o.queue)
            continue
        if o.kind == "failed":
            rows = runner.run(
                queries.job_fail(),
                {"job_id": o.job_id, "attempt": o.attempt, "error_text": o.error,
                 "tb": o.traceback, "failure_ttl": float(failure_ttl),
                 "workspace_json": o.workspace_json},
            )
            target = done.failed
        elif o.kind == "cancelled":
            rows = runner.run(
                queries.job_cancel_running(),
                {"job_id": o.job_id, "attempt": o.attempt, "error_text": o.error},
            )
            target = done.cancelled
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown outcome {o.kind!r}")
        if not rows:
            done.stale.append(o.job_id)
            continue
        target.append(o.job_id)
        job_id, has_dependants, result_ttl, _flow = rows[0]
        if has_dependants:
            cascade.append(job_id)
        if result_ttl == 0 and o.kind == "cancelled":
            delete_now.append(job_id)

    if release:
        for job_id, status, queue in runner.run(queries.job_release_dependants(),
                                               {"parents": release}):
            if status == "queued":
                done.released.append(job_id)
                wake.add(queue)
    if cascade:
        done.cascaded.extend(cancel_dependants(runner, cascade, failure_ttl=failure_ttl))
    if delete_now:
        runner.run(queries.job_delete_ids(), {"ids": delete_now})
    if done.stale:
        log.warning(
            "jobs %s were taken from this worker while they ran (its lease expired and they "
            "were rescued); their outcomes were discarded",
            ", ".join(map(str, done.stale)),
        )
    notify(runner, wake)
    return done


def cancel_dependants(runner: Runner, parents: Iterable[int], *, failure_ttl: float) -> list[int]:
    """Cancel (or fail) the waiting descendants of parents that will never succeed."""
    cancelled: list[int] = []
    frontier = list(parents)
    while frontier:
        rows = runner.run(
            queries.job_cancel_dependants(),
            {"parents": frontier, "failure_ttl": float(failure_ttl)},
        )
        cancelled.extend(r[0] for r in rows)
        frontier = [r[0] for r in rows if r[1]]
    return cancelled


def notify(runner: Runner, queues: Iterable[str]) -> None:
    for queue in sorted(set(queues)):
        runner.run(queries.notify(), {"payload": queue})
