"""Fork isolation: a child process per job (python-pq's and RQ's model).

The parent claims and records; the child only runs the job and reports its outcome through a
pipe.  A child that segfaults, calls ``os._exit``, is OOM-killed, or runs past its timeout
(the parent SIGKILLs it) is recorded as a failure with the reason, and the worker lives on.  A
child whose job's lease is not renewed in time (the parent is frozen, or the database out of
reach) is stopped (by the fork server, or by its own watchdog), and the job is given back
rather than failed.

Who forks: the worker's fork server (``forkserver.py``), a small process whose forks cost a
fraction of the worker's, for every job it can run as the worker would; the worker itself for
the rest (atomic tasks, tasks in ``__main__``, hooks that cannot be pickled) and with
``fork_server=False``.  Either way the worker owns the child: its pipe, timeout and outcome.

No database connection crosses the fork: the child disposes the pools it inherited without
closing them (the parent still uses those sockets) and opens its own if the job needs one.  The
child dies with its parent (``PR_SET_PDEATHSIG``), ignores SIGINT (a Ctrl-C in the terminal is
the parent's business), and leaves with ``os._exit`` so no inherited object is cleaned up.
"""

from __future__ import annotations

import _signal
import gc
import logging
import os
import pickle
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from ..logs import flush_logs
from ..serialization import preload
from ..tasks import RegisteredTask, registered
from .call import ClaimedJob, ExecutionContext, Outcome, crash_outcome, execute, short_error
from .forkserver import ForkServer, ForkServerGone, ForkServerRefused, transferable

if TYPE_CHECKING:
    import ctypes

log = logging.getLogger("sqla_pq.worker")

PR_SET_PDEATHSIG = 1
_SIGKILL, _SIGINT, _SIGTERM, _SIGCHLD = (int(s) for s in (signal.SIGKILL, signal.SIGINT,
                                                         signal.SIGTERM, signal.SIGCHLD))
"""Plain ints for the child's first steps: the ``signal`` module's enums (and its wrapper of
``signal.signal``, which looks its result up in an enum) touch enough objects to cost a no-op
job's process ~100 copied pages."""
_libc: ctypes.CDLL | None = None
_prctl: Callable[..., int] | None = None


def _load_libc() -> ctypes.CDLL | None:
    """Load libc once, in the parent: find_library runs ldconfig, far too slow per child."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        import ctypes

        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:  # pragma: no cover - an unusual libc name
            import ctypes.util  # shutil, tempfile, subprocess: not in a fork server otherwise

            name = ctypes.util.find_library("c")
            _libc = ctypes.CDLL(name, use_errno=True) if name else None
        if _libc is not None:
            global _prctl
            _prctl = _libc.prctl  # looked up here: the first lookup builds objects, in each child
    return _libc


def die_with_parent(sig: int = _SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies."""
    if _prctl is None:
        return False
    return bool(_prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0)


