"""The fork server: a small process that forks a fork worker's job processes for it.

Why: a fork, and the copy-on-write faults and teardown that follow it, cost in proportion to
the forking process's memory.  The worker holds SQLAlchemy, psycopg2, its pools and threads
(~45 MB); the server is a fresh interpreter holding only what running a job needs (what the
worker command imported, the tasks' modules; ~22 MB), so each job's process is several times
cheaper.

The worker still owns each job: it creates the job's outcome pipe, hands it to the server with
the claimed job (``SCM_RIGHTS`` over a Unix socket), and gets the child's pid back; from then on
it reads the outcome and kills the child exactly as it does for a child it forked itself.  The
server reaps the children and reports their exit statuses.  The server dies with the worker (``PR_SET_PDEATHSIG``, and at the socket's end),
and its children die with it.

The server also keeps its children's leases: the worker tells it after each good heartbeat,
and a child whose lease runs out is killed and reported ``fenced`` (the job is given back, as
another worker may have it now).  The server is a process of its own, in a process group of its
own: a frozen worker (SIGSTOP, Ctrl-Z) does not freeze it, so no child needs a watchdog thread.

Jobs the server cannot run the way the worker would are forked by the worker itself: atomic
tasks (their transaction needs the worker's ``PQ``), tasks defined in ``__main__``, and every
job when the hooks cannot be pickled (a lambda, a closure, Sentry, a Flask or Pyramid wrapper).
"""

from __future__ import annotations

import array
import gc
import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ..serialization import DILL, preload
from ..tasks import RegisteredTask
from .call import ClaimedJob, ExecutionContext

log = logging.getLogger("sqla_pq.worker")

_HEADER = struct.Struct("!I")
START_TIMEOUT = 30.0
"""Seconds the worker waits for the server to fork a job's process: it starts with a fresh
interpreter (~0.1 s) and then only forks, so a longer wait means it is stuck."""


class ForkServerGone(Exception):
    """The fork server died or stopped answering: the worker forks its jobs itself.

    ``job_sent``: the server had the job, so its process may have started (and been killed
    with the server): the worker must not start it again."""

    def __init__(self, message: str, job_sent: bool) -> None:
        super().__init__(message)
        self.job_sent = job_sent


