"""``sqla-pq status``: what the queue looks like now, from rows alone (no payload is loaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import text

if TYPE_CHECKING:
    from .pq import PQ

STATES = ("deferred", "queued", "running", "succeeded", "failed", "cancelled")


def render_status(pq: PQ) -> str:
    lines: list[str] = []
    stats = pq.queue_stats()
    paused = set(pq.paused_queues())
    lines.append("Queues")
    header = f"  {'queue':<24}" + "".join(f"{s:>11}" for s in STATES)
    lines.append(header)
    if not stats:
        lines.append("  (no jobs)")
    for queue in sorted(stats):
        row = f"  {queue + (' (paused)' if queue in paused else ''):<24}"
        row += "".join(f"{stats[queue].get(s, 0):>11}" for s in STATES)
        lines.append(row)

    workers = pq.workers()
    lines.append("")
    lines.append(f"Workers ({sum(1 for w in workers if w.alive)} alive)")
    for w in workers:
        queues = ", ".join(w.queues) if w.queues else "all queues"
        state = w.state if w.alive else "dead (lease expired)"
        stop = ", stop requested" if w.stop_requested else ""
        lines.append(
            f"  {w.id:<40} {state:<10} pid {w.pid} on {w.hostname}: {queues}; "
            f"{w.isolation}x{w.concurrency}, {w.jobs_done} jobs, current {w.current_job_id}{stop}"
        )
    lines.extend(_schedules(pq))
    lines.extend(_health(pq))
    return "\n".join(lines)


def _schedules(pq: PQ) -> list[str]:
    try:
        from .schedules import list_schedules
    except ImportError:  # pragma: no cover
        return []
    rows = list_schedules(pq)
    if not rows:
        return []
    out = ["", "Schedules"]
    for s in rows:
        when = s.next_run_at.strftime("%Y-%m-%d %H:%M:%S%z") if s.next_run_at else "done"
        state = "active" if s.active else "paused"
        rule = s.cron or (f"every {s.interval:g}s" if s.interval else "relative interval"
                          if s.interval_relative else "once")
        key = f"[{s.key}]" if s.key else ""
        out.append(f"  {s.id:>5} {s.task}{key:<10} {rule:<20} next {when} ({state}) on {s.queue}")
    return out


def _health(pq: PQ) -> list[str]:
    out: list[str] = []
    with pq.session() as s:
        usage = s.execute(text("SELECT pg_notification_queue_usage()")).scalar() or 0.0
        long_tx = list(s.execute(text(
            "SELECT pid, extract(epoch FROM now() - xact_start)::int, state, application_name "
            "FROM pg_stat_activity WHERE xact_start < now() - interval '60 seconds' "
            "AND datname = current_database() AND pid <> pg_backend_pid() ORDER BY xact_start"
        )))
    out.append(f"NOTIFY queue usage: {usage:.2%}" + (" (a listener is not reading?)"
                                                    if usage > 0.01 else ""))
    for pid, age, state, app in long_tx:
        out.append(f"warning: pid {pid} ({app or 'no application_name'}, {state}) has held a "
                   f"transaction open for {age}s: vacuum cannot clean the job table behind it")
    return [""] + out
