"""The fault-injection harness: a scenario's database, its worker processes, its ledger, the
one invariant check that runs after every scenario, and the measured figures it reports.

A :class:`Scenario` owns a fresh migrated database (on the shared server for scenarios that
break nothing but processes, on the tests' own restartable server for the others).  It installs

- ``fault_ledger``: one row per execution of a ledger task (``tests.faults.tasks.work``),
  stamped with the database's clock: started, last seen alive, finished;
- ``fault_transition``: a trigger's history of every status/attempt change of ``pq_job``;

and samples ``pg_stat_activity``/``pg_locks`` in the background for the hygiene promises.

:meth:`Scenario.check_invariants` is the one check every scenario ends with:

1. once settled, no job is ``running`` without a live lease;
2. no two executions of one job overlap (ledger ranges);
3. each attempt leaves ``running`` once, and nothing leaves a final state;
4. no tick without its job;
5. no advisory lock held by an idle sqla_pq backend (a leaked session lock), none at all once
   the workers are gone;
6. no sqla_pq connection ``idle in transaction`` for more than 1 s;
7. no zombie child of a worker that stays one, no process of the scenario left alive after
   its workers were stopped, sqla_pq backends back to zero.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa
from sqlalchemy.engine import URL

from tests.helpers import wait_until  # noqa: F401 - the scenarios import it from here

ROOT = Path(__file__).resolve().parents[2]
FAKETIME_SITE = Path(__file__).resolve().parent / "faketime_site"
FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)
FAST = {
    "SQLA_PQ_HEARTBEAT": "0.5",
    "SQLA_PQ_LEASE": "2",
    "SQLA_PQ_RESCUE_INTERVAL": "0.5",
    "SQLA_PQ_WORKER_TTL": "30",
    "SQLA_PQ_PRUNE_INTERVAL": "1",
}
LEASE = 2.0
RESCUE = 0.5
HEARTBEAT = 0.5

HARNESS_DDL = """
CREATE TABLE IF NOT EXISTS fault_ledger (
    id bigserial PRIMARY KEY,
    job_id bigint,
    attempt int,
    pid int,
    tag text,
    token text UNIQUE,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen timestamptz,
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS fault_ledger_job ON fault_ledger (job_id);
CREATE TABLE IF NOT EXISTS fault_transition (
    id bigserial PRIMARY KEY,
    job_id bigint,
    old_status text,
    new_status text,
    old_attempts int,
    new_attempts int,
    worker_id text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS fault_transition_job ON fault_transition (job_id);
CREATE OR REPLACE FUNCTION fault_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status OR NEW.attempts IS DISTINCT FROM OLD.attempts THEN
        INSERT INTO fault_transition (job_id, old_status, new_status, old_attempts, new_attempts, worker_id)
        VALUES (OLD.id, OLD.status, NEW.status, OLD.attempts, NEW.attempts, NEW.worker_id);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS fault_track ON pq_job;
CREATE TRIGGER fault_track AFTER UPDATE ON pq_job FOR EACH ROW EXECUTE FUNCTION fault_track();
"""

OVERLAP_SQL = """
SELECT count(*) FROM fault_ledger a JOIN fault_ledger b
  ON a.job_id = b.job_id AND a.id < b.id
 WHERE tstzrange(a.started_at, coalesce(a.finished_at, a.last_seen, a.started_at), '[]')
    && tstzrange(b.started_at, coalesce(b.finished_at, b.last_seen, b.started_at), '[]')
"""

FINAL = ("succeeded", "failed", "cancelled")

ORPHAN_SQL = """
SELECT count(*) FROM pq_job j
 WHERE j.status = 'running' AND j.task = 'tests.faults.tasks.work'
   AND j.started_at < clock_timestamp() - interval '3 seconds'
   AND NOT EXISTS (SELECT 1 FROM fault_ledger l
                    WHERE l.job_id = j.id AND l.attempt = j.attempts AND l.finished_at IS NULL
                      AND coalesce(l.last_seen, l.started_at) > clock_timestamp() - interval '3 seconds')
"""
"""Ledger jobs ``running`` for 3 s whose current attempt is not running anywhere (no live,
unfinished execution of that attempt): held by a lease, run by nobody."""


def faketime_lib() -> str | None:
    if not shutil.which("faketime"):
        return None
    for lib in FAKETIME_LIBS:
        if os.path.exists(lib):
            return lib
    return None


def database_error_tolerant(fn: Callable[[], Any], default: Any = None) -> Callable[[], Any]:
    """For wait_until while the database may be down: a failed query counts as 'not yet'."""

    def wrapped() -> Any:
        try:
            return fn()
        except sa.exc.DBAPIError:
            return default

    return wrapped


# -- worker processes ---------------------------------------------------------------------------------


class FaultWorker:
    """``python -m sqla_pq worker ...`` in its own process group, output to a file."""

    def __init__(self, scenario: Scenario, args: Sequence[str], env: dict[str, str],
                 name: str | None = None, label: str | None = None) -> None:
        self.scenario = scenario
        self.args = list(args)
        self.label = label or name or f"w{len(scenario.workers) + 1}"
        self.frozen = False  # set once the scenario SIGSTOPs it
        self.log_path = Path(tempfile.mkstemp(prefix=f"sqla_pq_fault_{self.label}_", suffix=".log")[1])
        cmd = [sys.executable, "-m", "sqla_pq", "worker", *self.args]
        if name:
            cmd += ["--name", name]
        self.name = name
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(ROOT))
        self.started = time.monotonic()
        self._id: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def worker_id(self) -> str | None:
        if self._id is None:
            self._id = self.scenario.scalar(
                "SELECT id FROM pq_worker WHERE pid = %(pid)s ORDER BY started_at DESC LIMIT 1",
                pid=self.pid)
        return self._id

    def wait_registered(self, timeout: float = 30.0) -> str:
        def registered() -> Any:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.label} exited early:\n{self.output()[-3000:]}")
            return self.scenario.scalar(
                "SELECT id FROM pq_worker WHERE pid = %(pid)s AND state <> 'starting'", pid=self.pid)

        self._id = wait_until(database_error_tolerant(registered), timeout,
                              message=f"worker {self.label} to register")
        return self._id

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill9(self) -> None:
        """SIGKILL the worker's process group (the worker and its threads; fork children live
        in their own groups and must die through PR_SET_PDEATHSIG)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap()

    def kill_parent(self) -> None:
        """SIGKILL the worker process only, not its group."""
        self.signal(signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def stop_process(self) -> None:
        self.frozen = True  # its open transaction, if any, stays open while it is stopped
        self.signal(signal.SIGSTOP)

    def continue_process(self) -> None:
        self.signal(signal.SIGCONT)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.label} did not exit within {timeout}s:\n{self.output()[-3000:]}"
            ) from None

    def terminate_hard(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGCONT)
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap()


