"""The pages, as escaped markup built from the rows of :mod:`.data`.  No database access here."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from ..states import ALL_STATES
from .data import DETAIL_TEXT, LIST_TEXT, FlowRow, JobDetail, QueueRow, job_table
from .html import Safe, fields, href, join, link, pre, render, table, text, when

FINISHED = ("succeeded", "failed", "cancelled")
PENDING = ("deferred", "queued")


@dataclasses.dataclass(frozen=True)
class Context:
    """What every page needs besides its rows: where the dashboard is mounted, this page's
    address (actions come back to it) and the CSRF token its forms carry."""

    base: str
    here: str
    token: str

    def url(self, path: str, **query: Any) -> str:
        return href(self.base, path, query)

    def button(self, path: str, label: str, *, danger: bool = False, back: str | None = None,
               **values: Any) -> Safe:
        """A one-button form that POSTs ``values`` with the token; the answer comes back to
        ``back`` (this page by default)."""
        hidden = {"csrf_token": self.token, "next": back or self.here, **values}
        inputs = join(render('<input type="hidden" name="{k}" value="{v}">', k=k, v=v)
                      for k, v in hidden.items())
        return render(
            '<form class="inline" method="post" action="{action}">{inputs}'
            '<button type="submit"{cls}>{label}</button></form>',
            action=self.url(path), inputs=inputs, label=label,
            cls=Safe(' class="danger"' if danger else ""),
        )


def state(status: str) -> Safe:
    return render('<span class="state-{s}">{s}</span>', s=status)


def sealed(encoding: str, size: int | None) -> str:
    """How a payload that is never loaded here shows: its encoding and its size."""
    return f"⟨{encoding}, {size or 0} bytes⟩"


def arguments(row: Any) -> Safe:
    """JSON arguments as their text; dill and pickle ones as a sealed box."""
    if row.encoding != "json":
        return text(sealed(row.encoding, row.payload))
    parts = [p for p in (row.args, row.kwargs) if p not in (None, "[]", "{}", "null")]
    return text(" ".join(parts) or "()", LIST_TEXT)


# -- jobs --------------------------------------------------------------------------------------


def job_actions(ctx: Context, job_id: int, status: str, *, after_delete: str) -> Safe:
    buttons = []
    if status in FINISHED:
        buttons.append(ctx.button(f"/jobs/{job_id}/requeue", "Requeue"))
    if status in PENDING:
        buttons.append(ctx.button(f"/jobs/{job_id}/cancel", "Cancel"))
    buttons.append(ctx.button(f"/jobs/{job_id}/delete", "Delete", danger=True, back=after_delete))
    return join(buttons)


def job_rows(ctx: Context, rows: Iterable[Any], *, actions: bool = True) -> Safe:
    headers = ["id", "queue", "task", "state", "arguments", "priority", "attempts", "enqueued",
               "run at", "finished", "error"] + (["actions"] if actions else [])
    cells = []
    for r in rows:
        cell = [link(ctx.url(f"/jobs/{r.id}"), r.id), link(ctx.url("/jobs", queue=r.queue), r.queue),
                text(r.task or "message", LIST_TEXT), state(r.status), arguments(r), r.priority,
                r.attempts, r.enqueued_at, r.run_at, r.finished_at, text(r.error, LIST_TEXT)]
        if actions:
            cell.append(job_actions(ctx, r.id, r.status, after_delete=ctx.here))
        cells.append(cell)
    return table(headers, cells, empty="No jobs.")


def job_list(ctx: Context, rows: Sequence[Any], *, queue: str, status: str, more: bool,
             first: bool) -> Safe:
    options = join(
        render('<option value="{v}"{sel}>{label}</option>', v=s, label=s or "any state",
               sel=Safe(" selected" if s == status else ""))
        for s in ("", *ALL_STATES)
    )
    form = render(
        '<form class="filter" method="get" action="{action}">'
        '<label>Queue <input name="queue" value="{queue}" size="24"></label> '
        '<label>State <select name="state">{options}</select></label> '
        '<button type="submit">Show</button></form>',
        action=ctx.url("/jobs"), queue=queue, options=options,
    )
    paging = []
    if not first:
        paging.append(link(ctx.url("/jobs", queue=queue, state=status), "« newest"))
    if more and rows:
        paging.append(link(ctx.url("/jobs", queue=queue, state=status, before=rows[-1].id),
                           "older »"))
    nav = render('<p class="paging">{links}</p>', links=join(paging))
    return join([form, job_rows(ctx, rows), nav])


_LINKS = {"flow_id": "/flows/{}", "schedule_id": "/schedules"}
_HIDDEN = ("error", "traceback")


def job_field(ctx: Context, key: str, value: Any, row: Any) -> Safe:
    """One field of the detail page; payloads and signatures only as their sizes."""
    if key == "payload":
        return text(sealed(row.encoding, value)) if value is not None else text(None)
    if key == "result_payload":
        return text(sealed("dill", value)) if value is not None else text(None)
    if key in ("signature", "result_signature"):
        return text(f"{value} bytes (HMAC-SHA256)" if value is not None else None)
    if value is not None and key in _LINKS:
        return link(ctx.url(_LINKS[key].format(value)), value)
    if key == "worker_id" and value is not None:
        return link(ctx.url("/workers"), value)
    if key == "status":
        return state(value)
    if isinstance(value, str) and "\n" in value:
        return pre(text(value, DETAIL_TEXT))
    return text(value, DETAIL_TEXT)


def job_detail(ctx: Context, detail: JobDetail) -> Safe:
    row = detail.row
    pairs = [(c.key, job_field(ctx, c.key, getattr(row, c.key), row))
             for c in job_table.columns if c.key not in _HIDDEN]
    pairs.append(("depends on", _job_links(ctx, detail.parents)))
    pairs.append(("dependants", _job_links(ctx, detail.dependants)))
    parts = [render("<p>{actions}</p>", actions=job_actions(
        ctx, row.id, row.status, after_delete=href("", "/jobs", {"queue": row.queue})))]
    parts.append(fields(pairs))
    for key in _HIDDEN:
        value = getattr(row, key)
        if value:
            parts.append(render("<h2>{k}</h2>{v}", k=key, v=pre(text(value, DETAIL_TEXT))))
    return join(parts)


def _job_links(ctx: Context, ids: Sequence[int]) -> Safe:
    if not ids:
        return text(None)
    return join((link(ctx.url(f"/jobs/{i}"), i) for i in ids), ", ")


# -- the overview ------------------------------------------------------------------------------


def queue_table(ctx: Context, rows: Sequence[QueueRow]) -> Safe:
    cells = []
    for q in rows:
        counts = [link(ctx.url("/jobs", queue=q.name, state=s), q.counts[s])
                  if q.counts.get(s) else Safe('<span class="muted">0</span>') for s in ALL_STATES]
        verb = "resume" if q.paused else "pause"
        switch = ctx.button(f"/queues/{verb}", verb.capitalize(), queue=q.name)
        cells.append([link(ctx.url("/jobs", queue=q.name), q.name), *counts, q.total,
                      "paused" if q.paused else "active", switch])
    return table(["queue", *ALL_STATES, "total", "state", "action"], cells,
                 empty="No queues yet.")


def overview(ctx: Context, queues: Sequence[QueueRow], workers: Sequence[Any],
             schedules: Sequence[Any], failures: Sequence[Any]) -> Safe:
    alive = [w for w in workers if w.alive]
    return join([
        render("<h2>Queues</h2>{t}", t=queue_table(ctx, queues)),
        render("<h2>Workers: {n} alive</h2>{t}", n=len(alive), t=worker_table(ctx, alive)),
        render("<h2>Schedules</h2>{t}", t=schedule_table(ctx, schedules[:20], actions=False)),
        render("<h2>Recent failures</h2>{t}", t=job_rows(ctx, failures)),
    ])


# -- workers -----------------------------------------------------------------------------------


def worker_table(ctx: Context, rows: Sequence[Any], *, actions: bool = True) -> Safe:
    cells = []
    for w in rows:
        current = link(ctx.url(f"/jobs/{w.current_job_id}"), w.current_job_id) \
            if w.current_job_id else text(None)
        if not w.alive:
            condition = "dead (lease expired)"
        else:
            condition = w.state + (", stop requested" if w.stop_requested else "")
        cell = [w.id, w.hostname, w.pid, ", ".join(w.queues) if w.queues else "all queues",
                f"{w.isolation} × {w.concurrency}", condition, current, w.jobs_done,
                w.started_at, w.heartbeat_at, w.version]
        if actions:
            cell.append(ctx.button("/workers/stop", "Stop", danger=True, worker=w.id)
                        if w.alive and not w.stop_requested else text(None))
        cells.append(cell)
    headers = ["worker", "host", "pid", "queues", "isolation", "state", "current job", "jobs done",
               "started", "heartbeat", "version"] + (["stop"] if actions else [])
    return table(headers, cells, empty="No workers.")


def workers_page(ctx: Context, rows: Sequence[Any]) -> Safe:
    note = Safe('<p class="muted">Stop asks a worker to finish the jobs in hand and exit.</p>')
    return join([note, worker_table(ctx, rows)])


# -- schedules ---------------------------------------------------------------------------------


def rule(s: Any) -> str:
    """A schedule's timing in a few words, as ``sqla-pq status`` gives it."""
    if s.cron:
        return f"cron {s.cron}"
    if s.interval:
        return f"every {s.interval:g}s"
    if s.interval_relative:
        return f"every {s.interval_relative}"
    return "once"


