"""The worker: claim -> execute -> record, woken by NOTIFY, polling as a fallback.

One loop in the main thread claims jobs in batches sized to the free capacity (one statement,
``queries.job_claim``), hands them to the executor (a fork child per job, or a thread pool),
records outcomes in batches (``record.record_outcomes``), and sleeps in ``select()`` on the
LISTEN socket, the executor's pipes and a self-pipe, until something happens or a timer is due
(the ``worker_ttl`` poll, the next delayed job, a timeout, the listener health check).

Beside it run a heartbeat thread (it renews the lease of every job the worker holds, and the
worker's row; a job whose lease it could not renew in time is stopped, never run twice) and a
maintenance thread (rescuer, pruner, dependency sweeper, scheduler), each on its own
connection labelled ``sqla_pq:<role>:<worker id>``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import queries
from .db import (
    RawStatement,
    compile_sized,
    is_connection_error,
    is_dbapi_connection_error,
    protect_pool_across_fork,
    sqlstate,
    translating_schema_errors,
)
from .enqueue import check_queue_name
from .execution.call import ClaimedJob, Hooks, Outcome, run_crash_hooks
from .execution.fork import ForkExecutor
from .execution.thread import ThreadExecutor
from .link import Link
from .logs import direct_info
from .metrics import RECORDED_KINDS, HookRunner, JobMetric, MetricsHook
from .notify import Listener
from .record import Completed, complete_params, notify, record_outcomes
from .serialization import describe_call

if TYPE_CHECKING:
    from .pq import PQ

log = logging.getLogger("sqla_pq.worker")
job_log = logging.getLogger("sqla_pq.worker.jobs")
"""Each job's outcome line.  Its own logger so that Sentry's logging integration can leave it
out: the handler chain already reports a failed job, with the job's context."""

ISOLATION_MODES = ("fork", "thread")
PING_TIMEOUT = 3.0
RELOOK_MIN, RELOOK_MAX = 0.01, 1.0
"""Seconds before an idle worker looks again for a job that is due but was locked."""
LISTEN_START_WAIT = 5.0
"""Seconds a starting worker waits for its listen connection before polling without it."""
LISTEN_SLOW = 10.0
"""Seconds after which a listen connection still opening is reported."""


def _db_down(exc: BaseException) -> bool:
    return is_connection_error(exc) or is_dbapi_connection_error(exc)


class Heartbeat(threading.Thread):
    """Renews the leases of the worker's jobs and its own row every ``interval`` seconds, and
    reads its stop flag; a held job whose lease could not be renewed is reported lost."""

    def __init__(self, worker: Worker, link: Link, interval: float, lease: float) -> None:
        super().__init__(name="sqla_pq-heartbeat", daemon=True)
        self.worker = worker
        self.link = link
        self.interval = interval
        self.lease = lease
        self.last_ok = time.monotonic()
        self._stop_event = threading.Event()
        self._failures = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval if not self._failures else
                                        min(self.interval, 0.5 * 2 ** min(self._failures, 4))):
            self.beat()
        self.link.close()

    def beat(self) -> None:
        w = self.worker
        held = dict(sorted(w.held().items()))  # locks in id order, as completions take them
        sent_at = time.monotonic()  # a renewed lease runs from no earlier than this
        try:
            renewed, registered, stop = self.link.run(queries.worker_heartbeat(), {
                "wid": w.id, "lease": self.lease, "wstate": w.state,
                "current": w.current_job_id, "done": w.processed,
                "held_ids": list(held), "held_attempts": list(held.values()),
            })[0]
            if not registered:  # the row was deleted under us (by hand, or a cleanup script)
                log.warning("this worker's row was missing; registering it again")
                w.register(self.link)
        except Exception as exc:
            self._failures += 1
            self.link.reset()
            if not _db_down(exc):
                log.exception("heartbeat failed")
            else:
                log.warning("heartbeat failed: database unavailable (%s)", type(exc).__name__)
            return
        self._failures = 0
        self.last_ok = sent_at
        renewed_ids = set(renewed or ())
        w.leases_renewed({i: a for i, a in held.items() if i in renewed_ids}, sent_at)
        lost = {i: a for i, a in held.items() if i not in renewed_ids}
        if lost:
            w.leases_lost(lost)
        if stop:
            w.request_stop("a stop was requested in the database")