# -- the background sampler -------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples the scenario's sqla_pq connections every ``interval`` seconds: idle-in-transaction
    ages, transaction ages, advisory locks held by idle backends.  Survives database restarts."""

    SQL = """
    SELECT a.pid, a.application_name, a.state,
           extract(epoch FROM clock_timestamp() - a.state_change)::float8,
           extract(epoch FROM clock_timestamp() - a.xact_start)::float8,
           EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory'
                   AND l.granted)
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.application_name LIKE 'sqla_pq:%%'
    """

    def __init__(self, url: URL, interval: float = 0.25) -> None:
        super().__init__(name="fault-sampler", daemon=True)
        self.url = url
        self.interval = interval
        self.stop_event = threading.Event()
        self.idle_in_tx: list[tuple[str, float]] = []
        self.idle_advisory: list[str] = []
        self._idle_locked: dict[int, int] = {}
        self.max_xact_age: dict[str, float] = {}
        self.max_idle_in_tx: dict[str, float] = {}
        self.samples = 0
        self.max_backends = 0
        self.paused = False

    def run(self) -> None:
        import psycopg2

        from sqla_pq.db import psycopg2_dsn

        dsn = psycopg2_dsn(self.url, application_name="fault_sampler")
        dsn.setdefault("connect_timeout", 3)
        conn = None
        while not self.stop_event.wait(self.interval):
            if self.paused:
                continue
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(**dsn)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(self.SQL)
                    found = cur.fetchall()
            except Exception:  # noqa: BLE001 - the database may be down on purpose
                try:
                    if conn is not None:
                        conn.close()
                except Exception:  # noqa: BLE001
                    pass
                conn = None
                continue
            self.samples += 1
            self.max_backends = max(self.max_backends, len(found))
            idle_locked = {pid for pid, _a, state, _s, _x, adv in found if adv and state == "idle"}
            self._idle_locked = {pid: self._idle_locked.get(pid, 0) + 1 for pid in idle_locked}
            for _pid, app, state, state_age, xact_age, advisory in found:
                role = _role(app)
                if xact_age is not None:
                    self.max_xact_age[role] = max(self.max_xact_age.get(role, 0.0), xact_age)
                if state and state.startswith("idle in transaction") and state_age is not None:
                    self.max_idle_in_tx[role] = max(self.max_idle_in_tx.get(role, 0.0), state_age)
                    if state_age > 1.0:
                        self.idle_in_tx.append((app, round(state_age, 2)))
                if advisory and state == "idle" and self._idle_locked.get(_pid, 0) >= 3:
                    # idle (outside any transaction) in three samples in a row while holding an
                    # advisory lock: a session lock, leaked (a single sample can catch a
                    # transaction-scoped lock taken between the activity snapshot and pg_locks)
                    self.idle_advisory.append(app)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


def _role(app: str) -> str:
    parts = app.split(":")
    return parts[1] if len(parts) > 1 else app


# -- the scenario ------------------------------------------------------------------------------------------


class Scenario:
    """One fault scenario's world.  Built by the ``scenario`` / ``own_scenario`` fixtures."""

    def __init__(self, code: str, nodeid: str, url: URL, *, full: bool, cluster: Any = None) -> None:
        from sqla_pq import PQ
        from sqla_pq.db import create_engine

        self.code = code
        self.nodeid = nodeid
        self.url = url
        self.url_str = url.render_as_string(hide_password=False)
        self.dbname = url.database
        self.full = full
        self.cluster = cluster
        self.token = uuid.uuid4().hex
        self.engine = create_engine(url, pool_size=4, max_overflow=8)
        self.pq = PQ(self.engine)
        self.workers: list[FaultWorker] = []
        self.figures: dict[str, Any] = {}
        self.allow: set[str] = set()
        """Invariant checks a scenario knowingly waives (named in its report)."""
        self.notes: list[str] = []
        self.started = time.monotonic()
        self._cleanups: list[Callable[[], None]] = []
        self._after_kill: list[Callable[[], None]] = []
        self._job_leases: bool | None = None
        with self.engine.begin() as c:
            c.exec_driver_sql(HARNESS_DDL)
        self.sampler = Sampler(url)
        self.sampler.start()

    # -- sizes and figures ---------------------------------------------------------------------------------

    def size(self, ci: Any, full: Any) -> Any:
        return full if self.full else ci

    def record(self, **figures: Any) -> None:
        self.figures.update(figures)

    def on_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def after_workers_killed(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the invariant check once the workers are gone (close a pooler...)."""
        self._after_kill.append(fn)

    # -- SQL -------------------------------------------------------------------------------------------------

    def rows(self, sql: str, **params: Any) -> list[Any]:
        """Rows of one statement, committed (an INSERT ... RETURNING works too)."""
        with self.engine.begin() as c:
            return list(c.exec_driver_sql(sql, params or None))

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as c:
            return c.exec_driver_sql(sql, params or None).scalar()

    def execute(self, sql: str, **params: Any) -> None:
        """One committed statement; without parameters the SQL goes to the driver verbatim
        (``%`` needs no escaping: function bodies, RAISE formats)."""
        with self.engine.begin() as c:
            if params:
                c.exec_driver_sql(sql, params)
            else:
                cur = c.connection.dbapi_connection.cursor()
                try:
                    cur.execute(sql)
                finally:
                    cur.close()

    def autocommit(self, sql: str) -> None:
        """A statement that cannot run in a transaction block (VACUUM)."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.exec_driver_sql(sql)

    def db_now(self) -> Any:
        return self.scalar("SELECT clock_timestamp()")

    def status_counts(self, ids: Iterable[int] | None = None) -> dict[str, int]:
        if ids is None:
            got = self.rows("SELECT status, count(*) FROM pq_job GROUP BY status")
        else:
            got = self.rows("SELECT status, count(*) FROM pq_job WHERE id = ANY(%(ids)s) GROUP BY status",
                            ids=list(ids))
        return {s: n for s, n in got}

    # -- workers ---------------------------------------------------------------------------------------------

    def env(self, url: str | URL | None = None, faketime: str | None = None,
            timestamp_file: str | None = None, **settings: Any) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FAST)
        if url is None:
            url = self.url_str
        env["DATABASE_URL"] = url if isinstance(url, str) else url.render_as_string(hide_password=False)
        paths = [str(ROOT)]
        if faketime is not None or timestamp_file is not None:
            lib = faketime_lib()
            assert lib, "faketime is not installed"
            env["LD_PRELOAD"] = lib
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
            env["FAKETIME_NO_CACHE"] = "1"
            if timestamp_file is not None:
                env["FAKETIME_TIMESTAMP_FILE"] = timestamp_file
            else:
                env["FAKETIME"] = faketime
            paths.insert(0, str(FAKETIME_SITE))
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        env["SQLA_PQ_FAULT_TOKEN"] = self.token
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("SQLA_PQ_TEST_URL", None)
        for key, value in settings.items():
            env[key if key.startswith("SQLA_PQ_") else f"SQLA_PQ_{key.upper()}"] = str(value)
        return env

    def worker(self, *args: str, name: str | None = None, env: dict[str, str] | None = None,
               label: str | None = None, **settings: Any) -> FaultWorker:
        w = FaultWorker(self, args, env or self.env(**settings), name=name, label=label)
        self.workers.append(w)
        return w

    def live_workers(self) -> list[FaultWorker]:
        return [w for w in self.workers if w.alive()]

    def logs(self, per_worker: int = 3000) -> str:
        """Each worker's log, its routine per-job lines left out, its last ``per_worker``
        characters: what a failure report needs is every worker's warnings and errors."""
        routine = (" INFO    Got ", " INFO    Job result = ")
        parts = []
        for w in self.workers:
            lines = [ln for ln in w.output().splitlines() if not any(r in ln for r in routine)]
            parts.append(f"--- {w.label} (pid {w.pid}) ---\n" + "\n".join(lines)[-per_worker:])
        return "\n".join(parts)

    # -- the ledger ------------------------------------------------------------------------------------------

    def ledger_ids(self, n: int, seconds: float = 0.0, queue: str | None = None, tag: str = "",
                   tick: float = 0.2, **options: Any) -> list[int]:
        from tests.faults import tasks

        call = (tasks.work, (self.url_str, seconds), {"tick": tick, "tag": tag})
        ids: list[int] = []
        chunk = 5000
        for start in range(0, n, chunk):
            jobs = self.pq.enqueue_many([call] * min(chunk, n - start),
                                        **({"queue": queue} if queue else {}), **options)
            ids.extend(j.id for j in jobs)
        return ids

    def overlaps(self) -> int:
        return int(self.scalar(OVERLAP_SQL) or 0)

    def executions(self) -> dict[str, Any]:
        """Executions per job from the ledger: started and finished."""
        got = self.rows("SELECT job_id, count(*), count(finished_at) FROM fault_ledger GROUP BY job_id")
        started = [r[1] for r in got]
        finished = [r[2] for r in got]
        return {
            "jobs": len(got),
            "executions": sum(started),
            "max_started_per_job": max(started, default=0),
            "max_finished_per_job": max(finished, default=0),
            "jobs_finished_twice": sum(1 for f in finished if f > 1),
            "jobs_started_twice": sum(1 for s in started if s > 1),
            "unfinished_executions": sum(s - f for s, f in zip(started, finished)),
        }

    # -- SQL fault triggers ----------------------------------------------------------------------------------

    def fail_completions(self, job_id: int, times: int | None) -> None:
        """A SQL fault trigger: the first ``times`` UPDATEs that mark ``job_id`` succeeded raise
        (``None``: every one, until :meth:`heal_completions`).  Refusals are counted in a
        sequence, which the refused transaction cannot roll back."""
        self.execute("""
            CREATE TABLE IF NOT EXISTS fault_injection (job_id bigint PRIMARY KEY, times int);
            CREATE SEQUENCE IF NOT EXISTS fault_hits;
            CREATE OR REPLACE FUNCTION fault_fail_completion() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE lim int; hit boolean; done bigint;
            BEGIN
                IF NEW.status = 'succeeded' AND OLD.status = 'running' THEN
                    SELECT true, times INTO hit, lim FROM fault_injection WHERE job_id = NEW.id;
                    IF hit THEN
                        SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO done FROM fault_hits;
                        IF lim IS NULL OR done < lim THEN
                            PERFORM nextval('fault_hits');
                            RAISE EXCEPTION 'injected fault: completion of job % refused', NEW.id;
                        END IF;
                    END IF;
                END IF;
                RETURN NEW;
            END $$;
            DROP TRIGGER IF EXISTS fault_fail_completion ON pq_job;
            CREATE TRIGGER fault_fail_completion BEFORE UPDATE ON pq_job FOR EACH ROW
                EXECUTE FUNCTION fault_fail_completion();
        """)
        self.execute("INSERT INTO fault_injection (job_id, times) VALUES (%(j)s, %(n)s) "
                     "ON CONFLICT (job_id) DO UPDATE SET times = EXCLUDED.times", j=job_id, n=times)

    def completion_failures(self) -> int:
        """How many completion UPDATEs the fault trigger refused."""
        return int(self.scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM fault_hits") or 0)

    def heal_completions(self) -> None:
        self.execute("DROP TRIGGER IF EXISTS fault_fail_completion ON pq_job")

    # -- invariants ------------------------------------------------------------------------------------------

    def unleased_running(self) -> int:
        """Running jobs without a live lease: the job's own lease (``pq_job.lease_until``) where
        the schema has one, else its worker's (``pq_worker.expires_at``)."""
        if self._job_leases is None:
            self._job_leases = bool(self.scalar(
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'pq_job' "
                "AND column_name = 'lease_until'"))
        if self._job_leases:
            return int(self.scalar("SELECT count(*) FROM pq_job WHERE status = 'running' "
                                   "AND NOT (lease_until > now())") or 0)
        return int(self.scalar(
            "SELECT count(*) FROM pq_job j WHERE j.status = 'running' AND NOT EXISTS ("
            "SELECT 1 FROM pq_worker w WHERE w.id = j.worker_id AND w.expires_at > now())") or 0)

    def check_invariants(self) -> dict[str, Any]:
        """The one invariant check (see the module docstring).  Returns the figures; raises
        AssertionError listing every violation that the scenario did not waive."""
        report: dict[str, Any] = {}
        violations: list[str] = []
        if self.cluster is not None:
            self.cluster.ensure_running()
            wait_until(database_error_tolerant(lambda: self.scalar("SELECT 1")), 30,
                       message="the database to answer")

        # 1. settled: no running job without a live lease
        janitor = None
        if self.unleased_running() and not any(
                w.alive() and "--burst" not in w.args for w in self.workers):
            # nobody is left to rescue: a worker on no queue does (the product's own rescuer)
            janitor = self.worker("janitor-queue-none", "--isolation", "thread", label="janitor")
        try:
            wait_until(database_error_tolerant(lambda: self.unleased_running() == 0, False),
                       LEASE + RESCUE + 12, interval=0.1, message="running jobs to hold live leases")
            report["unleased_running"] = 0
        except AssertionError:
            n = self.unleased_running()
            report["unleased_running"] = n
            violations.append(f"settled: {n} running job(s) without a live lease")

        # 1b. no running job that nobody runs (a live lease, no live execution)
        try:
            wait_until(database_error_tolerant(lambda: self.scalar(ORPHAN_SQL) == 0, False),
                       0 if "orphaned-running" in self.allow else LEASE + RESCUE + 10, interval=0.2,
                       message="running ledger jobs to be running")
            report["orphaned_running"] = 0
        except AssertionError:
            n = self.scalar(ORPHAN_SQL)
            report["orphaned_running"] = n
            if "orphaned-running" not in self.allow:
                violations.append(f"lost: {n} job(s) 'running' under a live lease that nobody runs")

        # 7a. zombies: a zombie child of a live worker that stays one
        zombies_first = {p.pid for w in self.live_workers() for p in w.children()
                         if _status(p) == psutil.STATUS_ZOMBIE}
        if zombies_first:
            # an idle worker reaps at its next wake-up (S03 checks that it is prompt): give it a
            # listen check's time, then any zombie left is never reaped
            t0 = time.monotonic()
            lasting = zombies_first
            while lasting and time.monotonic() < t0 + 12.0:
                time.sleep(0.2)
                lasting = {p.pid for w in self.live_workers() for p in w.children()
                           if _status(p) == psutil.STATUS_ZOMBIE} & zombies_first
            report["zombie_children_seen"] = len(zombies_first)
            report["zombie_reaped_after_s"] = round(time.monotonic() - t0, 1)
            report["lasting_zombies"] = len(lasting)
            if lasting:
                violations.append(f"zombies: worker children {sorted(lasting)} never reaped")

        # stop every worker, then look for leftovers
        for w in self.workers:
            w.terminate_hard()
        if janitor is not None:
            self.workers.remove(janitor)
        for fn in self._after_kill:
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass
        try:
            wait_until(lambda: not self._scenario_processes(), 5, interval=0.1,
                       message="the scenario's processes to exit")
        except AssertionError:
            left = self._scenario_processes()
            report["leftover_processes"] = len(left)
            violations.append("processes left alive after their worker was killed: "
                              + ", ".join(f"{p.pid} {_status(p)} {_cmd(p)}" for p in left))
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        own_zombies = [p for p in psutil.Process().children() if _status(p) == psutil.STATUS_ZOMBIE]
        if own_zombies:
            violations.append(f"zombies of the test process: {[p.pid for p in own_zombies]}")

        try:
            wait_until(lambda: self.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'sqla_pq:%%'") == 0, 10, interval=0.1,
                message="sqla_pq backends to go")
        except AssertionError:
            violations.append("sqla_pq backends still connected after the workers were killed")

        # 2. no overlapping executions
        report["overlaps"] = self.overlaps()
        if report["overlaps"] and "overlap" not in self.allow:
            violations.append(f"overlap: {report['overlaps']} pair(s) of executions of one job overlap")

        # 3. transitions: one exit from running per attempt, none out of a final state
        twice = self.rows(
            "SELECT job_id, old_attempts, count(*) FROM fault_transition WHERE old_status = 'running' "
            "AND new_status <> 'running' GROUP BY job_id, old_attempts HAVING count(*) > 1 LIMIT 5")
        report["attempts_finished_twice"] = len(twice)
        if twice:
            violations.append(f"an attempt left 'running' twice: {twice}")
        out_of_final = self.rows(
            "SELECT job_id, old_status, new_status FROM fault_transition WHERE old_status IN "
            "('succeeded', 'failed', 'cancelled') AND new_status <> old_status LIMIT 5")
        report["left_final_state"] = len(out_of_final)
        if out_of_final and "final-states" not in self.allow:
            violations.append(f"a job left a final state: {out_of_final}")

        # 4. ticks
        report["ticks_without_job"] = int(self.scalar(
            "SELECT count(*) FROM pq_tick WHERE job_id IS NULL AND NOT skipped") or 0)
        if report["ticks_without_job"]:
            violations.append(f"{report['ticks_without_job']} tick(s) without their job")

        # 5. advisory locks
        held = self.scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())")
        report["advisory_locks_left"] = int(held or 0)
        if held:
            violations.append(f"{held} advisory lock(s) still held after the workers left")
        self.sampler.stop()
        report["idle_advisory_samples"] = len(self.sampler.idle_advisory)
        if self.sampler.idle_advisory:
            violations.append(f"advisory locks held by idle sqla_pq backends: "
                              f"{sorted(set(self.sampler.idle_advisory))}")

        # 6. idle in transaction
        report["max_idle_in_transaction_s"] = round(max(self.sampler.max_idle_in_tx.values(), default=0.0), 3)
        report["max_xact_age_s"] = {k: round(v, 2) for k, v in self.sampler.max_xact_age.items()}
        report["activity_samples"] = self.sampler.samples
        # a worker the scenario froze (SIGSTOP) mid-transaction holds it open: that is the fault
        frozen = [f".{w.pid}." for w in self.workers if w.frozen]
        idle_in_tx = [(app, age) for app, age in self.sampler.idle_in_tx
                      if not any(tag in app for tag in frozen)]
        if idle_in_tx and "idle-in-transaction" not in self.allow:
            violations.append(f"sqla_pq connections idle in transaction > 1 s: {idle_in_tx[:5]}")
        report["waived"] = sorted(self.allow)
        report["violations"] = violations
        return report

    def _scenario_processes(self) -> list[psutil.Process]:
        found = []
        me = os.getpid()
        for p in psutil.process_iter(["pid", "name"]):
            if p.pid == me:
                continue
            try:
                if self.token in (p.environ().get("SQLA_PQ_FAULT_TOKEN") or ""):
                    if _status(p) != psutil.STATUS_ZOMBIE:
                        found.append(p)
            except (psutil.Error, OSError):
                continue
        return found

    def close(self) -> None:
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass
        self.sampler.stop()
        for w in self.workers:
            w.terminate_hard()
            try:
                w.log_path.unlink()
            except OSError:
                pass
        self.engine.dispose()


def _status(p: psutil.Process) -> str:
    try:
        return p.status()
    except psutil.Error:
        return "gone"


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


def write_report(line: dict[str, Any]) -> None:
    path = os.environ.get("SQLA_PQ_FAULT_REPORT")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str, sort_keys=True) + "\n")
