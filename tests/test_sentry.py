"""Sentry, when SENTRY_DSN is set and the SDK is installed: a worker reports failed jobs
(raised in a fork child, and crashes the worker itself sees) to the DSN, with the job's queue
and id.  A local HTTP server stands in for Sentry."""

from __future__ import annotations

import gzip
import http.server
import json
import threading
import zlib
from collections.abc import Iterator

import pytest

from tests import tasks
from tests.helpers import WorkerProcess

sentry_sdk = pytest.importorskip("sentry_sdk")


class _Collector(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            data = gzip.decompress(data)
        elif encoding == "deflate":
            data = zlib.decompress(data)
        elif encoding == "br":
            import brotli  # type: ignore[import-not-found]

            data = brotli.decompress(data)
        self.bodies.append(data)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def sentry_events() -> Iterator[tuple[str, list[dict]]]:
    """A DSN, and the events posted to it (each envelope's event payloads: exceptions, and
    log lines that Sentry's logging integration turned into events)."""
    _Collector.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    events: list[dict] = []

    def parsed() -> list[dict]:
        events.clear()
        for body in _Collector.bodies:
            for line in body.splitlines():
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if isinstance(item, dict) and "platform" in item:  # an event's payload
                    events.append(item)
        return events

    try:
        yield f"http://public@127.0.0.1:{server.server_address[1]}/1", parsed
    finally:
        server.shutdown()
        server.server_close()


def _exception_types(event: dict) -> list[str]:
    return [v.get("type") for v in event["exception"]["values"]]


def test_a_fork_worker_reports_a_failed_job_and_a_crash_to_sentry(pq, worker_env, engine,
                                                                  sentry_events):
    dsn, events = sentry_events
    failing = pq.enqueue(tasks.fail, "sentry-boom", queue="reports")
    crashed = pq.enqueue(tasks.hard_exit, 3, queue="reports")
    env = {k: v for k, v in worker_env.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env.update(SENTRY_DSN=dsn, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    worker = WorkerProcess(env, ["reports", "--burst"])
    try:
        assert worker.wait(60) == 0, worker.output()
    finally:
        worker.stop()
    assert pq.get_job(failing.id).status == "failed" and pq.get_job(crashed.id).status == "failed"

    sent = events()
    assert len(sent) == 2, "one event per failed job (not also one for its ERROR log line)"
    by_job = {e.get("extra", {}).get("job_id"): e for e in sent}
    raised = by_job.get(failing.id)
    assert raised is not None, f"no event for the failed job: {by_job.keys()}"
    assert _exception_types(raised) == ["ValueError"] and "sentry-boom" in json.dumps(raised)
    assert raised["tags"]["sqla_pq.queue"] == "reports"
    assert raised["extra"]["task"] == "tests.tasks.fail"
    crash = by_job.get(crashed.id)
    assert crash is not None, "the worker reports a child that died without a word, too"
    assert "ChildDied" in _exception_types(crash)