def _window(s: Any) -> str | None:
    parts = []
    if s.between_start is not None and s.between_end is not None:
        parts.append(f"{s.between_start:%H:%M}–{s.between_end:%H:%M}")
    if s.weekdays:
        names = ("Mo", "Tu", "We", "Th", "Fr", "Sa", "Su")
        parts.append(" ".join(names[d] if 0 <= d < 7 else str(d) for d in s.weekdays))
    if s.until is not None:
        parts.append(f"until {when(s.until)}")
    return "; ".join(parts) or None


def schedule_table(ctx: Context, rows: Sequence[Any], *, actions: bool = True) -> Safe:
    cells = []
    for s in rows:
        args = arguments(s)
        cell = [s.id, s.task + (f" [{s.key}]" if s.key else ""), s.queue, rule(s),
                s.timezone, _window(s), args, s.runs, s.next_run_at or "done", s.last_run_at,
                "active" if s.active else "paused"]
        if actions:
            verb = "pause" if s.active else "resume"
            cell.append(ctx.button(f"/schedules/{s.id}/{verb}", verb.capitalize()))
        cells.append(cell)
    headers = ["id", "task", "queue", "rule", "time zone", "window", "arguments", "runs",
               "next run", "last run", "state"] + (["action"] if actions else [])
    return table(headers, cells, empty="No schedules.")