class ForkServerRefused(Exception):
    """The fork server did not fork the job (its task is unknown there, or the fork failed):
    the worker forks it.  ``transient``: only this job, not every job of its task."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


REFUSED_UNKNOWN_TASK = -1
REFUSED_ERROR = -2


def _send(sock: socket.socket, message: Any, fds: list[int] | None = None) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = _HEADER.pack(len(body)) + body
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        try:
            chunk = sock.recv(min(left, 1 << 20))
        except ConnectionError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_with_fds(sock: socket.socket) -> tuple[Any, list[int]] | None:
    """One message and the descriptors sent with it; None at the end of the stream."""
    header, fds = b"", []
    while len(header) < _HEADER.size:
        try:
            data, got, _flags, _addr = socket.recv_fds(sock, _HEADER.size - len(header), 4)
        except ConnectionError:  # the worker is gone
            data, got = b"", []
        if not data:
            for fd in got + fds:
                os.close(fd)
            return None
        header += data
        fds.extend(got)
    body = _recv_exactly(sock, _HEADER.unpack(header)[0])
    if body is None:
        for fd in fds:
            os.close(fd)
        return None
    return pickle.loads(body), fds


# -- the worker's side ------------------------------------------------------------------------------


def transferable(ctx: ExecutionContext) -> bytes | None:
    """The execution context as the server can rebuild it (the atomic runner stays behind:
    atomic jobs are forked by the worker), or None when the hooks cannot be pickled."""
    if ctx.call_wrapper is not None:
        return None
    try:
        data = pickle.dumps(replace(ctx, atomic_runner=None), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)  # a hook pickled by reference must also be found by that reference
    except Exception as exc:  # noqa: BLE001 - any failure means: fork in the worker
        log.debug("jobs are forked by the worker itself (the hooks cannot be pickled: %s)", exc)
        return None
    return data


def _log_config() -> tuple[int, str | None, str | None, str]:
    """The root logger's level and its first handler's format (the worker command's own)."""
    root = logging.getLogger()
    for handler in root.handlers:
        fmt = handler.formatter
        if fmt is not None:
            style = next((k for k, (cls, _) in logging._STYLES.items()
                          if type(fmt._style) is cls), "%")
            return root.level, fmt._fmt, fmt.datefmt, style
    return root.level, None, None, "%"


def _registration(entry: RegisteredTask) -> tuple[str, str | None, bytes | None]:
    """How the server registers a task as the worker did: by importing the function's module
    (``@pq.task`` registers on import), else from the pickled entry (``define_job``)."""
    try:
        data: bytes | None = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - a decorated function pickles by a name that is its wrapper
        data = None
    return entry.name, getattr(entry.func, "__module__", None), data


class ForkServer:
    """The worker's handle on its fork server process."""

    def __init__(self, ctx_data: bytes, lease_guard: float | None, memory_limit: int | None,
                 imports: Sequence[str] = ()) -> None:
        import subprocess

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (f"import sys; sys.path.insert(0, {package_root!r}); "
                f"from sqla_pq.execution.forkserver import main; main({theirs.fileno()})")
        sys.stdout.flush()
        sys.stderr.flush()
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()])
        theirs.close()
        self.sock = ours
        self.pid = self.process.pid
        self._buffer = bytearray()
        self._started: dict[int, int] = {}  # job id -> pid (-1: refused)
        self._registered: set[str] = set()
        """Registered tasks whose registration the server has been sent."""
        self.statuses: dict[int, int] = {}
        """Exit statuses of the children the worker still waits for (``wanted``)."""
        self.wanted: set[int] = set()
        self.fenced: set[int] = set()
        """Children the server killed because their lease ran out."""
        self.alive = True
        self._poller = select.poll()  # not select(): the worker's descriptors may pass 1024
        self._poller.register(ours, select.POLLIN)
        self.ready = False
        """The server has imported what it was told to and runs jobs: before that, a server
        that dies had forked nothing."""
        from ..tasks import _REGISTRY

        registrations = [_registration(e) for e in list(_REGISTRY.values())]
        self._registered.update(r[0] for r in registrations)
        try:
            _send(ours, ("init", list(sys.path), list(imports), registrations, ctx_data,
                         _log_config(), lease_guard, memory_limit, os.getpid()))
        except BaseException:
            self.close(kill=True)
            raise

    def start(self, job: ClaimedJob, out_fd: int, lease_left: float | None, modules: list[str],
              entry: RegisteredTask | None) -> int:
        """Have the server fork ``job``'s process (its outcome goes to ``out_fd``); its pid."""
        registration = None
        if entry is not None and entry.name not in self._registered:
            registration = _registration(entry)
            self._registered.add(entry.name)
        try:
            _send(self.sock, ("job", job, lease_left, modules, registration), [out_fd])
        except OSError as exc:
            self._gone()
            raise ForkServerGone(f"the fork server is gone ({exc})", job_sent=False) from exc
        was_ready = self.ready
        deadline = time.monotonic() + START_TIMEOUT
        while job.id not in self._started:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close(kill=True)
                raise ForkServerGone(f"the fork server did not start job {job.id} in "
                                     f"{START_TIMEOUT:g}s", job_sent=True)
            self.pump(left)
            if not self.alive and job.id not in self._started:
                # a server that died while starting up had forked nothing
                raise ForkServerGone("the fork server died",
                                     job_sent=was_ready or self.ready)
        pid = self._started.pop(job.id)
        if pid == REFUSED_UNKNOWN_TASK:
            raise ForkServerRefused(f"the fork server cannot find task {job.task!r}")
        if pid < 0:
            raise ForkServerRefused(f"the fork server could not fork job {job.id}", transient=True)
        return pid

    def renew(self, pids: list[int]) -> None:
        """The leases of these children's jobs were renewed (a good heartbeat)."""
        if self.alive and pids:
            try:
                _send(self.sock, ("renew", pids))
            except OSError:
                self._gone()

    def pump(self, timeout: float = 0.0) -> None:
        """Read what the server has said, waiting at most ``timeout`` for the first bytes."""
        if not self.alive:
            return
        poller = self._poller
        ready = poller.poll(max(timeout, 0.0) * 1000)
        while ready:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._gone()
                break
            self._buffer += chunk
            ready = poller.poll(0)
        self._parse()

    def _parse(self) -> None:
        buf = self._buffer
        while len(buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(buf)
            if len(buf) < _HEADER.size + n:
                break
            kind, a, b = pickle.loads(bytes(buf[_HEADER.size:_HEADER.size + n]))
            del buf[:_HEADER.size + n]
            if kind == "started":
                self._started[a] = b
                if b >= 0:  # its exit may follow in this very read
                    self.wanted.add(b)
            elif kind == "ready":
                self.ready = True
            elif kind == "exited" and a in self.wanted:
                self.statuses[a] = b
            elif kind == "fenced" and a in self.wanted:
                self.fenced.add(a)

    def status(self, pid: int, block: bool, timeout: float = 10.0) -> int | None:
        """The exit status of child ``pid``; None while unknown (not exited yet, or never to
        be known: see ``alive``)."""
        self.pump(0)
        deadline = time.monotonic() + timeout
        while pid not in self.statuses and self.alive and block:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.pump(left)
        if pid in self.statuses:
            self.wanted.discard(pid)
            return self.statuses.pop(pid)
        return None

    def forget(self, pid: int) -> None:
        """The worker has what it needs from child ``pid``: no status to keep for it."""
        self.wanted.discard(pid)
        self.statuses.pop(pid, None)
        self.fenced.discard(pid)

    def _gone(self) -> None:
        if self.alive:
            self.alive = False
            log.warning("the fork server (pid %s) is gone; the worker forks jobs itself until "
                        "it starts a new one", self.pid)

    def close(self, kill: bool = False, timeout: float = 5.0) -> None:
        """Stop the server: the end of its socket tells it to exit."""
        self.alive = False
        try:
            self.sock.close()
        except OSError:
            pass
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: no longer polite
            self.process.kill()
            self.process.wait()


# -- the server's side -------------------------------------------------------------------------


def main(fd: int) -> None:
    """The server process: set up as the worker says, then fork a child per job it sends."""
    from .fork import _load_libc, die_with_parent

    gc.disable()  # until set up: see the end of this function
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and stop signals are the worker's
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _load_libc()
    sock = socket.socket(fileno=fd)
    received = _recv_with_fds(sock)
    if received is None:
        os._exit(0)
    (_kind, sys_path, imports, registrations, ctx_data, log_config, lease_guard, memory_limit,
     worker_pid), _ = received
    die_with_parent()
    if os.getppid() != worker_pid:
        os._exit(0)
    try:
        os.setpgid(0, 0)  # out of the terminal's reach: Ctrl-Z stops the worker, not its leases
    except OSError:
        pass
    sys.path[:] = sys_path
    raw_fork = _raw_fork()  # before any module of the application is imported here
    for name in imports:  # what the worker imported at start (-I, --app): their side effects
        _import_quietly(name)
    unknown = {r[0] for r in registrations if not _register(*r)}
    _configure_logging(*log_config)
    ctx: ExecutionContext = pickle.loads(ctx_data)  # a failure ends this process: the worker
    _send(sock, ("ready", 0, 0))                     # then forks its jobs itself
    _warm_up()
    # What the set-up built lives as long as this process: out of the collector's reach, so
    # that a collection here neither rescans it nor writes to the pages its children share.
    gc.freeze()
    gc.enable()
    _Server(sock, ctx, raw_fork, unknown, lease_guard, memory_limit).serve()


WARM_UP_RUNS = 200
"""No-op jobs the server runs itself before it forks any child (see :func:`_warm_up`)."""

warmed_up = 0
"""The warm-up's runs in this process (``WARM_UP_RUNS`` once it is done; its children see it)."""


def _warm_up_task(*args: Any, **kwargs: Any) -> Any:
    """The server's own no-op task (its warm-up runs it; no job names it)."""
    return kwargs or None


def _warm_up() -> int:
    """Run here, on a no-op task of this module, the code every child runs: load the call,
    call it, describe the outcome and pickle it.  Python specializes a function's bytecode in
    place during its first runs, and fills caches on first use; done in each child, those
    writes copy pages and cost more than the rest of a no-op job.  Done here first, the
    children share the result (on the benchmark machine: a no-op child's CPU time ~1.2 ms
    before, ~0.9 ms after).  Bare context: no hook and no wrapper of the application runs.
    Returns the runs done: a failure stops it, and the children run as before."""
    global warmed_up
    from .call import execute

    ctx = ExecutionContext()
    task = f"{__name__}.{_warm_up_task.__name__}"
    try:
        for i in range(WARM_UP_RUNS):
            args, kwargs = ([], {}) if i % 2 else ([i], {"i": i})
            job = ClaimedJob(
                id=-1 - i, queue="", task=task, encoding="json", args=args, kwargs=kwargs,
                payload=None, signature=None, attempts=1, failures=0, max_retries=0,
                retry_policy=None, timeout=None, result_ttl=0, interruptions=0,
                max_interruptions=1, serial=False, workspace=None, step=0, flow_id=None,
                schedule_id=None, client_id=None, priority=0, expected_at=None, run_at=None,
                enqueued_at=None, meta=None, has_dependants=False, started_at=None,
            )
            outcome = execute(job, ctx)
            if outcome.kind != "succeeded":
                raise RuntimeError(f"its no-op job {outcome.kind}: {outcome.error}")
            pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
            warmed_up += 1
    except Exception as exc:  # noqa: BLE001 - only a speed-up: the children run as before
        sys.stderr.write(f"sqla_pq fork server: warm-up stopped: {exc!r}\n")
    return warmed_up


class _Server:
    """The server process once set up: its socket to the worker, what a child needs, and the
    leases of the children it keeps."""

    def __init__(self, sock: socket.socket, ctx: ExecutionContext,
                 raw_fork: Callable[[], int] | None, unknown: set[str],
                 lease_guard: float | None, memory_limit: int | None) -> None:
        self.sock = sock
        self.ctx = ctx
        self.raw_fork = raw_fork
        self.unknown = unknown
        """Tasks the worker has registered and this process could not: the worker forks them."""
        self.lease_guard = lease_guard
        self.memory_limit = memory_limit
        self.leases: dict[int, tuple[float, int]] = {}  # pid -> (lease deadline, job id)
        self.me = os.getpid()
        self.wake_r, self.wake_w = os.pipe()  # SIGCHLD wakes the select()

    def serve(self) -> None:
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        while True:
            timeout = None
            if self.leases:
                timeout = max(0.0, min(d for d, _ in self.leases.values()) - time.monotonic())
            ready, _, _ = select.select([self.sock, self.wake_r], [], [], timeout)
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                self.report_exits()
            if self.sock in ready:
                received = _recv_with_fds(self.sock)
                if received is None:  # the worker has closed its end: it is stopping
                    os._exit(0)
                self.handle(*received)
            if self.leases:  # after reading: renewals that were waiting count
                self.fence_expired()

    def handle(self, message: tuple[Any, ...], fds: list[int]) -> None:
        if message[0] == "renew":
            until = time.monotonic() + (self.lease_guard or 0.0)
            for pid in message[1]:
                if pid in self.leases:
                    self.leases[pid] = (until, self.leases[pid][1])
            return
        _kind, job, lease_left, job_modules, registration = message
        try:
            pid = self.fork(job, fds[0], job_modules, registration)
        except Exception as exc:  # noqa: BLE001 - the worker forks this job instead
            sys.stderr.write(f"sqla_pq fork server: job {job.id}: {exc!r}\n")
            pid = REFUSED_ERROR
        finally:
            for f in fds:
                os.close(f)
        if pid >= 0 and lease_left is not None and self.lease_guard:
            self.leases[pid] = (time.monotonic() + lease_left, job.id)
        _send(self.sock, ("started", job.id, pid))

    def fork(self, job: ClaimedJob, out_fd: int, job_modules: list[str],
             registration: tuple[str, str | None, bytes | None] | None) -> int:
        """Fork ``job``'s process (its outcome goes to ``out_fd``); its pid, or
        REFUSED_UNKNOWN_TASK."""
        from .fork import run_child  # fork.py imports this module

        if registration is None and job.task in self.unknown:
            return REFUSED_UNKNOWN_TASK
        for name in job_modules:
            if name not in sys.modules:
                _import_quietly(name)
        if registration is not None and not _register(*registration):
            self.unknown.add(registration[0])
            return REFUSED_UNKNOWN_TASK
        if registration is None and job_modules and job.encoding != DILL:
            _resolve_quietly(job.task, self.ctx)  # once here (cached), not in every child
        preload(job.encoding)
        sys.stdout.flush()  # what an import printed must not be written again by every child
        sys.stderr.flush()
        raw = self.raw_fork
        pid = raw() if raw is not None and _single_threaded() else os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (self.sock.fileno(), self.wake_r, self.wake_w):  # not the job's
                os.close(fd)
            # no watchdog thread in the child: this process keeps its lease
            run_child(job, self.ctx, out_fd, self.me, -1, None, None, self.memory_limit)
        try:
            os.setpgid(pid, pid)  # before the worker can killpg it
        except OSError:
            pass
        return pid

    def fence_expired(self) -> None:
        """Kill the children whose lease the worker stopped renewing (frozen, or cut off from
        the database): the rescuer may give their jobs to another worker, which must not run
        them alongside."""
        from .fork import kill_group, lease_lost_message

        now = time.monotonic()
        for pid, (deadline, job_id) in list(self.leases.items()):
            if deadline > now:
                continue
            del self.leases[pid]
            sys.stderr.write(lease_lost_message(job_id))
            sys.stderr.flush()
            _send(self.sock, ("fenced", pid, job_id))  # before the kill: the worker reads it first
            kill_group(pid)

    def report_exits(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.leases.pop(pid, None)
            _send(self.sock, ("exited", pid, status))


def _configure_logging(level: int, fmt: str | None, datefmt: str | None, style: str) -> None:
    """Log like the worker command: its level and format, unless an imported module of the
    application configured logging itself."""
    root = logging.getLogger()
    try:
        if fmt is not None and not root.handlers:
            logging.basicConfig(level=level, format=fmt, datefmt=datefmt, style=style)  # type: ignore[arg-type]
        else:
            root.setLevel(level)
    except Exception as exc:  # noqa: BLE001 - a format of the worker's that cannot be rebuilt
        sys.stderr.write(f"sqla_pq fork server: logging as the worker does failed: {exc!r}\n")
        root.setLevel(level)


def _raw_fork() -> Callable[[], int] | None:
    """libc's fork(), called with the GIL held, for this process while it is single-threaded.

    ``os.fork()`` runs Python's after-fork work in the child: re-creating the GIL and the
    runtime's locks, and the ``os.register_at_fork`` callbacks of threading, logging and
    random.  That work is there for locks other threads may have held at the fork; in a
    single-threaded process none is held, and it costs more than the rest of a no-op child
    (~0.8 ms and ~200 page copies on the benchmark machine).  The child reseeds ``random``
    itself (``run_child``).  Any callback registered from here on (a module of the
    application that needs its own after-fork step) makes the server use ``os.fork()``.
    """
    if not sys.platform.startswith("linux") or sys.version_info >= (3, 13):
        return None  # checked against CPython 3.11 and 3.12's os.fork()
    import ctypes

    try:
        fork = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: the GIL stays held, as in the child
    except (OSError, AttributeError):
        return None
    fork.restype = ctypes.c_int
    fork.argtypes = []
    hooks_added: list[bool] = []
    register = os.register_at_fork

    def register_at_fork(**callbacks: Any) -> None:
        hooks_added.append(True)
        register(**callbacks)

    os.register_at_fork = register_at_fork

    def raw() -> int:
        if hooks_added:
            return os.fork()
        pid = int(fork())
        if pid < 0:
            raise OSError(ctypes.get_errno(), "fork failed")
        return pid

    return raw


def _single_threaded() -> bool:
    """No other thread (a module imported here could have started one, Python or not)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _register(name: str, module: str | None, data: bytes | None) -> bool:
    """Register task ``name`` here as the worker has it; False when that cannot be done."""
    from ..tasks import _REGISTRY

    if name not in _REGISTRY and module and module != "__main__":
        _import_quietly(module)
    if name not in _REGISTRY and data is not None:
        try:
            entry = pickle.loads(data)
        except BaseException as exc:  # noqa: BLE001 - then the worker forks the job
            sys.stderr.write(f"sqla_pq fork server: task {name}: {exc!r}\n")
        else:
            _REGISTRY[name] = entry
    return name in _REGISTRY


def _resolve_quietly(task: str, ctx: ExecutionContext) -> None:
    """Look a path task up here, its module being imported already: ``import_object`` caches
    it for every child.  A failure is left for the child to report."""
    from ..tasks import resolve

    try:
        resolve(task, ctx.allowed_tasks)
    except BaseException:  # noqa: BLE001, S110 - the child resolves it again and reports
        pass


def _import_quietly(name: str) -> None:
    """Import a module the worker had imported; a failure is the job's to report, not ours."""
    import importlib

    try:
        importlib.import_module(name)
    except BaseException as exc:  # noqa: BLE001 - the child imports it again and reports
        sys.stderr.write(f"sqla_pq fork server: importing {name} failed: {exc!r}\n")
