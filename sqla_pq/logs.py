"""Log output of the ``sqla-pq`` commands: buffered, written once per turn of the worker loop.

A worker logs two lines per job (RQ's ``Got ...`` and ``Job result = ...``).  Written one by one,
each is a system call (two under ``PYTHONUNBUFFERED``) made by the thread that claims jobs, and
every one lets the job threads take the GIL from it: on short jobs that cost more than the jobs
(a drain of no-op jobs ran at 0.6x the speed of the same drain with ``-q``).  So the worker
command's handler keeps lines in memory and a small thread writes them together ``MAX_DELAY``
after the first; a warning or an error is written at once, and the buffer is emptied before
every fork (a child must not inherit and write the lines again) and at exit.  A program that
configures logging itself is not touched: only ``sqla-pq worker`` installs this handler.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TextIO

MAX_DELAY = 0.2
"""Seconds a line waits before it is written, with the lines that came after it."""
MAX_LINES = 512


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that writes its lines in batches (see the module's docstring)."""

    def __init__(self, stream: TextIO | None = None, max_delay: float = MAX_DELAY) -> None:
        super().__init__(stream)
        self.max_delay = max_delay
        self._lines: list[str] = []
        self._due = threading.Event()
        self._writer: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - logging's own policy for a record that cannot format
            self.handleError(record)
            return
        self._add(line, record.levelno)

    def add_lines(self, lines: list[str]) -> None:
        """Lines formatted already (see :func:`direct_info`), under the handler's lock."""
        with self.lock:  # type: ignore[union-attr]
            for line in lines:
                self._add(line + self.terminator, logging.INFO)

    def _add(self, line: str, levelno: int) -> None:
        self._lines.append(line)
        if levelno >= logging.WARNING or len(self._lines) >= MAX_LINES:
            self._write()
        elif len(self._lines) == 1:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_later, daemon=True,
                                                name="sqla_pq-log-writer")
                self._writer.start()
            self._due.set()

    def _write_later(self) -> None:
        while True:
            self._due.wait()
            time.sleep(self.max_delay)
            self._due.clear()
            self.flush()

    def forked(self) -> None:
        """In a fork child: no writer thread, and nothing of the parent's to write."""
        self._lines = []
        self._writer = None
        self._due = threading.Event()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._lines:
                self._write()

    def _write(self) -> None:
        lines, self._lines = self._lines, []
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream must not stop a worker
            pass


class SecondsFormatter(logging.Formatter):
    """A ``Formatter`` whose ``%(asctime)s`` is formatted once per second, not once per line."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is None:  # the default format shows milliseconds: nothing to reuse
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = super().formatTime(record, datefmt)
            self._second = second
        return self._text


def install(level: int, fmt: str, datefmt: str | None = None) -> BufferedStreamHandler:
    """The root logger's handler for a command (what ``logging.basicConfig`` would add).

    The command owns the process's logging, so it also turns off what its format never shows
    (the logging HOWTO's "Optimization" list): each record would look up its caller's frame,
    thread, process and multiprocessing names, a third of the cost of a job's log line."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BufferedStreamHandler()
    handler.setFormatter(SecondsFormatter(fmt, datefmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


_FIELD = re.compile(r"%\((\w+)\)")
_DIRECT_FIELDS = frozenset({"asctime", "levelname", "name", "message"})


class _Moment:
    """What ``Formatter.formatTime`` reads of a record."""

    __slots__ = ("created", "msecs")

    def __init__(self, created: float) -> None:
        self.created = created
        self.msecs = (created - int(created)) * 1000


def direct_info(logger: logging.Logger) -> Callable[[list[str]], None] | None:
    """A writer of ``logger``'s INFO lines straight into the worker command's buffered
    handler, or None: then log as usual.

    A worker logs two lines per job (``Got ...``, ``Job result = ...``).  Through ``logging``
    each builds a LogRecord, walks the logger tree and formats under the handler's lock, which
    cost a no-op job's worker as much CPU as the rest of the job.  The writer formats the same
    text with the handler's own format, for a batch of lines at once.  It is offered only when
    nothing else could see those records: INFO enabled, no filter on the way, the buffered
    handler the only one, a format of the time, level, name and message only, and neither the
    record factory nor ``Logger.callHandlers`` replaced (Sentry's logging integration patches
    the latter)."""
    if (not logger.isEnabledFor(logging.INFO)
            or getattr(logging.Logger.callHandlers, "__module__", None) != "logging"
            or logging.getLogRecordFactory() is not logging.LogRecord):
        return None
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters or current.disabled:
            return None
        handlers.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent  # type: ignore[assignment]
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    formatter = handler.formatter
    if (type(handler) is not BufferedStreamHandler or handler.filters
            or handler.level > logging.INFO or type(formatter) is not SecondsFormatter
            or type(formatter._style) is not logging.PercentStyle
            or getattr(formatter._style, "_defaults", None)
            or not set(_FIELD.findall(formatter._fmt or "")) <= _DIRECT_FIELDS):
        return None
    fmt, datefmt, name = formatter._fmt, formatter.datefmt, logger.name
    level = logging.getLevelName(logging.INFO)

    def write(messages: list[str]) -> None:
        with handler.lock:  # type: ignore[union-attr] # the formatter's time cache, as emit
            created = time.time()
            asctime = formatter.formatTime(_Moment(created), datefmt)  # type: ignore[arg-type]
            values = {"asctime": asctime, "levelname": level, "name": name, "message": ""}
            lines = []
            for message in messages:
                values["message"] = message
                lines.append(fmt % values)
            handler.add_lines(lines)

    return write


def _buffered() -> list[BufferedStreamHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, BufferedStreamHandler)]


def flush_logs() -> None:
    """Write what the root logger's buffered handlers hold (before a fork, and where a process
    ends with ``os._exit``)."""
    for handler in _buffered():
        handler.flush()


def _forked() -> None:
    for handler in _buffered():
        handler.forked()


os.register_at_fork(before=flush_logs, after_in_child=_forked)
