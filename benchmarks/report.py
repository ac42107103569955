"""The markdown report: the side-by-side table, BENCH.md's targets as ratios, settings, versions,
the raw figures, and the errors.

A run is a plain dict (see ``run.py``)::

    {"date": ..., "quick": bool, "sizes": {...}, "versions": {...}, "environment": {...},
     "rows": [{"library", "variant", "label", "settings", "results": {scenario: figures}}],
     "sql_limit": figures | None, "skipped": [reason, ...], "elapsed_s": float}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PG_PEERS = ("procrastinate", "pgqueuer")
COLUMNS = ("E1", "E2", "P1", "P2", "PF", "L", "S", "M")


# -- looking things up ----------------------------------------------------------------------------


def _row(run: dict[str, Any], library: str, variant: str | None = None) -> dict[str, Any] | None:
    for row in run["rows"]:
        if row["library"] == library and (variant is None or row["variant"] == variant):
            return row
    return None


def _figure(row: dict[str, Any] | None, scenario: str, key: str) -> float | None:
    if row is None:
        return None
    figures = row["results"].get(scenario)
    if not figures or "error" in figures:
        return None
    value = figures.get(key)
    return float(value) if value is not None else None


def _peer_rows(run: dict[str, Any], libraries: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    return [r for r in run["rows"] if r["library"] != "sqla_pq"
            and (libraries is None or r["library"] in libraries)]


def _best(run: dict[str, Any], scenario: str, key: str, libraries: tuple[str, ...] | None,
          pick: Callable[..., Any]) -> tuple[float, str] | None:
    found = [(v, r["label"]) for r in _peer_rows(run, libraries)
             if (v := _figure(r, scenario, key)) is not None]
    return pick(found, key=lambda t: t[0]) if found else None


# -- targets ------------------------------------------------------------------------------------


@dataclass
class Verdict:
    target: str
    measured: str
    verdict: str


def _judge(target: str, value: float | None, threshold: float, at_least: bool,
           what: str, unit: str = "×") -> Verdict:
    if value is None:
        return Verdict(target, "not measured", "–")
    shown = f"{value:.2f}{unit}" if unit == "×" else f"{value:.1f}{unit}"
    if at_least:
        met = value >= threshold
        margin = (value / threshold - 1) if met else (1 - value / threshold)
        word = "above" if met else "short"
    else:
        met = value <= threshold
        if threshold == 0:
            margin, word = 0.0, "over"
        else:
            margin = (1 - value / threshold) if met else (value / threshold - 1)
            word = "under" if met else "over"
    return Verdict(target, f"{shown} ({what})",
                   f"**{'met' if met else 'missed'}**, {margin:.0%} {word}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(run: dict[str, Any]) -> list[Verdict]:
    sq = _row(run, "sqla_pq", "thread")
    fork = _row(run, "sqla_pq", "fork")
    out = []

    e1 = _figure(sq, "E1", "jobs_per_s")
    best = _best(run, "E1", "jobs_per_s", PG_PEERS, max)
    out.append(_judge("E1 ≥ 1.2× the best PostgreSQL peer", _ratio(e1, best and best[0]), 1.2,
                      True, f"vs {best[1]}" if best else "no PostgreSQL peer"))

    pgq = _row(run, "pgqueuer")
    out.append(_judge("E2 ≥ 1.0× PgQueuer", _ratio(_figure(sq, "E2", "jobs_per_s"),
                                                  _figure(pgq, "E2", "jobs_per_s")),
                      1.0, True, "vs pgqueuer" if pgq else "PgQueuer not run"))

    p2 = _figure(sq, "P2", "jobs_per_s")
    out.append(_judge("P2 (in-process) ≥ 1.5× PgQueuer",
                      _ratio(p2, _figure(pgq, "P2", "jobs_per_s")), 1.5, True,
                      f"{sq['label'] if sq else 'sqla_pq'} vs pgqueuer" if pgq else "PgQueuer not run"))
    q = run.get("sql_limit") or {}
    share = _ratio(p2, q.get("jobs_per_s"))
    out.append(_judge("P2 (in-process) ≥ 25 % of the SQL limit Q",
                      None if share is None else share * 100, 25.0, True,
                      "of Q" if q.get("jobs_per_s") else "Q not run", unit=" %"))

    rq_fork = _row(run, "rq", "fork")
    out.append(_judge("PF ≥ 3× RQ fork-per-job",
                      _ratio(_figure(fork, "PF", "jobs_per_s"), _figure(rq_fork, "PF", "jobs_per_s")),
                      3.0, True, "vs rq fork-per-job" if rq_fork else "RQ not run"))

    p50 = _figure(sq, "L", "p50_ms")
    best_l = _best(run, "L", "p50_ms", None, min)
    out.append(_judge("L p50 ≤ 1.0× the best peer", _ratio(p50, best_l and best_l[0]), 1.0,
                      False, f"vs {best_l[1]}" if best_l else "no peer"))
    out.append(_judge("L p99 ≤ 10 ms", _figure(sq, "L", "p99_ms"), 10.0, False, "absolute",
                      unit=" ms"))

    eff = _figure(sq, "S", "efficiency")
    out.append(_judge("S ≥ 95 % of ideal", None if eff is None else eff * 100, 95.0, True,
                      "of concurrency / sleep", unit=" %"))
    out.append(_judge("M RSS growth < 10 %", _figure(sq, "M", "growth_pct"), 10.0, False,
                      f"over {int(_figure(sq, 'M', 'jobs') or 0):,} jobs", unit=" %"))
    return out


# -- cells ----------------------------------------------------------------------------------------


def _cell(figures: dict[str, Any] | None, scenario: str, notes: list[str]) -> str:
    if figures is None:
        return "–"
    if "error" in figures:
        notes.append(figures["error"])
        return f"error [{len(notes)}]"
    if scenario == "L":
        return f"{figures['p50_ms']:.1f} / {figures['p95_ms']:.1f} / {figures['p99_ms']:.1f}"
    if scenario == "M":
        return (f"{figures['rss_before_mb']:.1f} → {figures['rss_after_mb']:.1f} MB "
                f"({figures['growth_pct']:+.1f} %)")
    if scenario == "S":
        return f"{figures['jobs_per_s']:,.1f} ({figures['efficiency']:.0%})"
    return f"{figures['jobs_per_s']:,.0f}"


def _raw(figures: dict[str, Any]) -> str:
    parts = []
    for key, value in figures.items():
        if key == "detail":
            continue
        if isinstance(value, list):
            value = "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                    for v in value) + "]"
        elif isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def render(run: dict[str, Any]) -> str:
    sizes = run["sizes"]
    notes: list[str] = []
    lines = [
        f"# sqla_pq benchmark results ({'quick' if run['quick'] else 'full'} run)",
        "",
        f"Date: {run['date']}; took {run['elapsed_s']:.0f} s.  "
        f"Load average at start / end: {run['environment'].get('load_start', '?')} / "
        f"{run['environment'].get('load_end', '?')} on {run['environment'].get('cpus', '?')} CPUs.",
        "",
        "> Timings on a shared machine are noisy: compare the ratios measured within this run, "
        "not absolute figures across runs.  Final numbers must be taken on a quiet machine.",
        "",
        "## Side by side",
        "",
        "jobs/s unless noted; L is start time minus enqueue time, p50 / p95 / p99 in ms; S in "
        "jobs/s (share of ideal); M is the worker's RSS before → after.",
        "",
        "| system | " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * len(COLUMNS),
    ]
    for row in run["rows"]:
        cells = [_cell(row["results"].get(c), c, notes) for c in COLUMNS]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    q = run.get("sql_limit")
    if q is not None:
        q_cell = _cell(q, "Q", notes)
        lines += ["", f"**Q, the SQL limit** (pgbench, claim {sizes['q_claim']} with SKIP LOCKED "
                      f"+ mark done, {sizes['q_clients']} clients): {q_cell} jobs/s."]
    lines += ["", "## Targets (BENCH.md)", "", "| target | measured | verdict |",
              "| --- | --- | --- |"]
    for v in evaluate(run):
        lines.append(f"| {v.target} | {v.measured} | {v.verdict} |")

    lines += ["", "## Settings", "",
              f"- Sizes: E1/E2 {sizes['enqueue']:,} jobs; P1/P2/PF {sizes['drain']:,} jobs; "
              f"L {sizes['latency_jobs']} jobs {sizes['latency_gap'] * 1000:.0f} ms apart; "
              f"S {sizes['sleep_jobs']} jobs × {sizes['sleep_seconds'] * 1000:.0f} ms at "
              f"concurrency {sizes['sleep_concurrency']}; M {sizes['memory_jobs']:,} jobs; "
              f"Q {sizes['q_clients']} clients × {sizes['q_claim']} per claim.",
              "- Drains (P1/P2/PF) time from the first worker's start to the first 50 ms poll "
              "that finds no unfinished job; L and S use a warm, idle worker.",
              f"- Repeats: {run.get('repeat', 1)} (round robin; the median try is shown, "
              "every try's figure under Raw figures as `tries`).",
              f"- Worker log lines: {'off (quiet)' if sizes.get('quiet_workers') else 'each library default, to a file'}."]
    for row in run["rows"]:
        lines.append(f"- {row['label']}: {row['settings']}")
    lines += ["", "## Versions", ""]
    for key, value in run["versions"].items():
        lines.append(f"- {key}: {value}")
    if run.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in run["skipped"]]

    lines += ["", "## Raw figures", "", "| system | scenario | figures |", "| --- | --- | --- |"]
    for row in run["rows"]:
        for scenario, figures in row["results"].items():
            lines.append(f"| {row['label']} | {scenario} | {_raw(figures)} |")
    if q is not None:
        lines.append(f"| PostgreSQL (pgbench) | Q | {_raw(q)} |")

    if notes:
        lines += ["", "## Errors", ""]
        lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
        details = [(row["label"], s, f["detail"]) for row in run["rows"]
                   for s, f in row["results"].items() if f.get("detail")]
        if q and q.get("detail"):
            details.append(("PostgreSQL (pgbench)", "Q", q["detail"]))
        for label, scenario, detail in details:
            lines += ["", f"<details><summary>{label} {scenario}</summary>", "", "```",
                      detail.strip()[-1500:], "```", "", "</details>"]

    lines += ["", "<details><summary>The run as JSON</summary>", "", "```json",
              json.dumps(_without_details(run), indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(lines)


def _without_details(run: dict[str, Any]) -> dict[str, Any]:
    copy = json.loads(json.dumps(run, default=str))
    for row in copy["rows"]:
        for figures in row["results"].values():
            figures.pop("detail", None)
    if copy.get("sql_limit"):
        copy["sql_limit"].pop("detail", None)
    return copy
