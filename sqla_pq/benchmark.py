"""``sqla-pq benchmark``: django-pq's pqbenchmark.

Starts worker processes on a benchmark queue, enqueues N jobs (a no-op, or a sleep) while they
consume, waits until every job is done, and reports jobs/s, the enqueue rate, and the latency
from enqueue to start.  ``--backend rq`` runs the same load through RQ and Redis, when they are
installed and reachable, for a comparison on the same machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

QUEUE = "benchmark"


def do_nothing(sleep_ms: float = 0) -> None:
    """The benchmark task."""
    if sleep_ms:
        time.sleep(sleep_ms / 1000.0)


@dataclass
class Result:
    backend: str
    jobs: int
    workers: int
    isolation: str
    concurrency: int
    sleep_ms: float
    enqueue_per_s: float
    jobs_per_s: float
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        data = sorted(self.latencies_ms)
        k = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
        return data[k]

    def table(self) -> str:
        rows = [
            ("backend", self.backend),
            ("jobs", f"{self.jobs:,}"),
            ("workers", f"{self.workers} x {self.isolation}, concurrency {self.concurrency}"),
            ("job", f"sleep {self.sleep_ms:g} ms" if self.sleep_ms else "no-op"),
            ("enqueue rate", f"{self.enqueue_per_s:,.0f} jobs/s"),
            ("throughput", f"{self.jobs_per_s:,.0f} jobs/s"),
            ("latency p50 / p95 / p99",
             f"{self.percentile(50):.1f} / {self.percentile(95):.1f} / {self.percentile(99):.1f} ms"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_sqla_pq(url: str, n: int, workers: int, isolation: str, concurrency: int,
                sleep_ms: float, bulk: bool = False, timeout: float = 600.0) -> Result:
    from sqlalchemy import text

    from .pq import PQ

    pq = PQ(url)
    pq.migrate()
    with pq.session() as s:
        s.execute(text("DELETE FROM pq_job WHERE queue = :q"), {"q": QUEUE})
        s.execute(text("DELETE FROM pq_worker WHERE :q = ANY(queues)"), {"q": QUEUE})
    env = dict(os.environ, DATABASE_URL=url, SQLA_PQ_SCHEMA=pq.schema or "")
    cmd = [sys.executable, "-m", "sqla_pq", "-q", "worker", QUEUE, "--isolation", isolation,
           "-c", str(concurrency)]
    procs = [_spawn(cmd, env) for _ in range(workers)]
    try:
        _wait_for(lambda: _count(pq, "SELECT count(*) FROM pq_worker WHERE :q = ANY(queues) "
                                     "AND state <> 'starting'") >= workers, 60, "workers to start")
        args = (sleep_ms,) if sleep_ms else ()
        t0 = time.perf_counter()
        if bulk:
            pq.enqueue_many([(do_nothing, args)] * n, queue=QUEUE)
        else:
            q = pq.queue(QUEUE)
            for _ in range(n):
                q.enqueue(do_nothing, *args)
        t_enqueued = time.perf_counter()
        _wait_for(lambda: _count(pq, "SELECT count(*) FROM pq_job WHERE queue = :q AND status "
                                     "IN ('succeeded', 'failed')") >= n, timeout, "the jobs")
        t_done = time.perf_counter()
    finally:
        _stop(procs)
    with pq.session() as s:
        latencies = [r[0] for r in s.execute(text(
            "SELECT extract(epoch FROM started_at - enqueued_at) * 1000 FROM pq_job "
            "WHERE queue = :q AND started_at IS NOT NULL"), {"q": QUEUE})]
    pq.engine.dispose()
    return Result("sqla_pq", n, workers, isolation, concurrency, sleep_ms,
                  n / (t_enqueued - t0), n / (t_done - t0), [float(x) for x in latencies])


def run_rq(n: int, workers: int, sleep_ms: float, redis_url: str = "redis://127.0.0.1:6379/0",
           timeout: float = 600.0) -> Result:
    try:
        import redis
        import rq
    except ImportError as exc:
        raise SystemExit("--backend rq needs RQ and Redis: pip install rq redis") from exc
    conn = redis.Redis.from_url(redis_url)
    try:
        conn.ping()
    except redis.exceptions.ConnectionError as exc:
        raise SystemExit(f"Redis is not reachable at {redis_url}: {exc}") from None
    queue = rq.Queue(QUEUE, connection=conn)
    queue.empty()
    for registry in (queue.finished_job_registry, queue.failed_job_registry):
        for job_id in registry.get_job_ids():
            registry.remove(job_id, delete_job=True)
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "rq.cli", "worker", QUEUE, "--url", redis_url, "--quiet"]
    procs = [_spawn(cmd, env) for _ in range(workers)]
    try:
        _wait_for(lambda: len(rq.Worker.all(connection=conn)) >= workers, 60, "RQ workers")
        args = (sleep_ms,) if sleep_ms else ()
        t0 = time.perf_counter()
        jobs = [queue.enqueue(do_nothing, *args, result_ttl=3600) for _ in range(n)]
        t_enqueued = time.perf_counter()
        _wait_for(lambda: queue.finished_job_registry.count + queue.failed_job_registry.count >= n,
                  timeout, "the RQ jobs")
        t_done = time.perf_counter()
    finally:
        _stop(procs)
    latencies = []
    for job in jobs:
        job.refresh()
        if job.started_at and job.enqueued_at:
            latencies.append((job.started_at - job.enqueued_at).total_seconds() * 1000)
    return Result("rq", n, workers, "fork (RQ Worker)", 1, sleep_ms, n / (t_enqueued - t0),
                  n / (t_done - t0), latencies)


def _count(pq: Any, sql: str) -> int:
    from sqlalchemy import text

    with pq.session() as s:
        return int(s.execute(text(sql), {"q": QUEUE}).scalar_one())


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark: timed out waiting for {what}")
        time.sleep(0.02)


def main(args: Any) -> int:
    if args.backend == "rq":
        result = run_rq(args.n, args.workers, args.sleep)
    else:
        url = args.url or os.environ.get("DATABASE_URL")
        if not url:
            from . import embedded

            print("No DATABASE_URL: benchmarking on the embedded PostgreSQL")
            url = embedded.url_of(embedded.start())
        concurrency = args.concurrency or (8 if args.isolation == "thread" else 1)
        result = run_sqla_pq(url, args.n, args.workers, args.isolation, concurrency, args.sleep,
                             bulk=args.bulk)
    print(result.table())
    return 0


__all__ = ["Result", "do_nothing", "main", "run_rq", "run_sqla_pq"]
