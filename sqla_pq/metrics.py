"""Metrics hooks: one :class:`JobMetric` per recorded attempt, for counters and histograms.

A hook is any callable taking a :class:`JobMetric`.  Register it with
``pq.add_metrics_hook(hook)`` (every worker of that ``PQ``) or ``Worker(metrics_hooks=[...])``.
Workers call hooks in their own loop, after the attempt's outcome is committed, so a metric
never counts an outcome the database does not hold; keep hooks quick (an increment, a queue
put), since the worker claims nothing while one runs.  A hook that raises is logged and
skipped: metrics never stop jobs.

:class:`PrometheusMetrics` is a ready hook for ``prometheus_client`` (``pip install
'sqla_pq[prometheus]'``); ``sqla-pq worker --metrics-port 9108`` serves it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .execution.call import ClaimedJob, Outcome
    from .pq import PQ

log = logging.getLogger("sqla_pq.metrics")

RECORDED_KINDS = frozenset({"succeeded", "failed", "retry", "cancelled", "step", "interrupted",
                            "fenced"})
"""Outcomes that end an attempt.  ``released`` (a prefetched job handed back unstarted) is not
an attempt and has no metric."""


@dataclass(frozen=True)
class JobMetric:
    """How one attempt ended, as its worker recorded it."""

    job_id: int
    task: str | None
    queue: str
    outcome: str
    """``succeeded``, ``failed`` (for good), ``retry`` (failed, will run again),
    ``cancelled``, ``step`` (one task of a multi-step job), ``interrupted`` (the worker stopped
    it; back in the queue, or failed once ``max_interruptions`` is reached) or ``fenced`` (its
    worker lost the lease; back in the queue unless the rescuer had already taken it)."""
    attempt: int
    duration: float | None
    """Seconds the attempt ran, measured where it ran (for a crash or a kill, by the worker:
    how long its process lived); None when the worker gave the job back without hearing from
    it (an abort that a blocking call did not let land)."""
    wait: float | None
    """Seconds from the job's ``run_at`` to its claim, on the database's clock: how far behind
    the workers are.  A job that waited for parents (``depends_on``, a flow's later step) keeps
    the ``run_at`` of its enqueue, so its wait includes the parents' run."""
    worker: str
    error: str | None = None

    @classmethod
    def of(cls, job: ClaimedJob | None, outcome: Outcome, worker: str) -> JobMetric:
        wait = None
        if job is not None and job.started_at is not None and job.run_at is not None:
            wait = max(0.0, (job.started_at - job.run_at) / dt.timedelta(seconds=1))
        return cls(
            job_id=outcome.job_id,
            task=job.task if job is not None else None,
            queue=(job.queue if job is not None else outcome.queue) or "",
            outcome=outcome.kind,
            attempt=outcome.attempt,
            duration=outcome.duration,
            wait=wait,
            worker=worker,
            error=outcome.error if outcome.kind != "succeeded" else None,
        )


MetricsHook = Callable[[JobMetric], Any]


class HookRunner:
    """Calls the hooks for each metric; a failing hook is logged (with its traceback the first
    time, then once per 1,000 failures) and never reaches the worker loop."""

    def __init__(self, hooks: Iterable[MetricsHook]) -> None:
        self.hooks = tuple(hooks)
        self._failures: dict[int, int] = {}

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def emit(self, metrics: Iterable[JobMetric]) -> None:
        for metric in metrics:
            for index, hook in enumerate(self.hooks):
                try:
                    hook(metric)
                except Exception:  # noqa: BLE001 - a metrics backend must not stop the worker
                    n = self._failures[index] = self._failures.get(index, 0) + 1
                    if n == 1:
                        log.exception("metrics hook %r failed; the worker goes on without it "
                                      "for this job", hook)
                    elif n % 1000 == 0:
                        log.warning("metrics hook %r has failed %d times", hook, n)


# -- Prometheus ----------------------------------------------------------------------------------

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            "PrometheusMetrics needs prometheus_client: pip install 'sqla_pq[prometheus]'"
        ) from exc
    return prometheus_client


class PrometheusMetrics:
    """A metrics hook that feeds ``prometheus_client``:

    - ``sqla_pq_jobs_total{queue, task, outcome}``: attempts ended;
    - ``sqla_pq_job_duration_seconds{queue, task}``: how long tasks ran;
    - ``sqla_pq_job_wait_seconds{queue}``: due-to-claim delay;
    - with ``pq=``, ``sqla_pq_queue_jobs{queue, status}``: job counts read from the database at
      each scrape (one grouped count; leave it to one process, not every worker).
    """

    def __init__(self, registry: Any = None, *, namespace: str = "sqla_pq",
                 pq: PQ | None = None) -> None:
        prom = _prometheus()
        registry = prom.REGISTRY if registry is None else registry
        self.registry = registry
        self.jobs = prom.Counter("jobs", "Job attempts ended, by outcome.",
                                 ["queue", "task", "outcome"], namespace=namespace,
                                 registry=registry)
        self.duration = prom.Histogram("job_duration_seconds", "Seconds a task ran.",
                                       ["queue", "task"], namespace=namespace,
                                       buckets=DURATION_BUCKETS, registry=registry)
        self.wait = prom.Histogram("job_wait_seconds",
                                   "Seconds from a job's run_at to its claim.", ["queue"],
                                   namespace=namespace, buckets=DURATION_BUCKETS,
                                   registry=registry)
        if pq is not None:
            registry.register(_QueueCollector(pq, namespace))

    def __call__(self, metric: JobMetric) -> None:
        task = metric.task or ""
        self.jobs.labels(metric.queue, task, metric.outcome).inc()
        if metric.duration is not None:
            self.duration.labels(metric.queue, task).observe(metric.duration)
        if metric.wait is not None:
            self.wait.labels(metric.queue).observe(metric.wait)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` from a daemon thread of this process."""
        _prometheus().start_http_server(port, addr=addr, registry=self.registry)


class _QueueCollector:
    """Job counts per queue and state, read when Prometheus scrapes."""

    def __init__(self, pq: PQ, namespace: str) -> None:
        self.pq = pq
        self.name = f"{namespace}_queue_jobs"

    def describe(self) -> Sequence[Any]:
        return []  # counts are read at collect time only, not when registering

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, "Jobs per queue and status.",
                                   labels=["queue", "status"])
        try:
            stats = self.pq.queue_stats()
        except Exception:  # noqa: BLE001 - a scrape while the database is away: no sample
            log.warning("could not read the queue counts for Prometheus", exc_info=True)
            stats = {}
        for queue, counts in sorted(stats.items()):
            for status, n in sorted(counts.items()):
                family.add_metric([queue, status], n)
        yield family