def parse_memory(value: int | str | None) -> int | None:
    """``512M``, ``2G``, or bytes."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    text = value.strip().upper().rstrip("B")
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@dataclass
class _Child:
    job: ClaimedJob
    pid: int
    fd: int
    started: float
    deadline: float | None
    timeout: float | None
    lease_fd: int = -1
    """The parent's end of the child's lease pipe: a byte after each good heartbeat."""
    buffer: bytearray = field(default_factory=bytearray)
    killed_for: str | None = None
    eof: bool = False
    server: ForkServer | None = None
    """The fork server that forked this child (None: the worker did)."""


@dataclass
class _Pipes:
    """The descriptors opened to start one job's process (-1: not opened)."""

    read: int = -1
    write: int = -1
    lease_r: int = -1
    lease_w: int = -1

    def close(self) -> None:
        for fd in (self.read, self.write, self.lease_r, self.lease_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.read = self.write = self.lease_r = self.lease_w = -1


START_RETRY = 1.0
"""Seconds a worker that could not start a job's process claims nothing: the job went back to
the queue, and claiming it again at once would fail again, as fast as the database answers."""


class ForkExecutor:
    mode = "fork"

    def __init__(self, concurrency: int, ctx: ExecutionContext,
                 prepare_child: Callable[[], None], memory_limit: int | str | None = None,
                 lease_guard: float | None = None, fork_server: bool = False,
                 prefetch: int = 0, fork_server_imports: Sequence[str] = ()) -> None:
        self.concurrency = concurrency
        self.prefetch = prefetch
        """Jobs held beyond ``concurrency``: the next one forks the moment a child reports,
        instead of after a round trip to the database (still one process per job)."""
        self._held: list[ClaimedJob] = []
        self.lease_guard = lease_guard
        """A child whose parent has not renewed its job's lease for this long kills itself: a
        frozen or partitioned parent cannot keep running a job the rescuer gives to another
        worker.  The lease counts from ``job.extra["lease_ok_at"]`` (monotonic): the claim."""
        self.ctx = ctx
        self.prepare_child = prepare_child
        self.memory_limit = parse_memory(memory_limit)
        self.children: dict[int, _Child] = {}  # by pipe fd
        self._outcomes: list[Outcome] = []
        self.register_fd: Callable[[int], None] = lambda fd: None
        self.unregister_fd: Callable[[int], None] = lambda fd: None
        self._exiting: set[int] = set()
        """Children whose outcome arrived and that are still tearing down: reaped later, off
        the job's critical path (an exit costs milliseconds of kernel time)."""
        _load_libc()
        self._server_ctx = transferable(ctx) if fork_server else None
        """The context the fork server runs jobs with; None: the worker forks every job."""
        self._server_imports = list(fork_server_imports)
        """Modules the server imports at its start, as the worker did (``-I``, ``--app``)."""
        self._server: ForkServer | None = None
        self._server_starts = 0
        self._worker_forks: set[str] = set()
        """Registered tasks the fork server could not find: the worker forks their jobs."""
        self._retry_starts_at = 0.0
        """Until then (monotonic), no free slot is offered: a job's process could not start."""
        if self._server_ctx is not None:
            self._start_server()

    def _start_server(self) -> ForkServer | None:
        if self._server_starts >= MAX_SERVER_STARTS:
            if self._server_ctx is not None:
                log.warning("the fork server failed %d times; the worker forks its jobs itself "
                            "from now on", self._server_starts)
                self._server_ctx = None
            return None
        self._server_starts += 1
        assert self._server_ctx is not None
        try:
            self._server = ForkServer(self._server_ctx, self.lease_guard, self.memory_limit,
                                      self._server_imports)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the worker forks jobs itself
            log.warning("could not start the fork server (%s); the worker forks jobs itself", exc)
            self._server = None
        return self._server

    def _server_for(self, job: ClaimedJob, entry: RegisteredTask | None) -> ForkServer | None:
        """The fork server when it can run ``job`` as the worker would; None otherwise."""
        if (self._server_ctx is None or not job.task or job.task.startswith("__main__")
                or job.task in self._worker_forks):
            return None
        if entry is not None and (entry.options.atomic or entry.func.__module__ == "__main__"):
            return None  # the atomic runner needs the worker's PQ; __main__ is the worker's
        server = self._server
        if server is None or not server.alive:
            if server is not None:
                server.close(kill=True)
            server = self._start_server()
        return server

    def free(self) -> int:
        if self._retry_starts_at and time.monotonic() < self._retry_starts_at:
            return 0  # see START_RETRY
        return self.concurrency + self.prefetch - len(self.children) - len(self._held)

    def busy(self) -> int:
        return len(self.children) + len(self._held)

    def release_waiting(self, job_ids: set[int] | None = None) -> list[ClaimedJob]:
        """Take back held jobs (these, or all) before they start: each is reported
        ``released``, for the worker to give back to the queue as it was."""
        dropped = [j for j in self._held if job_ids is None or j.id in job_ids]
        if dropped:
            self._held = [j for j in self._held if j not in dropped]
            self._outcomes.extend(Outcome(j.id, j.attempts, "released", queue=j.queue)
                                  for j in dropped)
        return dropped

    def running(self) -> list[ClaimedJob]:
        """Every job in hand: forked, or held (its lease matters as much)."""
        return [c.job for c in self.children.values()] + self._held

    def has_outcomes(self) -> bool:
        return bool(self._outcomes)

    def collect(self) -> list[Outcome]:
        """The outcomes so far; then held jobs start in the slots their children freed (here,
        once per turn of the loop, after a stopping worker has taken its held jobs back)."""
        while self._held and len(self.children) < self.concurrency:
            self._start(self._held.pop(0))
        out, self._outcomes = self._outcomes, []
        return out

    def submit(self, job: ClaimedJob) -> None:
        if len(self.children) < self.concurrency:
            self._start(job)
        else:
            self._held.append(job)

    def _start(self, job: ClaimedJob) -> None:
        """Start ``job``'s process.  One that cannot start (out of processes, descriptors or
        memory) is reported at once, its descriptors closed: otherwise the worker would hold
        it, and renew its lease, for as long as it lives."""
        pipes = _Pipes()
        try:
            pid, server = self._spawn(job, pipes)
        except Exception as exc:  # noqa: BLE001 - whatever it was, no process runs the job
            pipes.close()
            self._not_started(job, exc)
            return
        if pid < 0:  # reported already
            return
        os.close(pipes.write)
        if pipes.lease_r >= 0:
            os.close(pipes.lease_r)
            os.set_blocking(pipes.lease_w, False)
        os.set_blocking(pipes.read, False)
        timeout = job.extra.get("timeout")
        now = time.monotonic()
        self.children[pipes.read] = _Child(job, pid, pipes.read, now,
                                           now + timeout if timeout else None, timeout,
                                           lease_fd=pipes.lease_w, server=server)
        self.register_fd(pipes.read)

    def _spawn(self, job: ClaimedJob, pipes: _Pipes) -> tuple[int, ForkServer | None]:
        """Fork ``job``'s process (the fork server, or this process); its pid (-1: the job's
        outcome is reported already) and the server that forked it.  ``pipes`` holds each
        descriptor as it is opened, for the caller to close if this raises."""
        pipes.read, pipes.write = os.pipe()
        # the lease left when the child starts, counted from when the job's lease was set
        lease_ok_at = job.extra.get("lease_ok_at", time.monotonic())
        lease_left = (self.lease_guard - (time.monotonic() - lease_ok_at)
                      if self.lease_guard else None)
        entry = registered(job.task) if job.task else None
        server = self._server_for(job, entry)
        if server is not None:  # a child the server forks has its lease kept by the server
            try:
                return server.start(job, pipes.write, lease_left, _modules_of(job.task),
                                    entry), server
            except ForkServerRefused as exc:
                if exc.transient:
                    log.warning("%s; the worker forks it", exc)
                else:
                    self._worker_forks.add(job.task or "")
            except ForkServerGone as exc:
                if exc.job_sent:  # its process may have run: a crash, not a second start
                    log.warning("%s while starting job %s", exc, job.id)
                    pipes.close()
                    self._outcomes.append(crash_outcome(
                        job, f"ChildDied: {exc} while starting the job's process"))
                    return -1, None
                log.warning("%s; job %s is forked by the worker", exc, job.id)
        preload(job.encoding)  # once here, not in every child
        if self.lease_guard:
            pipes.lease_r, pipes.lease_w = os.pipe()
        return self._fork(job, pipes.read, pipes.write, os.getpid(), pipes.lease_r,
                          pipes.lease_w, lease_left), None

    def _not_started(self, job: ClaimedJob, exc: Exception) -> None:
        """No process could run ``job``.  Short of processes, descriptors or memory (EAGAIN,
        EMFILE, ENOMEM): it goes back to the queue as it was (``released``), and this worker
        claims nothing for ``START_RETRY`` seconds rather than claim it again at once.  Any
        other error counts as a failed attempt, so that a job that can never start ends."""
        if isinstance(exc, (OSError, MemoryError)):
            log.warning("could not start a process for job %s (%s); it goes back to the queue",
                        job.id, exc)
            self._outcomes.append(Outcome(job.id, job.attempts, "released", queue=job.queue))
            self._retry_starts_at = time.monotonic() + START_RETRY
            return
        log.exception("could not start a process for job %s", job.id)
        self._outcomes.append(crash_outcome(
            job, f"ChildDied: the job's process could not start ({short_error(exc)})"))

    def _fork(self, job: ClaimedJob, read_fd: int, write_fd: int, parent: int, lease_r: int,
              lease_w: int, lease_left: float | None) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_fd)
            if lease_w >= 0:
                os.close(lease_w)
            run_child(job, self.ctx, write_fd, parent, lease_r, lease_left, self.lease_guard,
                      self.memory_limit, self.prepare_child)
        try:  # its own process group (set on both sides: no race), so a kill takes grandchildren
            os.setpgid(pid, pid)
        except OSError:
            pass
        return pid

    def renew_leases(self, job_ids: set[int]) -> None:
        """After a good heartbeat: tell the children of these jobs their leases were renewed."""
        if self._server is not None:
            self._server.renew([c.pid for c in self.children.values()
                                if c.server is self._server and c.job.id in job_ids])
        for child in self.children.values():
            if child.lease_fd >= 0 and child.job.id in job_ids:
                try:
                    os.write(child.lease_fd, b"+")
                except (BlockingIOError, BrokenPipeError, OSError):
                    pass

    # -- the parent's side ----------------------------------------------------------------------

    def on_readable(self, fd: int) -> None:
        child = self.children.get(fd)
        if child is None:
            return
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                child.eof = True
                outcome = self._reported(child)
                if outcome is not None and child.killed_for is None:
                    # the job is done; the process may still be exiting: reap it later
                    self._release(child, outcome)
                    if child.server is None:  # a fork server reaps its own children
                        self._exiting.add(child.pid)
                        self.reap_exited()
                else:
                    self._reap(child, block=True)
                return
            child.buffer += chunk

    def _reported(self, child: _Child) -> Outcome | None:
        if not child.buffer:
            return None
        try:
            outcome: Outcome = pickle.loads(bytes(child.buffer))
        except Exception:
            return None
        outcome.queue = child.job.queue
        return outcome

    def _release(self, child: _Child, outcome: Outcome) -> None:
        self.unregister_fd(child.fd)
        os.close(child.fd)
        if child.lease_fd >= 0:
            os.close(child.lease_fd)
            child.lease_fd = -1
        self.children.pop(child.fd, None)
        self._outcomes.append(outcome)
        if child.server is not None:
            child.server.forget(child.pid)  # the server reaps it

    def reap_exited(self) -> None:
        """Collect children that finished exiting (no zombies are left behind)."""
        for pid in list(self._exiting):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._exiting.discard(pid)

    def _drain(self, child: _Child) -> None:
        """Read what an exited child left in its pipe (without waiting for an EOF a
        grandchild holding the pipe open would delay)."""
        while True:
            try:
                chunk = os.read(child.fd, 1 << 16)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            child.buffer += chunk

    def _reap(self, child: _Child, block: bool) -> bool:
        """Record a child that has exited (or, with ``block``, wait for it to)."""
        if child.server is not None:
            found = child.server.status(child.pid, block)
            if found is None and block and child.server.alive:
                # its pipe is closed but it has not exited: it must not outlive its record
                kill_group(child.pid)
                found = child.server.status(child.pid, block)
                if found is None and child.server.alive:
                    found = int(signal.SIGKILL)  # killed above; its report is overdue
            if found is None and child.server.alive:
                return False
            status = found  # None: the server died, and its children with it
        else:
            try:
                pid, status, _usage = os.wait4(child.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid == 0:
                return False
        self._drain(child)
        outcome = self._outcome_of(child, status)
        if outcome.duration is None:  # it died without saying: as long as its process lived
            outcome.duration = max(0.0, time.monotonic() - child.started)
        self._release(child, outcome)
        return True

    def _outcome_of(self, child: _Child, status: int | None) -> Outcome:
        """``status`` None: the fork server died before reporting it (its children die with
        it); an outcome the child wrote in full still counts."""
        job = child.job
        if child.killed_for == "timeout":
            return crash_outcome(job, f"JobTimeout: the job ran past its timeout of {child.timeout:g}s "
                                      "and its process was killed")
        if child.killed_for == "abort":
            return Outcome(job.id, job.attempts, "interrupted", queue=job.queue)
        if (child.killed_for == "fenced" or child.buffer.endswith(LEASE_LOST_MARK)
                or (child.server is not None and child.pid in child.server.fenced)):
            return Outcome(job.id, job.attempts, "fenced", queue=job.queue)
        if (status is None or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)) and child.buffer:
            try:
                outcome: Outcome = pickle.loads(bytes(child.buffer))
                outcome.queue = job.queue
                return outcome
            except Exception:
                pass
        if status is None:
            return crash_outcome(job, "ChildDied: the fork server died, and the job's process "
                                      "with it (killed by SIGKILL)")
        return crash_outcome(job, describe_death(status))

    def check_deadlines(self, now: float) -> float | None:
        upcoming: float | None = None
        if self._retry_starts_at:  # the loop must wake to claim again (see START_RETRY)
            if now < self._retry_starts_at:
                upcoming = self._retry_starts_at
            else:
                self._retry_starts_at = 0.0
        if self._exiting:
            self.reap_exited()
        for child in list(self.children.values()):
            if child.deadline is not None and now >= child.deadline and child.killed_for is None:
                log.warning("job %s ran past its timeout of %gs; killing its process %s",
                            child.job.id, child.timeout, child.pid)
                child.killed_for = "timeout"
                kill_group(child.pid)
            elif child.deadline is not None and child.killed_for is None:
                upcoming = child.deadline if upcoming is None else min(upcoming, child.deadline)
            if not child.eof:
                # a child whose pipe stays open (a grandchild holds it) but which has exited
                self._reap(child, block=False)
        return upcoming

    def interrupt_all(self) -> list[ClaimedJob]:
        """Second signal: kill every child; their jobs are given back.  Held jobs never start
        (released)."""
        self.release_waiting()
        jobs = []
        for child in list(self.children.values()):
            if child.killed_for is None:
                child.killed_for = "abort"
                kill_group(child.pid)
                jobs.append(child.job)
        return jobs

    def fence(self, job_ids: set[int]) -> None:
        """Kill the children of these jobs (their leases were lost): reported ``fenced``.
        Held ones never start."""
        self.release_waiting(job_ids)
        for child in list(self.children.values()):
            if child.killed_for is None and child.job.id in job_ids:
                child.killed_for = "fenced"
                kill_group(child.pid)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.children and time.monotonic() < deadline:
            for child in list(self.children.values()):
                self.on_readable(child.fd)
                if child.fd in self.children:
                    self._reap(child, block=False)
            time.sleep(0.01)
        return not self.children

    def shutdown(self) -> None:
        for child in list(self.children.values()):
            kill_group(child.pid)
            self._reap(child, block=True)
        for pid in list(self._exiting):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._exiting.clear()
        if self._server is not None:
            self._server.close()
            self._server = None


