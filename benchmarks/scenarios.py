"""BENCH.md's scenarios, written once against ``adapters.base.System``.

Every scenario starts from an empty queue (``system.reset()``), measures with
``time.perf_counter`` (latency with ``time.time``, which the worker processes share), and
returns a flat dict of figures.  ``run_scenario`` turns any failure into ``{"error": ...}``.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from .adapters.base import System
from .common import BenchError, percentile, read_ledger, rss_bytes, stop_all, wait_drained

SCENARIOS = ("E1", "E2", "P1", "P2", "PF", "L", "S", "M")
"""Q, the SQL limit, is not a library's scenario: see ``benchmarks.sql_limit``."""

WARM_UP_TIMEOUT = 60.0


def enqueue_each(system: System) -> dict[str, Any]:
    """E1: one transaction per job."""
    n = system.sizes.enqueue
    system.reset()
    t0 = time.perf_counter()
    system.enqueue_each(n)
    seconds = time.perf_counter() - t0
    _expect_pending(system, n)
    return {"jobs": n, "seconds": seconds, "jobs_per_s": n / seconds}


def enqueue_bulk(system: System) -> dict[str, Any]:
    """E2: one call of the library's bulk API."""
    n = system.sizes.enqueue
    system.reset()
    t0 = time.perf_counter()
    system.enqueue_bulk(n)
    seconds = time.perf_counter() - t0
    _expect_pending(system, n)
    return {"jobs": n, "seconds": seconds, "jobs_per_s": n / seconds}


def drain(system: System, workers: int) -> dict[str, Any]:
    """P1/P2/PF: pre-enqueued no-op jobs, ``workers`` burst worker processes; from the first
    worker's start to the poll that sees no job left."""
    sizes = system.sizes
    n = sizes.drain
    system.reset()
    system.enqueue_bulk(n)
    _expect_pending(system, n)
    t0 = time.perf_counter()
    procs = system.start_workers("drain", workers, burst=True)
    try:
        t1 = wait_drained(system.pending, procs, sizes.drain_timeout(n), sizes.poll_interval)
    finally:
        stop_all(procs, burst=True)
    seconds = t1 - t0
    _expect_no_failures(system)
    return {"jobs": n, "workers": workers, "seconds": seconds, "jobs_per_s": n / seconds}


def latency(system: System) -> dict[str, Any]:
    """L: an idle worker; jobs enqueued ``latency_gap`` apart; each records its start time."""
    sizes = system.sizes
    n = sizes.latency_jobs
    system.reset()
    fd, ledger = tempfile.mkstemp(prefix="bench_ledger_", suffix=".txt")
    os.close(fd)
    procs = system.start_workers("latency", 1, burst=False)
    try:
        _warm_up(system, procs)
        time.sleep(0.5)  # let the worker go back to sleep on its socket
        begin = time.perf_counter()
        for i in range(n):
            delay = begin + i * sizes.latency_gap - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            system.enqueue_one("stamp", (ledger, time.time()))
        wait_drained(system.pending, procs, sizes.drain_timeout(n), sizes.poll_interval)
        pairs = read_ledger(ledger)
    finally:
        stop_all(procs)
        os.unlink(ledger)
    if len(pairs) != n:
        raise BenchError(f"{len(pairs)} start times recorded for {n} jobs")
    _expect_no_failures(system)
    ms = [(started - sent) * 1000.0 for sent, started in pairs]
    return {
        "jobs": n, "gap_ms": sizes.latency_gap * 1000.0,
        "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99), "max_ms": max(ms), "mean_ms": sum(ms) / n,
    }


