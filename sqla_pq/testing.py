"""Helpers for your own test suite.

    from sqla_pq.testing import assert_enqueued, drain

    def test_signup_sends_welcome(session, pq):
        signup(session, "a@b.c")                      # enqueues inside the session
        assert_enqueued(session, task=send_welcome, args=["a@b.c"])   # before any commit
        session.commit()
        assert drain(pq) == 1                           # run it here, now

Queues built with ``is_async=False`` run jobs at enqueue, which is the other common way to test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import Job
from .tasks import task_ref

if TYPE_CHECKING:
    from .pq import PQ

_MISSING = object()


def enqueued_jobs(
    session: Session,
    *,
    task: Any = None,
    queue: str | None = None,
    args: Sequence[Any] | object = _MISSING,
    kwargs: dict[str, Any] | object = _MISSING,
    status: str | Sequence[str] | None = ("queued", "deferred"),
    schema: str | None = None,
) -> list[Job]:
    """Jobs visible to ``session`` (its own uncommitted inserts included) that match."""
    stmt = select(Job).order_by(Job.id)
    if task is not None:
        stmt = stmt.where(Job.task == task_ref(task).name)
    if queue is not None:
        stmt = stmt.where(Job.queue == queue)
    if status is not None:
        stmt = stmt.where(Job.status.in_([status] if isinstance(status, str) else list(status)))
    options = {"schema_translate_map": {None: schema}} if schema else {}
    jobs = list(session.scalars(stmt, execution_options=options))
    if args is not _MISSING:
        jobs = [j for j in jobs if j.args == list(args)]  # type: ignore[arg-type]
    if kwargs is not _MISSING:
        jobs = [j for j in jobs if (j.kwargs or {}) == kwargs]
    return jobs


def assert_enqueued(session: Session, *, count: int | None = None, **filters: Any) -> list[Job]:
    """Assert that matching jobs exist in ``session``'s view (committed or not); return them."""
    jobs = enqueued_jobs(session, **filters)
    if not jobs or (count is not None and len(jobs) != count):
        seen = enqueued_jobs(session, status=None)
        listing = "\n".join(f"  {j.id} {j.queue} {j.description} {j.status}" for j in seen) or "  (none)"
        wanted = f"{count} job(s)" if count is not None else "a job"
        raise AssertionError(
            f"expected {wanted} matching {filters}, found {len(jobs)}; jobs visible:\n{listing}"
        )
    return jobs


def refute_enqueued(session: Session, **filters: Any) -> None:
    """Assert that no matching job exists in ``session``'s view."""
    jobs = enqueued_jobs(session, **filters)
    if jobs:
        raise AssertionError(f"expected no job matching {filters}, found {[j.id for j in jobs]}")


def drain(pq: PQ, queues: Sequence[str] | str | None = None, *, isolation: str = "thread",
          concurrency: int = 1, **options: Any) -> int:
    """Run every ready job of ``queues`` (all by default) in this process; return how many
    ran.  Jobs that become ready meanwhile (retries without delay, released dependants) run
    too."""
    options.setdefault("maintenance", False)
    return pq.run_worker(queues, burst=True, isolation=isolation, concurrency=concurrency,
                         install_signals=False, **options)


def work_one(pq: PQ, queues: Sequence[str] | str | None = None, **options: Any) -> bool:
    """Run at most one ready job in this process; True if there was one."""
    options.setdefault("maintenance", False)
    return pq.run_worker_once(queues, install_signals=False, **options)


def run_job(pq: PQ, job: Job | int) -> Job:
    """Run one queued job now, in this process, and return it as recorded."""
    return pq.run_job(job if isinstance(job, int) else job.id)


__all__ = ["assert_enqueued", "drain", "enqueued_jobs", "refute_enqueued", "run_job", "work_one"]