def run_child(job: ClaimedJob, ctx: ExecutionContext, write_fd: int, parent: int, lease_fd: int,
              lease_left: float | None, lease_guard: float | None, memory_limit: int | None,
              prepare: Callable[[], None] | None = None) -> NoReturn:
    """A job's process, just forked (by the worker or by its fork server): run the job, write
    its outcome to ``write_fd``, and leave with ``os._exit``."""
    code = 70
    try:
        gc.disable()  # the child lives for one job; collecting would only copy pages
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        _signal.signal(_SIGINT, _signal.SIG_IGN)  # _signal: see _SIGKILL
        _signal.signal(_SIGTERM, _signal.SIG_DFL)
        _signal.signal(_SIGCHLD, _signal.SIG_DFL)
        die_with_parent()
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(code)
        if lease_fd >= 0 and lease_left is not None and lease_guard:
            _start_lease_watchdog(lease_fd, lease_left, lease_guard, job.id, write_fd)
        random.seed()
        if memory_limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        if prepare is not None:
            prepare()
        outcome = execute(job, ctx)
        data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(data)
        while view:
            written = os.write(write_fd, view)
            view = view[written:]
        code = 0
        os.close(write_fd)  # the parent has the outcome now, before this process exits
    except BaseException:  # noqa: BLE001 - the parent reports a child without an outcome
        try:
            import traceback

            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            flush_logs()  # the CLI's log lines are buffered; os._exit would drop them
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


