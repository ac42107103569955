"""Escaping and the page frame: every value reaches the page through :func:`esc`.

Templates are ``str.format`` strings whose values :func:`render` escapes unless they are
:class:`Safe` (markup this module built).  Escaping is the default, so a forgotten call cannot
let a job's arguments, error or task name through as markup (rq-dashboard#526, Hangfire#1441).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

MISSING = "—"


class Safe(str):
    """Markup that is already escaped (built here, never taken from the database)."""

    __slots__ = ()


def esc(value: Any) -> Safe:
    """``value`` as text fit for an element or a quoted attribute."""
    if isinstance(value, Safe):
        return value
    return Safe(html.escape(str(value), quote=True))


def render(template: str, **values: Any) -> Safe:
    """Fill ``template`` (a literal of this package) with escaped ``values``."""
    return Safe(template.format(**{k: esc(v) for k, v in values.items()}))


def join(parts: Iterable[Safe], sep: str = "") -> Safe:
    return Safe(sep.join(esc(p) for p in parts))


def text(value: Any, limit: int | None = None) -> Safe:
    """A value as escaped text: a dash for None, a cut and an ellipsis past ``limit``
    (markup already :class:`Safe` is kept as it is)."""
    if value is None:
        return Safe(MISSING)
    if isinstance(value, Safe):
        return value
    if isinstance(value, dt.datetime):
        return esc(when(value))
    value = str(value)
    if limit is not None and len(value) > limit:
        value = value[: limit - 1] + "…"
    return esc(value)


def when(moment: dt.datetime | None) -> str:
    """Times in UTC, to the second: the dashboard's readers may sit in other time zones."""
    if moment is None:
        return MISSING
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def href(base: str, path: str, query: Mapping[str, Any] | None = None) -> str:
    """A URL under the dashboard's mount point, its parts percent-encoded (escape it in markup)."""
    url = quote(base + path, safe="/:@-._~")
    params = {k: v for k, v in (query or {}).items() if v not in (None, "")}
    return f"{url}?{urlencode(params)}" if params else url


def link(url: str, label: Any) -> Safe:
    return render('<a href="{url}">{label}</a>', url=url, label=label)


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str = "none") -> Safe:
    """A table of cells; plain values are escaped, :class:`Safe` cells are kept."""
    head = join(render("<th>{h}</th>", h=h) for h in headers)
    body = [join(render("<td>{c}</td>", c=text(c) if not isinstance(c, Safe) else c)
                 for c in row) for row in rows]
    if not body:
        return render('<p class="muted">{empty}</p>', empty=empty)
    lines = join(render("<tr>{cells}</tr>", cells=cells) for cells in body)
    return render("<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>",
                  head=head, lines=lines)


def fields(pairs: Iterable[tuple[str, Any]]) -> Safe:
    """A two-column table of a record's fields."""
    rows = join(render("<tr><th>{k}</th><td>{v}</td></tr>", k=k,
                       v=text(v) if not isinstance(v, Safe) else v) for k, v in pairs)
    return render('<table class="fields"><tbody>{rows}</tbody></table>', rows=rows)


def pre(value: Any) -> Safe:
    return render("<pre>{v}</pre>", v=text(value))


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#24292f;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#d0d7de;text-decoration:none;margin-right:1.1em}header a.here{color:#fff;font-weight:600}
main{padding:1em 1.2em;max-width:100em}
h1{font-size:1.3em;margin:.2em 0 .6em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin:.3em 0 1em}
th,td{border:1px solid #d0d7de;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}
table.fields th{width:12em}
td.num{text-align:right}
pre{white-space:pre-wrap;word-break:break-word;background:#fff;border:1px solid #d0d7de;
padding:.6em;max-height:40em;overflow:auto;margin:0}
form.inline{display:inline;margin:0 .2em 0 0}
form.filter{margin:0 0 1em}
button{font:inherit;padding:.1em .6em;cursor:pointer}
button.danger{color:#a40e26}
.muted{color:#6e7781}
.state-failed{color:#a40e26;font-weight:600}.state-running{color:#0969da;font-weight:600}
.state-succeeded{color:#1a7f37}.state-cancelled{color:#6e7781}
.error{background:#ffebe9;border:1px solid #ff8182;padding:.6em;margin:0 0 1em}
.paging a{margin-right:1em}
"""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()}'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
"""No script, no images, no frames, forms only to this origin; the one stylesheet by hash."""

NAV = (("/", "Overview"), ("/jobs", "Jobs"), ("/workers", "Workers"),
       ("/schedules", "Schedules"), ("/flows", "Flows"))


def page(title: str, heading: str, body: Safe, *, base: str = "", here: str = "",
         nav: bool = True) -> bytes:
    """A whole HTML document (UTF-8)."""
    links = join(
        render('<a href="{url}"{cls}>{label}</a>', url=href(base, path), label=label,
               cls=Safe(' class="here"' if path == here else ""))
        for path, label in NAV
    ) if nav else Safe("")
    document = render(
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        "<title>{heading} · {title}</title><style>{css}</style></head>"
        "<body><header><strong>{title}</strong><nav>{links}</nav></header>"
        "<main><h1>{heading}</h1>{body}{footer}</main></body></html>\n",
        title=title, heading=heading, css=Safe(CSS), links=links, body=body,
        footer=Safe('<p class="muted">Times are UTC.</p>' if nav else ""),
    )
    return document.encode("utf-8")
