"""The worker command's log handler: lines are written in batches, never lost or doubled."""

from __future__ import annotations

import io
import logging
import os

import pytest

from sqla_pq.logs import BufferedStreamHandler, SecondsFormatter, flush_logs
from tests.helpers import wait_until


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    log = logging.getLogger(name)
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    return log


def test_info_lines_are_written_together_shortly_after_and_warnings_at_once():
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, max_delay=0.2)
    log = _logger(handler, "test_logs.batches")
    log.info("one")
    log.info("two")
    assert stream.getvalue() == "", "an INFO line was written on its own"
    wait_until(lambda: stream.getvalue() == "one\ntwo\n", 5, message="the batch to be written")
    log.info("three")
    log.warning("careful")
    assert stream.getvalue() == "one\ntwo\nthree\ncareful\n", "a warning waited in the buffer"


def test_a_fork_child_does_not_write_its_parents_lines_again(tmp_path):
    path = tmp_path / "worker.log"
    with open(path, "a", encoding="utf-8") as stream:
        handler = BufferedStreamHandler(stream, max_delay=60.0)
        root = logging.getLogger()
        root.addHandler(handler)  # flush_logs (the fork hook) looks at the root's handlers
        try:
            _logger(handler, "test_logs.fork").info("before the fork")
            pid = os.fork()
            if pid == 0:  # the child logs a line of its own and leaves as a fork child does
                _logger(handler, "test_logs.fork").info("in the child")
                flush_logs()
                os._exit(0)
            os.waitpid(pid, 0)
            handler.flush()
        finally:
            root.removeHandler(handler)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert sorted(lines) == ["before the fork", "in the child"], lines


def test_the_worker_command_logs_every_job_through_the_buffer(pq, url_str):
    import subprocess
    import sys

    from tests import tasks

    jobs = [pq.enqueue(tasks.add, i, 1) for i in range(20)]
    out = subprocess.run(
        [sys.executable, "-m", "sqla_pq", "worker", "default", "--url", url_str, "--burst",
         "--isolation", "thread", "-c", "4"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Got add(") == 20 and out.stderr.count("Job result = ") == 20
    assert "stopped after 20 jobs" in out.stderr.splitlines()[-1]
    assert all(pq.get_job(j.id).status == "succeeded" for j in jobs)


def test_the_time_stamp_reused_within_a_second_is_the_one_logging_would_write():
    fmt, datefmt = "%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"
    plain, cached = logging.Formatter(fmt, datefmt), SecondsFormatter(fmt, datefmt)
    for created in (1000.1, 1000.9, 1001.0, 1001.5, 999.2, 86400.3):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m %s", ("a",), None)
        record.created = created
        assert cached.format(record) == plain.format(record)
    no_datefmt = SecondsFormatter(fmt)
    first = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    first.created, first.msecs = 1000.1, 100.0
    later = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    later.created, later.msecs = 1000.7, 700.0
    assert no_datefmt.format(first) != no_datefmt.format(later), "milliseconds were reused"


# -- the worker's direct lines -------------------------------------------------------------------

FMT, YEAR = "%(asctime)s %(levelname)-7s %(name)s %(message)s", "%Y"  # a stamp that does not tick


def _buffered_logger(name: str, fmt: str = FMT) -> tuple[logging.Logger, BufferedStreamHandler, io.StringIO]:
    stream = io.StringIO()
    handler = BufferedStreamHandler(stream, max_delay=60.0)
    handler.setFormatter(SecondsFormatter(fmt, YEAR))
    return _logger(handler, name), handler, stream


def test_direct_lines_are_the_text_logging_writes_in_the_same_place():
    from sqla_pq.logs import direct_info

    log, handler, stream = _buffered_logger("test_logs.direct")
    write = direct_info(log)
    assert write is not None
    log.info("Got %s from %s", "add(1, 2)", "default")
    write(["Got add(1, 2) from default", "Job result = 3"])
    log.info("Job result = %s", 3)
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert lines[0] == lines[1] and lines[2] == lines[3], lines
    assert lines[0].endswith("INFO    test_logs.direct Got add(1, 2) from default")


@pytest.mark.parametrize("change", [
    "a filter", "another handler", "warnings only", "a thread name in the format",
    "a patched callHandlers", "a plain handler", "another record factory",
])
def test_direct_lines_are_refused_when_anything_else_would_see_the_records(change, monkeypatch):
    from sqla_pq.logs import direct_info

    fmt = "%(threadName)s %(message)s" if change == "a thread name in the format" else FMT
    log, handler, _ = _buffered_logger("test_logs.refused." + change.replace(" ", "_"), fmt)
    if change == "a filter":
        log.addFilter(lambda record: True)
    elif change == "another handler":
        log.addHandler(logging.NullHandler())
    elif change == "warnings only":
        log.setLevel(logging.WARNING)
    elif change == "a patched callHandlers":  # what sentry_sdk's logging integration does
        real = logging.Logger.callHandlers
        monkeypatch.setattr(logging.Logger, "callHandlers",
                            lambda self, record: real(self, record))
    elif change == "a plain handler":
        log.handlers[:] = [logging.StreamHandler(io.StringIO())]
    elif change == "another record factory":
        factory = logging.getLogRecordFactory()
        monkeypatch.setattr(logging, "_logRecordFactory", lambda *a, **k: factory(*a, **k))
    assert direct_info(log) is None


def test_outcome_lines_keep_their_order_around_a_failure(monkeypatch):
    from sqla_pq import worker
    from sqla_pq.execution.call import Outcome

    log, handler, stream = _buffered_logger("test_logs.outcomes", "%(levelname)s %(message)s")
    monkeypatch.setattr(worker, "job_log", log)
    worker._log_outcomes([
        Outcome(1, 1, "succeeded", log_result="1"),
        Outcome(2, 1, "failed", error="ValueError: no"),
        Outcome(3, 1, "succeeded", log_result=None),
        Outcome(4, 1, "cancelled", error="by hand"),
    ])
    handler.flush()
    assert stream.getvalue().splitlines() == [
        "INFO Job result = 1", "ERROR Job 2 failed: ValueError: no",
        "INFO Job 3 ended normally without result", "INFO Job 4 cancelled: by hand",
    ]