def sleepers(system: System) -> dict[str, Any]:
    """S: jobs that sleep ``sleep_seconds`` on a warm worker of ``sleep_concurrency`` slots;
    from the bulk enqueue to the poll that sees none left (ideal: concurrency / sleep)."""
    sizes = system.sizes
    n = sizes.sleep_jobs
    system.reset()
    procs = system.start_workers("sleep", 1, burst=False)
    try:
        _warm_up(system, procs)
        t0 = time.perf_counter()
        system.enqueue_bulk(n, "sleep", (sizes.sleep_seconds,))
        t1 = wait_drained(system.pending, procs, sizes.drain_timeout(n), sizes.poll_interval)
    finally:
        stop_all(procs)
    _expect_no_failures(system)
    seconds = t1 - t0
    ideal = sizes.sleep_concurrency / sizes.sleep_seconds
    rate = n / seconds
    return {"jobs": n, "concurrency": sizes.sleep_concurrency,
            "sleep_ms": sizes.sleep_seconds * 1000.0, "seconds": seconds, "jobs_per_s": rate,
            "ideal_jobs_per_s": ideal, "efficiency": rate / ideal}


def memory(system: System, chunk: int = 10_000) -> dict[str, Any]:
    """M: one long-running worker; its RSS after a warm-up job, then after ``memory_jobs``
    no-op jobs (enqueued in bulk chunks while it works)."""
    sizes = system.sizes
    n = sizes.memory_jobs
    system.reset()
    procs = system.start_workers("memory", 1, burst=False)
    pid = procs[0].pid
    peak = 0

    def pending_and_rss() -> int:
        nonlocal peak
        peak = max(peak, rss_bytes(pid))
        return system.pending()

    try:
        _warm_up(system, procs)
        time.sleep(0.2)
        before = rss_bytes(pid)
        t0 = time.perf_counter()
        left = n
        while left:
            k = min(chunk, left)
            system.enqueue_bulk(k)
            left -= k
            peak = max(peak, rss_bytes(pid))
        t1 = wait_drained(pending_and_rss, procs, sizes.drain_timeout(n), sizes.poll_interval)
        after = rss_bytes(pid)
    finally:
        stop_all(procs)
    _expect_no_failures(system)
    mb = 1024.0 * 1024.0
    return {"jobs": n, "rss_before_mb": before / mb, "rss_after_mb": after / mb,
            "rss_peak_mb": max(peak, after) / mb, "growth_pct": (after - before) / before * 100.0,
            "seconds": t1 - t0, "jobs_per_s": n / (t1 - t0)}


RUNNERS: dict[str, Callable[[System], dict[str, Any]]] = {
    "E1": enqueue_each,
    "E2": enqueue_bulk,
    "P1": lambda s: drain(s, 1),
    "P2": lambda s: drain(s, 2),
    "PF": lambda s: drain(s, 2),
    "L": latency,
    "S": sleepers,
    "M": memory,
}


def run_scenario(system: System, scenario: str) -> dict[str, Any]:
    """One scenario's figures, or ``{"error": ...}``: a failure never stops the run."""
    try:
        return RUNNERS[scenario](system)
    except Exception as exc:  # reported in the table; the run goes on
        if isinstance(exc, BenchError):
            return {"error": str(exc), "detail": exc.detail}
        return {"error": f"{type(exc).__name__}: {exc}", "detail": traceback.format_exc(limit=6)}


def run_system(system: System, scenarios: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Every scenario of the system's variant (or those of ``scenarios`` it runs)."""
    wanted = system.variants[system.variant]
    chosen = [s for s in wanted if scenarios is None or s in scenarios]
    return {s: run_scenario(system, s) for s in chosen}


# -- checks ----------------------------------------------------------------------------------------


def _warm_up(system: System, procs: list[Any]) -> None:
    """One no-op job through the fresh worker: it is up, connected and listening after this."""
    system.enqueue_one("noop")
    wait_drained(system.pending, procs, WARM_UP_TIMEOUT, system.sizes.poll_interval)


def _expect_pending(system: System, n: int) -> None:
    found = system.pending()
    if found != n:
        raise BenchError(f"{found} jobs pending after enqueueing {n}")


def _expect_no_failures(system: System) -> None:
    failed = system.failed()
    if failed:
        raise BenchError(f"{failed} job(s) failed: the figure would not be a no-op's")
