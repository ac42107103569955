"""The job shapes every library runs: a no-op, a 50 ms sleep, and a start-time stamp.

Plain functions, standard library only: sqla_pq and RQ run them as they are, procrastinate
registers them as its tasks, PgQueuer's async entrypoints call them.  Workers import this
module as ``benchmarks.tasks`` (the repository root is on their PYTHONPATH).
"""

from __future__ import annotations

import time


def noop() -> None:
    return None


def sleep(seconds: float = 0.05) -> None:
    time.sleep(seconds)


def stamp(ledger: str, sent: float) -> None:
    """Record when the job started: ``sent`` (the enqueuer's clock just before the enqueue
    call) and now, one line appended to ``ledger`` (O_APPEND: lines from concurrent jobs and
    processes do not interleave)."""
    started = time.time()
    with open(ledger, "a", encoding="ascii") as f:
        f.write(f"{sent!r} {started!r}\n")