MAX_SERVER_STARTS = 5
"""A fork server that dies this many times is not started again (the worker forks jobs)."""


def _modules_of(task: str | None) -> list[str]:
    """The modules of ``task``'s path that the worker has imported: the fork server imports
    them too, once, instead of every child importing them."""
    if not task:
        return []
    path = task.replace(":", ".")
    parts = path.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts))) if m in sys.modules]


def kill_group(pid: int) -> None:
    """SIGKILL a job's process group (the job's own subprocesses die with it), or the process
    alone if the group is not there yet."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def lease_lost_message(job_id: int) -> str:
    return (f"sqla_pq: job {job_id}: the worker stopped renewing its lease; stopping the job so "
            "that it cannot run twice\n")


LEASE_LOST_MARK = b"\x00sqla_pq:lease-lost\x00"
"""What a child's lease watchdog writes to the outcome pipe before it kills the child: the
parent then gives the job back (an interruption) instead of failing it as a crash."""


def _start_lease_watchdog(fd: int, first: float, guard: float, job_id: int, out_fd: int) -> None:
    """In the child: a thread that kills this process (and its group) when the parent stops
    renewing the job's lease, before the rescuer can hand the job to another worker."""
    import select
    import threading

    def watch() -> None:
        deadline = time.monotonic() + max(first, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                sys.stderr.write(lease_lost_message(job_id))
                sys.stderr.flush()
                try:
                    os.write(out_fd, LEASE_LOST_MARK)
                except OSError:
                    pass
                os.killpg(0, signal.SIGKILL)
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(fd, 64)
                except OSError:
                    data = b""
                if not data:  # the parent is gone; PR_SET_PDEATHSIG covers that case
                    return
                deadline = time.monotonic() + guard

    threading.Thread(target=watch, name="sqla_pq-lease-watchdog", daemon=True).start()


def describe_death(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hint = {
            signal.SIGKILL: " (out of memory? the kernel's OOM killer sends SIGKILL)",
            signal.SIGSEGV: " (segmentation fault)",
            signal.SIGABRT: " (aborted)",
            signal.SIGBUS: " (bus error)",
        }.get(sig, "")
        return f"ChildDied: the job's process was killed by {name}{hint}"
    if os.WIFEXITED(status):
        return (f"ChildDied: the job's process exited with code {os.WEXITSTATUS(status)} before "
                "reporting a result (os._exit or sys.exit in the task?)")
    return f"ChildDied: the job's process ended with status {status}"
