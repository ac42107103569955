"""Plumbing shared by every adapter: sizes, worker processes, polling, statistics.

Standard library only: the runner imports it from the repository's environment and the peer
adapters from ``benchmarks/.venv-peers``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository: on PYTHONPATH of every worker, so that ``benchmarks.tasks`` imports."""

RESULT_PREFIX = "@@RESULT "
"""How a peer subprocess marks its one JSON result line on stdout."""


class BenchError(Exception):
    """A scenario could not be measured (reported in its cell; the run goes on).  ``detail``
    (a worker's last output...) goes to the report's notes, not into the table."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclasses.dataclass
class Sizes:
    """Sizes and settings of one run; the defaults are BENCH.md's."""

    enqueue: int = 10_000
    """E1 and E2: jobs enqueued."""
    drain: int = 10_000
    """P1, P2, PF: jobs drained."""
    latency_jobs: int = 200
    latency_gap: float = 0.020
    sleep_jobs: int = 200
    sleep_seconds: float = 0.050
    sleep_concurrency: int = 4
    memory_jobs: int = 100_000
    concurrency: int = 16
    """Threads of an in-process sqla_pq worker for P1/P2/L/M (and procrastinate's -c)."""
    prefetch: int = 48
    """Jobs a sqla_pq thread worker holds beyond its threads (``--prefetch``), for P1/P2/L/M:
    claims of up to 64 jobs, as PgQueuer's drain takes batches with no cap on concurrency."""
    sleep_prefetch: int = 4
    """``--prefetch`` of the S worker (-c 4): a slot that frees starts the next job at once."""
    fork_concurrency: int = 1
    """Fork children at a time per sqla_pq fork worker (RQ's fork worker runs one)."""
    fork_prefetch: int = 1
    """Jobs a sqla_pq fork worker holds beyond its child (``--prefetch``): still one job, one
    process at a time, but the next one forks when a child reports, not after a round trip."""
    q_seconds_hint: float = 10.0
    """Q is sized (in rows) to last about this long at BENCH.md's orientation speed."""
    q_clients: int = 2
    q_claim: int = 100
    poll_interval: float = 0.050
    quiet_workers: bool = False
    """Run every worker with its per-job log lines turned off."""

    @classmethod
    def quick(cls) -> Sizes:
        return cls(enqueue=2_000, drain=2_000, latency_jobs=100, memory_jobs=20_000,
                   q_seconds_hint=4.0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Sizes:
        return cls(**json.loads(text))

    def drain_timeout(self, jobs: int) -> float:
        """Give up on a drain after this long (RQ's fork worker does ~100 jobs/s)."""
        return 120.0 + jobs / 20.0


# -- worker processes ----------------------------------------------------------------------


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class WorkerProcess:
    """A worker command in its own process group, its output in a temporary file."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str]) -> None:
        self.cmd = list(cmd)
        self.log = tempfile.NamedTemporaryFile(prefix="bench_worker_", suffix=".log", delete=False)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=env, cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, tail: int = 2000) -> str:
        try:
            text = Path(self.log.name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-tail:]

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a warm shutdown for every library here), then SIGKILL the group."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        return self.proc.returncode

    def finish(self, timeout: float = 15.0) -> int | None:
        """Wait for a burst worker to exit by itself; stop it when it does not."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.stop()

    def cleanup(self) -> None:
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def stop_all(procs: Sequence[WorkerProcess], burst: bool = False) -> None:
    for p in procs:
        if burst:
            p.finish()
        else:
            p.stop()
    for p in procs:
        p.cleanup()


def wait_drained(pending: Callable[[], int], procs: Sequence[WorkerProcess], timeout: float,
                 interval: float = 0.050, target: int = 0) -> float:
    """Poll ``pending()`` every ``interval`` until it is at most ``target``; return the
    ``time.perf_counter()`` of the poll that saw it.  Fails when the workers all exited with
    work left, or after ``timeout``."""
    deadline = time.perf_counter() + timeout
    while True:
        left = pending()
        now = time.perf_counter()
        if left <= target:
            return now
        if procs and all(not p.alive() for p in procs):
            # A burst worker may exit between our two looks: look once more.
            left = pending()
            if left <= target:
                return time.perf_counter()
            out = procs[0].output()
            raise BenchError(f"the workers exited with {left} job(s) left ({_last_line(out)})",
                             out)
        if now > deadline:
            out = procs[0].output() if procs else ""
            raise BenchError(f"not drained after {timeout:.0f}s ({left} job(s) left)", out)
        time.sleep(interval)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:160] if lines else "no output"


# -- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def read_ledger(path: str) -> list[tuple[float, float]]:
    """The (sent, started) pairs that ``benchmarks.tasks.stamp`` appended."""
    pairs = []
    with open(path, encoding="ascii") as f:
        for line in f:
            sent, started = line.split()
            pairs.append((float(sent), float(started)))
    return pairs


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def tool(name: str) -> str:
    """A console script of the running interpreter's environment (``pgq``, ``rq``...)."""
    import sys

    path = Path(sys.executable).parent / name
    if not path.exists():
        raise BenchError(f"{name} is not installed next to {sys.executable}")
    return str(path)
