"""``sqla-pq demo``: the product in one command.

Starts an embedded PostgreSQL under ``.sqla_pq/`` (or uses ``DATABASE_URL``), migrates it,
enqueues sample jobs (plain, priority, delayed, async, retried, a chain, a flow, one rolled back
with its transaction) and a periodic task every second, runs an in-process worker until they are
done and the periodic task has fired twice, and prints what happened.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import sessionmaker

from . import demo_tasks as tasks
from .db import create_engine
from .pq import PQ


def run_demo(url: str | None = None, data_dir: str | None = None,
             out: Callable[[str], Any] = print) -> int:
    t0 = time.monotonic()
    if url is None:
        url = os.environ.get("DATABASE_URL")
    if url:
        out(f"Using DATABASE_URL ({_safe(url)})")
    else:
        import signal
        import sys

        from . import embedded

        # pgserver stops its server at exit; a SIGTERM must become an exit, not a kill
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        out("No DATABASE_URL: starting an embedded PostgreSQL under .sqla_pq/ ...")
        server = embedded.start(data_dir)
        url = embedded.url_of(server)
    engine = create_engine(url)
    Session = sessionmaker(engine)
    pq = PQ(Session)
    pq.migrate()
    version = engine.connect().execute(text("SHOW server_version")).scalar()
    out(f"PostgreSQL {version} ready and migrated in {time.monotonic() - t0:.1f}s")

    jobs: dict[str, Any] = {}
    q = pq.queue("demo")
    jobs["plain"] = q.enqueue(tasks.greet, "world")
    jobs["priority"] = q.enqueue(tasks.add, 2, 3, priority=100)
    jobs["delayed"] = q.enqueue(tasks.greet, "future", run_at="2s")
    jobs["async"] = q.enqueue(tasks.fetch_like, 4)
    jobs["retried"] = q.enqueue(tasks.flaky, max_retries=2, retry_in="0.5s")
    first = q.enqueue(tasks.step, "one")
    second = q.enqueue(tasks.step, "two", depends_on=first)
    jobs["chain 1/3"], jobs["chain 2/3"] = first, second
    jobs["chain 3/3"] = q.enqueue(tasks.step, "three", depends_on=second)
    # A flow: each step starts after the previous one succeeded; all written in one transaction.
    with pq.flow(q, name="demo-flow") as flow:
        for number, name in enumerate(FLOW_STEPS, 1):
            jobs[f"flow {number}/{len(FLOW_STEPS)}"] = flow.enqueue(tasks.step, name)

    # Transactional enqueue: the job exists only if the transaction commits.
    with Session() as session:
        with session.begin():
            kept = pq.queue("demo", session=session).enqueue(tasks.greet, "committed")
        session.begin()
        gone = pq.queue("demo", session=session).enqueue(tasks.greet, "rolled back")
        session.rollback()
    jobs["in a transaction"] = kept
    out(f"Enqueued {len(jobs) + 1} jobs on queue 'demo' (one of them rolled back)")
    # A periodic task: the workers' scheduler turns each tick into one job (never two).
    pq.unschedule(tasks.heartbeat, key="demo")  # a previous demo's, if it was interrupted
    schedule = pq.schedule(tasks.heartbeat, run_every=PERIOD, key="demo", queue="demo")
    out(f"Scheduled tasks.heartbeat every {PERIOD}s (schedule {schedule.id})")

    worker = pq.worker(["demo"], isolation="thread", concurrency=4, install_signals=False)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        for job in jobs.values():
            try:
                pq.wait(job, timeout=30)
            except Exception:
                pass
        ticks = _periodic_runs(pq, schedule.id, at_least=PERIODIC_RUNS, timeout=15)
    finally:
        pq.unschedule(tasks.heartbeat, key="demo")  # the demo's database may live on
        worker.request_stop()
        thread.join(timeout=30)

    out("")
    out(f"{'job':<18} {'id':>5}  {'status':<10} {'took':>7}  result")
    for label, job in jobs.items():
        out(_row(label, pq.get_job(job)))
    try:
        pq.get_job(gone.id)
        out("the rolled-back job exists: that would be a bug")
        return 1
    except Exception:
        out(f"{'rolled back':<18} {gone.id:>5}  never stored: it rolled back with its transaction")
    for number, tick in enumerate(ticks, 1):
        out(_row(f"periodic #{number}", tick))
    out(f"\nThe periodic task fired {len(ticks)} times, once per {PERIOD}s tick "
        "(a unique tick row makes each tick one job, however many workers run).")
    steps = pq.get_flow(flow).jobs
    in_order = all(b.started_at and a.finished_at and b.started_at >= a.finished_at
                   for a, b in zip(steps, steps[1:]))
    out(f"The flow '{flow.name}' ran {' -> '.join(FLOW_STEPS)}"
        + (", each step after the previous one finished." if in_order else " out of order: a bug!"))
    delayed = pq.get_job(jobs["delayed"].id)
    if delayed.started_at:
        late = delayed.started_at - delayed.enqueued_at
        out(f"The delayed job started {late.total_seconds():.1f}s after it was enqueued "
            f"(run_at='2s'); the worker woke on NOTIFY for the others.")
    out(f"Done in {time.monotonic() - t0:.1f}s. Jobs are rows: "
        f"SELECT id, task, status FROM pq_job WHERE queue = 'demo';")
    failed = [label for label, job in jobs.items() if pq.get_job(job.id).status != "succeeded"]
    engine.dispose()
    return 1 if failed or not in_order or len(ticks) < PERIODIC_RUNS else 0


PERIOD = 1
"""Seconds between the periodic task's ticks: short, so that the demo sees two."""
PERIODIC_RUNS = 2
FLOW_STEPS = ("fetch", "transform", "load")


def _row(label: str, job: Any) -> str:
    took = ""
    if job.started_at and job.finished_at:
        took = f"{(job.finished_at - job.started_at).total_seconds() * 1000:.0f} ms"
    value = job.return_value() if job.status == "succeeded" else job.error
    extra = f" (attempt {job.attempts})" if job.attempts > 1 else ""
    return f"{label:<18} {job.id:>5}  {job.status:<10} {took:>7}  {value!r}{extra}"


def _periodic_runs(pq: PQ, schedule_id: int, *, at_least: int, timeout: float) -> list[Any]:
    """The finished jobs of the schedule, once ``at_least`` of them have finished (or at the
    timeout): a schedule fires when a worker's scheduler next looks, about once a second."""
    from .models import Job

    deadline = time.monotonic() + timeout
    finished = Job.status.in_(("succeeded", "failed"))
    while True:
        with pq.session() as session:
            ids = list(session.scalars(select(Job.id).where(Job.schedule_id == schedule_id, finished)
                                       .order_by(Job.id)))
        if len(ids) >= at_least or time.monotonic() > deadline:
            return [pq.get_job(job_id) for job_id in ids]
        time.sleep(0.1)


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


__all__ = ["run_demo"]
