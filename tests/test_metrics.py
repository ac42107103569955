"""Metrics hooks: one JobMetric per recorded attempt, in every isolation mode; a failing hook
never stops the worker; the Prometheus hook counts what the worker recorded."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from sqla_pq import JobMetric, PrometheusMetrics
from sqla_pq.testing import drain
from tests import tasks
from tests.helpers import BackgroundWorker, wait_until


def _by_job(metrics: list[JobMetric]) -> dict[int, list[JobMetric]]:
    out: dict[int, list[JobMetric]] = {}
    for m in metrics:
        out.setdefault(m.job_id, []).append(m)
    return out


def test_each_recorded_attempt_gives_one_metric_with_outcome_duration_and_wait(pq):
    seen: list[JobMetric] = []
    pq.add_metrics_hook(seen.append)
    ok = pq.enqueue(tasks.sleep, 0.05, queue="reports")
    flaky = pq.enqueue(tasks.flaky, 2, max_retries=3)
    failing = pq.enqueue(tasks.fail, "nope")
    assert drain(pq) == 4

    by_job = _by_job(seen)
    assert len(seen) == 4
    [m] = by_job[ok.id]
    assert (m.outcome, m.queue, m.task, m.attempt) == ("succeeded", "reports", "tests.tasks.sleep", 1)
    assert m.duration is not None and m.duration >= 0.05
    assert m.wait is not None and m.wait >= 0 and m.error is None
    assert m.worker == pq.get_job(ok.id).worker_id
    assert [(m.outcome, m.attempt) for m in by_job[flaky.id]] == [("retry", 1), ("succeeded", 2)]
    [m] = by_job[failing.id]
    assert m.outcome == "failed" and "nope" in m.error


def test_a_delayed_start_shows_as_wait(pq):
    seen: list[JobMetric] = []
    job = pq.enqueue(tasks.nothing)
    with pq.engine.begin() as conn:  # due a minute ago, as if the workers were behind
        conn.exec_driver_sql(
            "UPDATE pq_job SET run_at = now() - interval '60 seconds' WHERE id = %s", (job.id,))
    drain(pq, metrics_hooks=[seen.append])
    [m] = seen
    assert 59 <= m.wait < 120


def test_fork_mode_metrics_cover_crashed_children(pq):
    seen: list[JobMetric] = []
    ok = pq.enqueue(tasks.add, 1, 2)
    crash = pq.enqueue(tasks.hard_exit, 3)
    drain(pq, isolation="fork", metrics_hooks=[seen.append])
    by_job = _by_job(seen)
    [m] = by_job[ok.id]
    assert m.outcome == "succeeded" and m.duration is not None
    [m] = by_job[crash.id]
    assert m.outcome == "failed" and m.duration is not None and "exit" in m.error.lower()


def test_a_thread_mode_timeout_reports_how_long_the_job_ran(pq):
    seen: list[JobMetric] = []
    job = pq.enqueue(tasks.busy_loop, 5, timeout=0.3)
    drain(pq, metrics_hooks=[seen.append])
    [m] = seen
    assert m.job_id == job.id and m.outcome == "failed" and "JobTimeout" in m.error
    assert m.duration is not None and 0.25 <= m.duration < 5


def test_an_aborted_attempt_is_counted_interrupted_with_its_run_time(pq):
    seen: list[JobMetric] = []
    job = pq.enqueue(tasks.busy_loop, 30)  # Python code: the stop lands at once
    with BackgroundWorker(pq, maintenance=False, metrics_hooks=[seen.append]) as worker:
        wait_until(lambda: worker.state == "busy", 15, message="the job to start")
        time.sleep(0.2)
        worker.abort()  # a second signal: the job goes back to the queue
        wait_until(lambda: seen, 15, message="the interrupted attempt's metric")
    [m] = seen
    assert m.job_id == job.id and m.outcome == "interrupted"
    assert m.duration is not None and 0.1 < m.duration < 30
    assert pq.get_job(job.id).status == "queued"


def test_a_failing_hook_is_logged_once_and_never_stops_the_worker(pq, caplog):
    calls: list[int] = []

    def broken(metric: JobMetric) -> None:
        calls.append(metric.job_id)
        raise RuntimeError("metrics backend down")

    seen: list[JobMetric] = []
    jobs = [pq.enqueue(tasks.add, i, i) for i in range(3)]
    with caplog.at_level(logging.ERROR, logger="sqla_pq.metrics"):
        assert drain(pq, metrics_hooks=[broken, seen.append]) == 3
    assert sorted(calls) == sorted(j.id for j in jobs)
    assert len(seen) == 3  # the hook after the broken one still ran
    assert all(pq.get_job(j.id).status == "succeeded" for j in jobs)
    assert sum("metrics hook" in r.getMessage() for r in caplog.records) == 1


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_prometheus_hook_counts_outcomes_and_reads_queue_depths(pq):
    registry = CollectorRegistry()
    prom = PrometheusMetrics(registry, pq=pq)
    pq.add_metrics_hook(prom)
    pq.enqueue(tasks.add, 1, 1)
    pq.enqueue(tasks.add, 2, 2)
    pq.enqueue(tasks.fail, "x")
    waiting = pq.enqueue(tasks.add, 3, 3, queue="later")
    assert _sample(registry, "sqla_pq_queue_jobs", queue="default", status="queued") == 3

    drain(pq, "default")
    assert _sample(registry, "sqla_pq_jobs_total", queue="default", task="tests.tasks.add",
                   outcome="succeeded") == 2
    assert _sample(registry, "sqla_pq_jobs_total", queue="default", task="tests.tasks.fail",
                   outcome="failed") == 1
    assert _sample(registry, "sqla_pq_job_duration_seconds_count", queue="default",
                   task="tests.tasks.add") == 2
    assert _sample(registry, "sqla_pq_job_wait_seconds_count", queue="default") == 3
    assert _sample(registry, "sqla_pq_queue_jobs", queue="default", status="succeeded") == 2
    assert _sample(registry, "sqla_pq_queue_jobs", queue="later", status="queued") == 1
    assert pq.get_job(waiting.id).status == "queued"


def test_prometheus_without_the_client_says_what_to_install(monkeypatch):
    import builtins

    from sqla_pq.errors import ConfigurationError

    real_import = builtins.__import__

    def no_prometheus(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name.startswith("prometheus_client"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with pytest.raises(ConfigurationError, match=r"sqla_pq\[prometheus\]"):
        PrometheusMetrics(CollectorRegistry())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_worker_serves_prometheus_metrics_of_its_jobs(pq, worker_env, engine):
    import signal
    import urllib.request

    from tests.helpers import WorkerProcess

    port = _free_port()
    worker = WorkerProcess(worker_env, ["--isolation", "thread", "--metrics-port", str(port),
                                        "--metrics-queue-counts"])
    try:
        worker.wait_registered(engine)
        pq.enqueue(tasks.add, 1, 2)
        pq.enqueue(tasks.fail, "x")
        pq.enqueue(tasks.add, 1, 1, queue="elsewhere", run_at="1h")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        wanted = 'sqla_pq_jobs_total{outcome="succeeded",queue="default",task="tests.tasks.add"} 1.0'
        def counted() -> str | None:
            text = scrape()
            return text if wanted in text else None

        text = wait_until(counted, 20, message="the worker's metrics")
        assert 'sqla_pq_jobs_total{outcome="failed",queue="default",task="tests.tasks.fail"} 1.0' in text
        assert 'sqla_pq_queue_jobs{queue="elsewhere",status="queued"} 1.0' in text
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
    finally:
        worker.stop()


def test_cli_worker_metrics_on_a_port_in_use_exit_with_what_to_do(cli):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = cli("worker", "--burst", "--isolation", "thread", "--metrics-port", str(port))
    assert code == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in out
    assert "Traceback" not in out


def test_cli_worker_metrics_without_prometheus_client_exit_with_what_to_install(url_str):
    import subprocess
    import sys

    code = ("import sys; sys.modules['prometheus_client'] = None; from sqla_pq.cli import main; "
            f"sys.exit(main(['--url', {url_str!r}, 'worker', '--burst', '--metrics-port', '1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'sqla_pq[prometheus]'" in done.stderr