# -- flows -------------------------------------------------------------------------------------


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[s]} {s}" for s in ALL_STATES if counts.get(s)) or "no jobs left"


def flows_page(ctx: Context, rows: Sequence[FlowRow], *, name: str) -> Safe:
    form = render(
        '<form class="filter" method="get" action="{action}">'
        '<label>Name <input name="name" value="{name}" size="30"></label> '
        '<button type="submit">Show</button></form>',
        action=ctx.url("/flows"), name=name,
    )
    cells = [[link(ctx.url(f"/flows/{f.id}"), f.id), f.name, f.queue, f.created_at,
              state(f.status), _counts(f.counts)] for f in rows]
    return join([form, table(["id", "name", "queue", "created", "status", "jobs"], cells,
                             empty="No flows.")])


def flow_page(ctx: Context, row: FlowRow, jobs: Sequence[Any]) -> Safe:
    head = fields([("id", row.id), ("name", row.name), ("queue", row.queue),
                   ("created", row.created_at), ("status", state(row.status)),
                   ("jobs", _counts(row.counts))])
    return join([head, Safe("<h2>Jobs, in order</h2>"), job_rows(ctx, jobs)])


# -- answers that are not pages of data --------------------------------------------------------


def message(text_: str, *, back: str | None = None) -> Safe:
    body = render('<p class="error">{t}</p>', t=text_)
    if back:
        body = join([body, render("<p>{a}</p>", a=link(back, "Back"))])
    return body


NOT_CONFIGURED = """\
<p class="error">This dashboard denies every request until it is given an authorization hook.</p>
<p>Pass one that says who may see and change the queue:</p>
<pre>from sqla_pq.dashboard import Dashboard

dashboard = Dashboard(pq, authorize=lambda environ: is_admin(environ))</pre>
<p>For a dashboard that only you can reach (your own machine), allow everyone explicitly:
<code>Dashboard(pq, authorize=allow_all)</code> with
<code>from sqla_pq.dashboard import allow_all</code>.</p>
<p>From the command line: <code>sqla-pq dashboard --auth user:password</code> (HTTP Basic
authentication; or set <code>SQLA_PQ_DASHBOARD_AUTH=user:password</code>), or
<code>sqla-pq dashboard --no-auth</code> on a loopback address.</p>
"""


def not_configured() -> Safe:
    return Safe(NOT_CONFIGURED)
