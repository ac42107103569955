"""The benchmark runner's sqla_pq side at a tiny size (no peers, no pgbench, no Redis): every
scenario of the thread row, and PF of the fork row, yields real, positive figures, and the
report renders them."""

from __future__ import annotations

import dataclasses
import math

import pytest

from benchmarks import report
from benchmarks.adapters.sqla_pq_bench import SqlaPq
from benchmarks.common import Sizes
from benchmarks.scenarios import run_system

pytestmark = pytest.mark.slow

TINY = Sizes(enqueue=200, drain=200, latency_jobs=10, latency_gap=0.01, sleep_jobs=16,
             sleep_seconds=0.02, memory_jobs=300, concurrency=4)
FORK = dataclasses.replace(TINY, drain=30)
"""A fork child per job is slow: fewer jobs, and only PF, keep the test short."""
ONLY = {"thread": None, "fork": ("PF",)}


def _positive(figures: dict, *keys: str) -> None:
    for key in keys:
        value = figures[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, figures)


def test_the_sqla_pq_side_of_the_runner_measures_every_scenario(url_str):
    rows = []
    for variant, sizes in (("thread", TINY), ("fork", FORK)):
        system = SqlaPq(url_str, sizes, variant)
        try:
            results = run_system(system, ONLY[variant])
        finally:
            system.close()
        assert list(results) == list(ONLY[variant] or SqlaPq.variants[variant])
        errors = {s: f["error"] + "\n" + f.get("detail", "") for s, f in results.items()
                  if "error" in f}
        assert not errors, errors
        for scenario, figures in results.items():
            if scenario in ("E1", "E2", "P1", "P2", "PF", "S", "M"):
                _positive(figures, "jobs", "seconds", "jobs_per_s")
            if scenario in ("P1", "P2", "PF"):
                assert figures["jobs"] == sizes.drain
                assert figures["workers"] == (1 if scenario == "P1" else 2)
        rows.append({"library": "sqla_pq", "variant": variant, "label": system.label,
                     "settings": system.settings(), "results": results})

    thread = rows[0]["results"]
    assert thread["E1"]["jobs"] == thread["E2"]["jobs"] == TINY.enqueue
    latency = thread["L"]
    _positive(latency, "p50_ms", "p95_ms", "p99_ms", "max_ms")
    assert latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert 0 < thread["S"]["efficiency"] <= 1.05  # cannot beat concurrency / sleep
    _positive(thread["M"], "rss_before_mb", "rss_after_mb", "rss_peak_mb")
    assert math.isfinite(thread["M"]["growth_pct"])

    run = {"date": "today", "quick": True, "sizes": dataclasses.asdict(TINY), "versions": {},
           "environment": {}, "rows": rows, "sql_limit": None, "skipped": [], "elapsed_s": 1.0}
    text = report.render(run)
    assert f"| {rows[0]['label']} | {thread['E1']['jobs_per_s']:,.0f} |" in text
    verdicts = {v.target: v for v in report.evaluate(run)}
    assert verdicts["E1 ≥ 1.2× the best PostgreSQL peer"].verdict == "–"  # no peer to compare
    assert "**" in verdicts["S ≥ 95 % of ideal"].verdict  # judged: met or missed
    assert "**" in verdicts["M RSS growth < 10 %"].verdict


def test_the_report_shows_errors_and_judges_against_peers():
    """Pure rendering: an error becomes a numbered note, ratios come from the same run."""
    sizes = dataclasses.asdict(TINY)
    ok = {"jobs": 10, "seconds": 1.0, "jobs_per_s": 10.0}
    rows = [
        {"library": "sqla_pq", "variant": "thread", "label": "sqla_pq thread", "settings": "",
         "results": {"E1": {"jobs": 10, "seconds": 0.5, "jobs_per_s": 20.0},
                     "P2": {"error": "the workers exited with 3 job(s) left", "detail": "boom"}}},
        {"library": "pgqueuer", "variant": "default", "label": "pgqueuer", "settings": "",
         "results": {"E1": ok}},
    ]
    run = {"date": "today", "quick": True, "sizes": sizes, "versions": {}, "environment": {},
           "rows": rows, "sql_limit": {"error": "pgbench is not installed"}, "skipped": ["rq: x"],
           "elapsed_s": 1.0}
    text = report.render(run)
    assert "error [1]" in text and "1. the workers exited with 3 job(s) left" in text
    assert "2. pgbench is not installed" in text and "- rq: x" in text
    verdicts = {v.target: v for v in report.evaluate(run)}
    e1 = verdicts["E1 ≥ 1.2× the best PostgreSQL peer"]
    assert e1.measured.startswith("2.00×") and e1.verdict.startswith("**met**, 67% above")
    assert verdicts["P2 (in-process) ≥ 1.5× PgQueuer"].measured == "not measured"