class Worker:
    """A worker process's loop.  Build it with ``pq.worker(...)`` or run ``pq.run_worker(...)``."""

    def __init__(
        self,
        pq: PQ,
        queues: Sequence[str] | str | None = None,
        *,
        burst: bool = False,
        name: str | None = None,
        isolation: str = "fork",
        concurrency: int = 1,
        prefetch: int = 0,
        max_runtime: float | None = None,
        priorities: Iterable[int] | None = None,
        pre_execute: Callable[[ClaimedJob], Any] | None = None,
        post_execute: Callable[[ClaimedJob, BaseException | None], Any] | None = None,
        exc_handlers: Sequence[Callable[..., Any]] = (),
        rate_limit: float | None = None,
        max_jobs: int | None = None,
        worker_ttl: float | None = None,
        memory_limit: int | str | None = None,
        maintenance: bool = True,
        install_signals: bool | None = None,
        call_wrapper: Callable[[ClaimedJob, Callable[[], Any]], Any] | None = None,
        fork_server: bool = False,
        fork_server_imports: Sequence[str] = (),
        metrics_hooks: Sequence[MetricsHook] = (),
    ) -> None:
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION_MODES)}, not {isolation!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency!r}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more, not {prefetch!r}")
        if isinstance(queues, str):
            queues = [q for q in queues.replace(",", " ").split() if q]
        self.queues: tuple[str, ...] | None = (
            tuple(check_queue_name(q) for q in queues) if queues else None
        )
        self.pq = pq
        self.settings = pq.settings
        self.burst = burst
        self.name = name or f"{socket.gethostname()}.{os.getpid()}"
        self.id = f"{self.name}.{secrets.token_hex(6)}"[:128]
        self.isolation = isolation
        self.concurrency = concurrency
        self.prefetch = prefetch
        """Jobs held beyond ``concurrency`` (thread mode), started as threads free up."""
        self.max_runtime = max_runtime
        self.priorities = tuple(sorted(set(priorities), reverse=True)) if priorities else None
        self.rate_limit = rate_limit
        self.max_jobs = max_jobs
        self.worker_ttl = worker_ttl if worker_ttl is not None else self.settings.worker_ttl
        self.memory_limit = memory_limit
        self.maintenance = maintenance
        self.install_signals = install_signals
        handlers = list(exc_handlers)
        sentry = _sentry_handler()
        if sentry is not None:
            handlers.insert(0, sentry)
        self.hooks = Hooks(pre_execute=pre_execute, post_execute=post_execute, exc_handlers=handlers)
        self.call_wrapper = call_wrapper
        """Runs around each task call where the job runs (see ``ExecutionContext.call_wrapper``)."""
        self.metrics = HookRunner([*pq.metrics_hooks, *metrics_hooks])
        """Called with a :class:`~sqla_pq.metrics.JobMetric` per attempt, once recorded."""
        self.fork_server = fork_server
        """Fork mode: jobs' processes are forked by a small fork server rather than by this
        (SQLAlchemy-sized) process, which makes each fork several times cheaper.  The job
        processes then have what the server imported (``fork_server_imports``, the tasks'
        modules), not all this process has: on by default in ``sqla-pq worker``, opt-in here."""
        self.fork_server_imports = tuple(fork_server_imports)
        """Modules the fork server imports at its start, as this process did (``-I``, ``--app``)."""

        self.processed = 0
        self.claimed_total = 0
        self._lease_due: float | None = None
        self.state = "starting"
        self.current_job_id: int | None = None
        self._stopping = False
        self._abort = False
        self._signals = 0
        self._maybe_work = True
        self._pending: list[Outcome] = []
        self._next_poll = 0.0
        self._next_due: float | None = None
        self._relook = RELOOK_MIN
        self._next_start = 0.0
        self._listen_ok_at = 0.0
        self._ping: tuple[str, float] | None = None
        self._notify_broken = False
        self._ping_failures = 0
        self._listen_attempt: threading.Thread | None = None
        self._listen_attempt_at = 0.0
        self._listen_result: Any = None
        self._listen_retry_at = 0.0
        self._listen_failures = 0
        self._listen_warned = False
        self._closing = False
        self._woken = False
        self._db_failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._held: dict[int, ClaimedJob] = {}
        """Jobs claimed and not yet recorded; their leases are the heartbeat's to renew."""
        self._lost: dict[int, int] = {}
        """Attempts whose leases the heartbeat could not renew, by job id."""
        self._renewed_ids: set[int] = set()
        s = self.settings
        self.lease_guard = s.lease_seconds - 0.5 * s.heartbeat
        """A job whose lease was last renewed longer ago than this is stopped: its lease may
        expire at any moment (half a heartbeat of margin for clocks and latency)."""

    def __repr__(self) -> str:
        return f"<Worker {self.id} queues={self.queues or 'all'} {self.isolation}x{self.concurrency}>"

    # -- lifecycle --------------------------------------------------------------------------------

    def run(self) -> int:
        """Work until stopped (or, in burst mode, until the queues are empty); return the
        number of jobs processed."""
        self._start()
        try:
            self._loop()
        finally:
            self._finish()
        return self.processed

    def request_stop(self, reason: str = "stop requested") -> None:
        """Finish the jobs in hand, then exit (what SIGTERM does)."""
        if not self._stopping:
            log.info("Warm shut down: %s; finishing the jobs in hand", reason)
        self._stopping = True
        self._wake()

    def abort(self) -> None:
        """Stop the jobs in hand, give them back to the queue, exit (a second SIGTERM)."""
        self._stopping = True
        self._abort = True
        self._wake()

    def _start(self) -> None:
        pq = self.pq
        # The claim runs prepared with generic plans: planned once per batch size, not per call.
        self.link = self._link("claim", settings={"plan_cache_mode": "force_generic_plan"})
        try:
            self._check_schema()  # before anything starts: a clear error, no half-started worker
        except BaseException:
            self.link.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False  # a wake before the pipe existed wrote nothing
        # poll(), not epoll: epoll registrations follow open file descriptions, which fork
        # children inherit, so a job pipe closed and its fd reused could lose its events.
        self.selector = selectors.PollSelector()
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        ctx = pq.execution_context(self.hooks, self.call_wrapper)
        if self.isolation == "fork":
            protect_pool_across_fork(pq.engine)
            executor: Any = ForkExecutor(
                self.concurrency, ctx, self._prepare_child, self.memory_limit,
                lease_guard=self.lease_guard,
                # a subclass's own _prepare_child must run in every child: the worker forks them
                fork_server=self.fork_server and type(self)._prepare_child is Worker._prepare_child,
                prefetch=self.prefetch,
                fork_server_imports=self.fork_server_imports,
            )
            executor.register_fd = lambda fd: self.selector.register(fd, selectors.EVENT_READ, "child")
            executor.unregister_fd = self.selector.unregister
        else:
            executor = ThreadExecutor(self.concurrency, ctx, self._wake, prefetch=self.prefetch)
        self.executor = executor
        with translating_schema_errors():
            self.register(self.link)
        listen_engine = pq.engine
        if self.settings.listen_url:
            from .db import create_engine

            listen_engine = create_engine(self.settings.listen_url)
        self.listener = Listener(listen_engine, self.id,
                                 label=bool(self.settings.listen_url) or not self.settings.transaction_pooler)
        self._connect_listener()
        if self._listen_attempt is not None:  # usually quick: start with notifications on
            self._listen_attempt.join(LISTEN_START_WAIT)
        self._check_listener(time.monotonic())
        self.heartbeat = Heartbeat(self, self._link("heartbeat"), self.settings.heartbeat,
                                   self.settings.lease_seconds)
        self.heartbeat.start()
        self.maintainer = None
        if self.maintenance:
            from .maintenance import default_services
            from .maintenance.base import Maintainer

            self.maintainer = Maintainer(self._link("maintenance"), default_services(pq, self))
            self.maintainer.start()
        if self.install_signals is None:
            self.install_signals = threading.current_thread() is threading.main_thread()
        self._old_handlers: dict[int, Any] = {}
        if self.install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        if not self.settings.allowed_tasks:
            log.info(
                "Tasks may come from any importable module outside the standard library; set "
                "SQLA_PQ_ALLOWED_TASKS=myapp.tasks (module prefixes) to allow only yours"
            )
        names = ", ".join(self.queues) if self.queues else "all queues"
        log.info("*** Listening for work on %s", names)
        self.state = "idle"

    def _link(self, role: str, settings: dict[str, str] | None = None) -> Link:
        """A held connection for one of this worker's roles (claim, heartbeat, maintenance)."""
        pq, s = self.pq, self.settings
        return Link(pq.engine, role, self.id, pq.schema, prepare=s.prepare,
                    settings=settings, session_state=not s.transaction_pooler)

    def register(self, link: Link) -> None:
        """Write this worker's row (again, if it went missing)."""
        import sqla_pq

        link.run(queries.worker_register(), {
            "id": self.id, "name": self.name[:255], "hostname": socket.gethostname()[:255],
            "pid": os.getpid(), "queues": list(self.queues) if self.queues else None,
            "isolation": self.isolation, "concurrency": self.concurrency,
            "version": sqla_pq.__version__, "lease": self.settings.lease_seconds,
        })

    def _check_schema(self) -> None:
        from .migrations import check_compatible

        check_compatible(self.link.conn, self.pq.schema)
        self.link.conn.commit()

    def _finish(self) -> None:
        self.state = "stopping"
        self.executor.release_waiting()  # a held job never starts once the worker stops
        if self._abort:
            self._give_back_running()
        else:
            self.executor.wait_idle(0.0)
        late = self.executor.collect()
        if late:  # a job that ended after all replaces the interruption given for it
            ended = {o.job_id for o in late}
            self._pending = [o for o in self._pending if o.job_id not in ended] + late
        if self._pending:
            self._flush(claim=False, final=True)
        if self.install_signals:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
        self.heartbeat.stop()
        if self.maintainer is not None:
            self.maintainer.stop()
        self.executor.shutdown()
        try:
            self.link.run(queries.worker_unregister(), {"wid": self.id})
        except Exception as exc:
            log.warning("could not remove this worker's row (%s); the rescuer will", exc.__class__.__name__)
        self.heartbeat.join(timeout=5)
        if self.maintainer is not None:
            self.maintainer.join(timeout=5)
        with self._lock:
            self._closing = True  # a connect still under way closes what it gets
            late, self._listen_result = self._listen_result, None
        if late is not None and not isinstance(late, BaseException):
            late.close()
        self.listener.close()
        self.link.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.state = "stopped"
        log.info("*** Worker %s stopped after %d jobs", self.id, self.processed)

    def _give_back_running(self) -> None:
        """After an abort: jobs still in hand go back to the queue, an interruption counted."""
        still = self.executor.running()
        if self.isolation == "thread":
            self.executor.wait_idle(2.0)
            self._pending.extend(self._collect())
            still = self.executor.running()
        pending_ids = {o.job_id for o in self._pending}
        give_back = [j for j in still if j.id not in pending_ids]
        if give_back:
            self._pending.extend(
                Outcome(j.id, j.attempts, "interrupted", queue=j.queue) for j in give_back
            )

    def _prepare_child(self) -> None:
        """In a fork child, before the job.  No inherited pooled connection can be used: the
        pool refuses connections another process opened (``protect_pool_across_fork``)."""

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Signals are counted on their own: after a stop asked from the database, the first
        # SIGTERM (a service manager's) is still a warm stop, not the abort of a second signal.
        self._signals += 1
        if self._signals > 1:
            log.warning("Cold shut down: aborting the jobs in hand, they go back to the queue")
            self._abort = True
        else:
            log.info("Warm shut down requested (%s); press Ctrl-C again to abort",
                     signal.Signals(signum).name)
            self._stopping = True
        self._wake()

    def _wake(self) -> None:
        """Make the loop take a turn.  Callers change the state the loop reads first, so one
        byte in the pipe is enough for any number of wakes (``_woken``: a job thread finishing
        does not make a system call when the loop is already due to look)."""
        if self._woken:
            return
        self._woken = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError, AttributeError):
            pass

    # -- leases (the heartbeat thread reports, the loop acts) -------------------------------------

    def held(self) -> dict[int, int]:
        """Attempt number of each job this worker holds (claimed, not yet recorded)."""
        with self._lock:
            return {job_id: job.attempts for job_id, job in self._held.items()}

    def leases_renewed(self, renewed: dict[int, int], at: float) -> None:
        """The heartbeat renewed these attempts (attempt number by job id).  Only the attempt
        still held counts: the job may have been recorded and claimed again by this worker (the
        next step of a multi-step job, a retry) while the heartbeat's statement ran."""
        with self._lock:
            current: set[int] = set()
            for job_id, attempt in renewed.items():
                job = self._held.get(job_id)
                if job is not None and job.attempts == attempt:
                    job.extra["lease_ok_at"] = at
                    current.add(job_id)
            if self.isolation == "fork":
                self._renewed_ids |= current
        if current and self.isolation == "fork":
            self._wake()

    def leases_lost(self, lost: dict[int, int]) -> None:
        """These attempts' leases had expired (attempt number by job id): the rescuer may
        have given them to another worker."""
        with self._lock:
            self._lost.update(lost)
        self._wake()

    def _check_leases(self, now: float) -> None:
        """Stop the running jobs whose lease is lost or may expire any moment (so that no job
        runs twice), tell fork children about renewals; plan when to look next."""
        if not (self._lost or self._renewed_ids) and (self._lease_due is None or now < self._lease_due):
            return  # the common case, at every turn of the loop: nothing to do
        with self._lock:
            lost, self._lost = self._lost, {}
            renewed, self._renewed_ids = self._renewed_ids, set()
        if renewed:
            self.executor.renew_leases(renewed)
        stop: set[int] = set()
        upcoming: float | None = None
        for job in self.executor.running():
            if job.extra.get("fenced"):
                continue
            doubt_at = job.extra.get("lease_ok_at", now) + self.lease_guard
            expired = lost.get(job.id) == job.attempts  # not a lease of an earlier attempt
            if expired or now >= doubt_at:
                job.extra["fenced"] = True
                stop.add(job.id)
                why = ("its lease had expired" if expired else
                       f"its lease was not renewed for {now - job.extra.get('lease_ok_at', now):.1f}s")
                log.error("stopping job %s: %s (this worker was frozen, or could not reach the "
                          "database), so another worker may run it; it goes back to the queue",
                          job.id, why)
            else:
                upcoming = doubt_at if upcoming is None else min(upcoming, doubt_at)
        if stop:
            self.executor.fence(stop)
        self._lease_due = upcoming

    # -- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception:  # the loop must outlive any bug in one of its steps
                log.exception("unexpected error in the worker loop; going on")
                self.link.reset()
                time.sleep(0.5)

    def _step(self) -> bool:
        """One turn of the loop; True when the worker should exit."""
        now = time.monotonic()
        self._check_leases(now)
        if self._stopping:  # prefetched jobs that have not started go back to the queue
            self.executor.release_waiting()
        self._pending.extend(self._collect())
        if self._abort:
            if self._pending:
                self._flush(claim=False)
            self.executor.interrupt_all()
            return True
        if (self._stopping and not self.executor.busy() and not self._pending
                and not self.executor.has_outcomes()):
            return True
        if now >= self._next_poll:
            self._maybe_work = True
            self._next_poll = now + self.worker_ttl
        if self._next_due is not None and now >= self._next_due:
            self._maybe_work = True
            self._next_due = None
        if self._pending and now >= self._retry_at:
            self._flush(claim=self._can_claim(now))
            if self._stopping and not self.executor.busy() and not self._pending:
                return True
        elif self._can_claim(now):
            self._claim_batch()
        if self._done_bursting():
            return True
        self._check_listener(time.monotonic())
        self._sleep(self._timeout())
        return False

    def _collect(self) -> list[Outcome]:
        """The executor's finished attempts; for those that crashed or timed out, the handler
        chain and failure hook run here, since where the job ran nothing is left to run them."""
        outcomes = self.executor.collect()
        for outcome in outcomes:
            if outcome.crash is not None:
                job = self._held.get(outcome.job_id)
                if job is not None:
                    run_crash_hooks(job, outcome, self.hooks)
        return outcomes

    def _can_claim(self, now: float) -> bool:
        if self._stopping or not self._maybe_work or now < self._retry_at:
            return False
        if self.max_jobs is not None and self.claimed_total >= self.max_jobs:
            return False
        if self.rate_limit and now < self._next_start:
            return False
        return self.executor.free() > 0

    def _done_bursting(self) -> bool:
        idle = (not self.executor.busy() and not self.executor.has_outcomes()
                and not self._pending)
        if self.max_jobs is not None and self.claimed_total >= self.max_jobs:
            return idle
        return self.burst and idle and not self._maybe_work and time.monotonic() >= self._retry_at

    def _batch_size(self) -> int:
        free = self.executor.free()
        if self.rate_limit:
            free = 1
        if self.max_jobs is not None:
            free = min(free, self.max_jobs - self.claimed_total)
        return queries.claim_size(free)

    def _claim_batch(self) -> None:
        batch = self._batch_size()
        sent_at = time.monotonic()
        try:
            rows = self.link.run(self._sized(queries.job_claim, batch),
                                 {"worker": self.id, "lease": self.settings.lease_seconds})
        except Exception as exc:
            if _serial_race(exc):
                self._maybe_work = True  # another worker took the serial queue's job first
                return
            self._db_error(exc, "claiming")
            return
        self._db_ok()
        self._dispatch(rows, batch, sent_at)

    def _sized(self, builder: Callable[..., Any], batch: int) -> RawStatement:
        return compile_sized(builder, self.queues, self.priorities, batch,
                             self.pq.engine.dialect, self.pq.schema)

    def _dispatch(self, rows: Sequence[Any], asked: int, sent_at: float) -> None:
        """Hand claimed rows to the executor (their leases run from ``sent_at``, when the
        claim was sent); plan the next look when there were none."""
        if not rows:
            self._maybe_work = False
            self._plan_next_due()
            return
        jobs = sorted((ClaimedJob.from_tuple(r) for r in rows), key=ClaimedJob.sort_key)
        # A short batch means the queues are drained, unless it took a serial queue's job: that
        # queue's other jobs may have filled the batch's candidates, and the next claim, which
        # leaves the queue out while its job runs, reaches the other queues.
        self._maybe_work = len(rows) >= asked or any(job.serial for job in jobs)
        self._relook = RELOOK_MIN
        now = time.monotonic()
        with self._lock:
            for job in jobs:
                job.extra["lease_ok_at"] = sent_at
                self._held[job.id] = job
        due = sent_at + self.lease_guard
        self._lease_due = due if self._lease_due is None else min(self._lease_due, due)
        if log.isEnabledFor(logging.INFO):  # each job's line before its own output
            write = direct_info(log)
            if write is not None:
                write([f"Got {describe_call(job)} from {job.queue}" for job in jobs])
            else:
                for job in jobs:
                    log.info("Got %s from %s", describe_call(job), job.queue)
        for job in jobs:
            job.extra["timeout"] = self._effective_timeout(job)
            self.claimed_total += 1
            self.current_job_id = job.id
            self.executor.submit(job)
        self.state = "busy"
        if self.rate_limit:
            self._next_start = now + self.rate_limit

    def _effective_timeout(self, job: ClaimedJob) -> float | None:
        limits = [t for t in (job.timeout, self.max_runtime) if t]
        return min(limits) if limits else None

    def _plan_next_due(self) -> None:
        try:
            rows = self.link.run(queries.job_next_run_at(self.queues, self.priorities))
            when = rows[0][0] if rows else None
            if when is None:
                self._next_due = None
                self._relook = RELOOK_MIN
                return
            db_now = self.link.run(queries.now())[0][0]
        except Exception as exc:
            self._db_error(exc, "looking ahead")
            return
        wait = (when - db_now).total_seconds()
        if wait > 0:
            self._relook = RELOOK_MIN  # nothing due is locked: the next lock starts afresh
        else:
            # Due, yet the claim did not return it: another transaction holds its lock (a claim
            # in flight, an application's SELECT ... FOR UPDATE).  Look again soon, then less
            # and less often while the lock is held, not at once and again.
            wait, self._relook = self._relook, min(self._relook * 2, RELOOK_MAX)
        self._next_due = time.monotonic() + min(wait, self.worker_ttl)

    def _flush(self, claim: bool, final: bool = False) -> None:
        """Write the pending outcomes.  Successes go in one statement; when a slot is free that
        same statement also claims the next batch (one commit for both: the hot path)."""
        pending = self._pending
        successes = [o for o in pending if o.kind == "succeeded" and not o.committed]
        rest = [o for o in pending if not (o.kind == "succeeded" and not o.committed)]
        fenced = [o for o in rest if o.kind == "fenced"]
        interrupted = [o for o in rest if o.kind == "interrupted"]
        released = [o for o in rest if o.kind == "released"]
        others = [o for o in rest if o.kind not in ("fenced", "interrupted", "released")]
        claimed: list[Any] | None = None
        batch = self._batch_size() if claim else 0
        sent_at = time.monotonic()
        stale: set[int] = set()
        more = False  # jobs made ready by these outcomes (released dependants, retries, steps)
        try:
            if others:
                done = record_outcomes(self.link, others, failure_ttl=self.settings.failure_ttl)
                stale |= set(done.stale)
                more = more or bool(done.released or done.retried or done.stepped)
            if interrupted:
                self.link.run(queries.job_requeue_interrupted(), self._give_back(interrupted))
            if fenced:
                self.link.run(queries.job_requeue_lost(),
                              {**self._give_back(fenced), "worker": self.id})
            if released:
                rows = self.link.run(queries.job_release(),
                                     {**self._give_back(released), "worker": self.id})
                notify(self.link, [queue for _id, queue in rows])  # for the other workers
            if successes:
                completed = None
                if batch > 0:
                    try:
                        rows = self.link.run(
                            self._sized(queries.job_complete_and_claim, batch),
                            {**complete_params(successes), "worker": self.id,
                             "lease": self.settings.lease_seconds},
                        )
                    except Exception as exc:
                        if not _serial_race(exc):
                            raise
                        self._maybe_work = True  # record alone; claim next turn
                    else:
                        completed = _completed(rows)
                        claimed = [r[:-3] for r in rows if r[0] is not None]
                done = record_outcomes(self.link, successes,
                                       failure_ttl=self.settings.failure_ttl, completed=completed)
                stale |= set(done.stale)
                more = more or bool(done.released)
        except Exception as exc:
            if final:
                log.error("could not record %d outcome(s) before exiting (%s); the rescuer "
                          "will re-queue those jobs", len(pending), exc.__class__.__name__)
                self._pending = []
                self._forget(pending)
                return
            if claimed:  # committed with the successes: ours to run, whatever failed after
                self._dispatch(claimed, batch, sent_at)
            self._db_error(exc, "recording outcomes")
            return
        self._db_ok()
        with self._lock:  # the jobs behind these outcomes, looked up once for what follows
            held = [self._held.get(o.job_id) for o in pending]
        metrics = self._metrics_of(pending, held, stale) if self.metrics else ()
        freed = {job.queue for job in held if job is not None and job.serial}
        self._pending = []
        self._forget(pending)
        if freed:
            self._wake_for_serial(freed)
        verbose = log.isEnabledFor(logging.INFO)
        if released:
            log.info("%d prefetched job(s) went back to the queue unstarted", len(released))
        finished = successes + others
        self.processed += len(finished)
        if verbose:
            _log_outcomes([o for o in finished if o.job_id not in stale])
        for o in interrupted:
            log.warning("Job %s was interrupted and goes back to the queue", o.job_id)
        for o in fenced:
            log.warning("Job %s was stopped because this worker lost its lease; it goes back "
                        "to the queue", o.job_id)
        if not self.executor.busy():
            self.state = "idle"
            self.current_job_id = None
        self._maybe_work = True  # a slot is free again
        if claimed is not None:
            self._dispatch(claimed, batch, sent_at)
            if more:  # the claim ran before these became ready: look again
                self._maybe_work = True
        if metrics:  # after the dispatch: hooks must not hold up jobs whose leases run
            self.metrics.emit(metrics)

    def _metrics_of(self, outcomes: Sequence[Outcome], held: Sequence[ClaimedJob | None],
                    stale: set[int]) -> list[JobMetric]:
        """One metric per attempt just recorded (not the stale ones: another worker's
        compare-and-set won, and that worker counts the job).  Never raises: metrics must not
        keep a claimed batch from being dispatched."""
        try:
            return [JobMetric.of(job, o, self.id) for job, o in zip(held, outcomes)
                    if o.kind in RECORDED_KINDS and o.job_id not in stale]
        except Exception:  # noqa: BLE001
            log.exception("could not build the metrics of %d outcome(s)", len(outcomes))
            return []

    def _give_back(self, outcomes: Sequence[Outcome]) -> dict[str, Any]:
        return {"ids": [o.job_id for o in outcomes], "attempt_list": [o.attempt for o in outcomes],
                "failure_ttl": float(self.settings.failure_ttl)}

    def _wake_for_serial(self, queues: set[str]) -> None:
        """A serial queue whose job ended may start its next one: tell the idle workers, which
        leave a busy serial queue out of their claims and would otherwise wait for a poll."""
        try:
            notify(self.link, queues)
        except Exception as exc:
            self._db_error(exc, "waking the workers of a serial queue")

    def _forget(self, outcomes: Sequence[Outcome]) -> None:
        """Recorded (or given up on): these jobs' leases are no longer ours to renew."""
        with self._lock:
            for o in outcomes:
                self._held.pop(o.job_id, None)

    def _db_error(self, exc: BaseException, doing: str) -> None:
        if not _db_down(exc):
            log.exception("unexpected error while %s", doing)
        self.link.reset()
        self._db_failures += 1
        delay = min(0.1 * 2 ** min(self._db_failures, 7), 10.0)
        self._retry_at = time.monotonic() + delay
        log.warning("database unavailable while %s (%s); retrying in %.1fs",
                    doing, exc.__class__.__name__, delay)

    def _db_ok(self) -> None:
        if self._db_failures:
            log.info("database reachable again")
            self._db_failures = 0
            self._maybe_work = True
            if not self.listener.connected:
                self._listen_retry_at = 0.0
                self._connect_listener()

    # -- waiting and waking -------------------------------------------------------------------------

    def _connect_listener(self) -> None:
        """Start opening a new listen connection in a thread (one attempt at a time): a LISTEN
        path that accepts TCP but never answers must not stall claiming; the worker polls
        meanwhile, and catches up as soon as the connection is in."""
        if self._listen_attempt is not None:
            return
        self._drop_listener()

        def attempt() -> None:
            try:
                result: Any = self.listener.open()
            except BaseException as exc:  # noqa: BLE001 - reported by the loop
                result = exc
            with self._lock:
                if self._closing:
                    if not isinstance(result, BaseException):
                        result.close()
                    return
                self._listen_result = result
            self._wake()

        self._listen_attempt_at = time.monotonic()
        self._listen_attempt = threading.Thread(target=attempt, name="sqla_pq-listen-connect",
                                                daemon=True)
        self._listen_attempt.start()

    def _listen_connected(self, now: float) -> None:
        """Take the result of a connect attempt, if there is one."""
        with self._lock:
            result, self._listen_result = self._listen_result, None
        if result is None:
            if (self._listen_attempt is not None and not self._listen_warned
                    and now - self._listen_attempt_at > LISTEN_SLOW):
                self._listen_warned = True
                log.warning("the LISTEN connection has not opened in %gs; polling every %gs "
                            "meanwhile", LISTEN_SLOW, self.worker_ttl)
            return
        self._listen_attempt = None
        self._listen_warned = False
        if isinstance(result, BaseException):
            self._listen_failures += 1
            delay = min(0.5 * 2 ** min(self._listen_failures, 5), 10.0)
            self._listen_retry_at = now + delay
            log.warning("could not LISTEN (%s); polling until it works, next try in %.1fs",
                        result.__class__.__name__, delay)
            return
        self._listen_failures = 0
        self.listener.adopt(result)
        self.selector.register(self.listener.fileno(), selectors.EVENT_READ, "listen")
        self._maybe_work = True  # notifications sent while disconnected are lost: catch up
        self._listen_ok_at = now
        self._send_ping()

    def _drop_listener(self) -> None:
        try:
            key = self.selector.get_key(self.listener.fileno())
            if key.data == "listen":  # never a child's pipe that reused a closed socket's fd
                self.selector.unregister(key.fd)
        except (KeyError, ValueError, OSError):
            pass
        self.listener.close()

    def _send_ping(self) -> None:
        token = Listener.new_token()
        try:
            self.link.run(queries.notify(), {"payload": f"!ping {token}"})
        except Exception as exc:
            self._db_error(exc, "checking the listener")
            return
        self._ping = (token, time.monotonic() + PING_TIMEOUT)

    def _check_listener(self, now: float) -> None:
        """Reconnect a broken listener; ping a silent one.  A ping that is not echoed means a
        half-open socket (reconnect); not echoed right after a reconnect either means NOTIFY
        cannot arrive at all (a pooler): warn once and rely on polling."""
        if not self.listener.connected:
            self._listen_connected(now)
            if (not self.listener.connected and self._listen_attempt is None
                    and now >= self._listen_retry_at):
                self._connect_listener()
            return
        if self._ping is not None and now >= self._ping[1]:
            self._ping = None
            self._ping_failures += 1
            if self._ping_failures >= 2:
                if not self._notify_broken:
                    self._notify_broken = True
                    log.warning(
                        "NOTIFY does not reach this worker (a pooler such as pgbouncer in "
                        "transaction mode?); it polls every %gs instead. Lower "
                        "SQLA_PQ_WORKER_TTL, or let the worker connect to PostgreSQL directly",
                        self.worker_ttl)
                self._listen_ok_at = now  # check again after the usual silence
                return
            log.warning("the listener did not echo a check within %gs (half-open connection?); "
                        "reconnecting", PING_TIMEOUT)
            self.listener.reconnects += 1
            self._drop_listener()
            self._connect_listener()
            return
        if (self._ping is None and now - self._listen_ok_at > self.settings.listen_check
                and now >= self._retry_at):
            self._send_ping()

    def _timeout(self) -> float:
        now = time.monotonic()
        candidates = [self._next_poll]
        if self._next_due is not None:
            candidates.append(self._next_due)
        if not self.listener.connected:  # its health check waits for a connection
            candidates.append(self._listen_attempt_at + LISTEN_SLOW if self._listen_attempt
                              else self._listen_retry_at)
        elif self._ping is not None:
            candidates.append(self._ping[1])
        else:  # a check is due after listen_check of silence, once the database answers
            candidates.append(max(self._listen_ok_at + self.settings.listen_check,
                                  self._retry_at))
        if self._pending:
            candidates.append(self._retry_at)
        if self.rate_limit and self._maybe_work:
            candidates.append(self._next_start)
        deadline = self.executor.check_deadlines(now)
        if deadline is not None:
            candidates.append(deadline)
        if self._lease_due is not None:
            candidates.append(self._lease_due)
        if self._maybe_work and self.executor.free() > 0 and not self._stopping:
            candidates.append(max(self._retry_at, now))
        if self.executor.has_outcomes():  # one that came without a wake-up (a failed start)
            candidates.append(now)
        return max(0.0, min(candidates) - now)

    def _sleep(self, timeout: float) -> None:
        try:
            events = self.selector.select(timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
            return
        for key, _mask in events:
            kind = key.data
            if kind == "wake":
                self._drain_wake()
            elif kind == "listen":
                self._on_notify()
            elif kind == "child":
                self.executor.on_readable(key.fd)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # after the read: a wake from now on writes again; one that saw the flag still set
        # changed its state before this, and the turn about to run reads it
        self._woken = False

    def _on_notify(self) -> None:
        try:
            wake = self.listener.drain()
        except Exception as exc:
            log.warning("the listener's connection broke (%s); reconnecting", exc.__class__.__name__)
            self.listener.reconnects += 1
            self._drop_listener()
            self._connect_listener()
            return
        now = time.monotonic()
        self._listen_ok_at = now
        if self._ping is not None and self._ping[0] in wake.pongs:
            self._ping = None
            self._ping_failures = 0
            if self._notify_broken:
                self._notify_broken = False
                log.info("NOTIFY reaches this worker again")
        if wake.queues and (self.queues is None or not wake.queues.isdisjoint(self.queues)):
            self._maybe_work = True
        for command in wake.commands:
            if command in ("stop *", f"stop {self.id}"):
                self.request_stop("a stop was requested")
            elif command == "migrated":
                try:
                    self._check_schema()
                except Exception as exc:  # a schema this worker does not understand
                    log.error("%s", exc)
                    self.request_stop("the database schema changed under this worker")


def _completed(rows: Sequence[Any]) -> Completed:
    """The ids a complete-and-claim wrote, from the one row that carries them (the others,
    and every row when nothing was written, hold NULLs: the other two arrays are subsets)."""
    carrier = next((r for r in rows if r[-3] is not None), None)
    if carrier is None:
        return Completed([], [], [])
    return Completed(carrier[-3], carrier[-2] or [], carrier[-1] or [])


def _serial_race(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    return sqlstate(orig) == "23505" and "uq_pq_job_serial_running" in str(orig)


def _log_outcomes(outcomes: Sequence[Outcome]) -> None:
    """The outcome lines; a batch's successes in one write when nothing else sees them
    (:func:`~sqla_pq.logs.direct_info`)."""
    write = direct_info(job_log) if outcomes else None
    if write is None:
        for o in outcomes:
            _log_outcome(o)
        return
    lines: list[str] = []
    for o in outcomes:
        if o.kind != "succeeded":
            if lines:  # keep the order: the lines before, then this one through logging
                write(lines)
                lines = []
            _log_outcome(o)
        else:
            fmt, args = _success_line(o)
            lines.append(fmt % args)
    if lines:
        write(lines)


def _success_line(o: Outcome) -> tuple[str, tuple[Any, ...]]:
    if o.log_result is None or o.log_result == "None":
        return "Job %s ended normally without result", (o.job_id,)
    return "Job result = %s", (o.log_result,)


def _log_outcome(o: Outcome) -> None:
    if o.kind == "succeeded":
        fmt, args = _success_line(o)
        job_log.info(fmt, *args)
    elif o.kind == "retry":
        job_log.warning("Job %s failed (%s); retrying in %s", o.job_id, o.error, _human(o.retry_delay))
    elif o.kind == "failed":
        job_log.error("Job %s failed: %s", o.job_id, o.error)
    elif o.kind == "cancelled":
        job_log.info("Job %s cancelled: %s", o.job_id, o.error)
    elif o.kind == "step":  # a multi-step job's task
        job_log.info("Job %s: %s", o.job_id, o.log_result)


def _human(seconds: float) -> str:
    if seconds < 1:
        return "a moment"
    if seconds < 90:
        return f"{math.ceil(seconds)}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _sentry_handler() -> Callable[..., Any] | None:
    dsn = os.environ.get("SENTRY_DSN")
    if not dsn:
        return None
    try:
        import sentry_sdk
    except ImportError:
        log.warning("SENTRY_DSN is set but sentry_sdk is not installed; pip install sentry-sdk")
        return None
    new_scope = getattr(sentry_sdk, "new_scope", None)  # sentry-sdk 2; 1.x has push_scope
    if new_scope is not None:
        active = sentry_sdk.get_client().is_active()
    else:  # pragma: no cover - sentry-sdk 1.x
        active = bool(sentry_sdk.Hub.current.client)  # type: ignore[attr-defined]
        new_scope = sentry_sdk.push_scope  # type: ignore[attr-defined]
    if not active:
        sentry_sdk.init(dsn=dsn)
    try:  # one event per failed job: the handler's, not also one for its ERROR log line
        from sentry_sdk.integrations.logging import ignore_logger

        ignore_logger(job_log.name)
    except ImportError:  # pragma: no cover - an SDK without the logging integration
        pass

    owner = os.getpid()  # the worker: its SDK sends in the background, the loop must not wait
    sender = [owner]  # the process whose transport is its own

    def report(job: ClaimedJob, exc_type: Any, exc_value: BaseException, tb: Any) -> bool:
        if sender[0] != os.getpid():  # a fork child: not the parent's connections and queue
            _own_sentry_transport(sentry_sdk)
            sender[0] = os.getpid()
        with new_scope() as scope:
            scope.set_tag("sqla_pq.queue", job.queue)
            scope.set_extra("job_id", job.id)
            scope.set_extra("task", job.task)
            sentry_sdk.capture_exception(exc_value)
        if os.getpid() != owner:  # a fork child exits right after: send before it does
            sentry_sdk.flush(timeout=2.0)
        return True

    return report


def _own_sentry_transport(sentry_sdk: Any) -> None:
    """A fork child inherits the SDK's transport: its pooled connection (reusing it breaks the
    parent's) and its queue of unsent events (sent twice).  Give the child a new one."""
    try:
        from sentry_sdk.transport import make_transport

        get_client = getattr(sentry_sdk, "get_client", None)
        client = get_client() if get_client is not None else sentry_sdk.Hub.current.client
        if client is not None and getattr(client, "transport", None) is not None:
            client.transport = make_transport(client.options)
    except Exception:  # noqa: BLE001 - an SDK that works otherwise: report with what it has
        log.debug("could not give this job process its own Sentry transport", exc_info=True)
