"""Workers as real processes: fork isolation, kill -9 and rescue, signals, stop, terminate."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from tests import tasks
from tests.helpers import BackgroundWorker, WorkerProcess, rows, scalar, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def start(worker_env):
    started: list[WorkerProcess] = []

    def _start(*args: str, name: str | None = None, env: dict | None = None) -> WorkerProcess:
        w = WorkerProcess(env or worker_env, args, name=name)
        started.append(w)
        return w

    yield _start
    for w in started:
        w.stop()


def test_fork_children_that_crash_are_recorded_and_the_worker_lives_on(pq, start):
    crash = pq.enqueue(tasks.segfault)
    exits = pq.enqueue(tasks.hard_exit, 3)
    oom = pq.enqueue(tasks.sigkill_self)
    memory = pq.enqueue(tasks.allocate, 400)
    slow = pq.enqueue(tasks.sleep, 30, timeout=1)
    after = pq.enqueue(tasks.add, 1, 2)
    w = start("default", "--burst", "--memory-limit", "300M")
    assert w.wait(60) == 0, w.output()
    errors = {j.id: pq.get_job(j.id) for j in (crash, exits, oom, memory, slow)}
    assert "SIGSEGV" in errors[crash.id].error
    assert "exited with code 3" in errors[exits.id].error
    assert "SIGKILL" in errors[oom.id].error and "out of memory" in errors[oom.id].error
    assert "MemoryError" in errors[memory.id].error
    assert "JobTimeout" in errors[slow.id].error and "killed" in errors[slow.id].error
    assert all(j.status == "failed" for j in errors.values())
    assert pq.get_job(after.id).return_value() == 3


def test_a_crashing_child_counts_against_max_retries(pq, start):
    job = pq.enqueue(tasks.segfault, max_retries=2)
    assert start("default", "--burst").wait(60) == 0
    done = pq.get_job(job.id)
    assert done.status == "failed" and done.attempts == 3 and done.interruptions == 0


def test_hooks_run_in_the_fork_child_and_no_connection_crosses_the_fork(pq, tmp_path):
    """In-process fork worker: the hook runs in the child (another pid); the parent's own
    connections keep working for jobs that follow."""
    hook_pids = tmp_path / "hooks"
    job_pids = tmp_path / "jobs"
    jobs = [pq.enqueue(tasks.write_pid, str(job_pids)) for _ in range(5)]
    processed = pq.run_worker(
        ["default"], burst=True, isolation="fork", install_signals=False, maintenance=False,
        pre_execute=lambda job: hook_pids.open("a").write(f"{os.getpid()}\n"),
    )
    assert processed == 5
    hooks = [int(x) for x in hook_pids.read_text().split()]
    children = [int(x) for x in job_pids.read_text().split()]
    assert hooks == children and os.getpid() not in children and len(set(children)) == 5
    assert all(pq.get_job(j.id).status == "succeeded" for j in jobs)


def test_two_workers_run_2000_jobs_each_exactly_once(pq, start, tmp_path):
    ledger = tmp_path / "ledger"
    ids = pq.enqueue_many([(tasks.append_line, (str(ledger),))] * 2000).ids
    a = start("default", "--burst", "--isolation", "thread", "-c", "4")
    b = start("default", "--burst", "--isolation", "thread", "-c", "4")
    assert a.wait(120) == 0 and b.wait(120) == 0, a.output() + b.output()
    executions = Counter(int(line.split()[0]) for line in ledger.read_text().splitlines())
    assert set(executions) == set(ids)
    assert max(executions.values()) == 1, "a job ran twice"
    assert scalar(pq.engine, "SELECT count(*) FROM pq_job WHERE status = 'succeeded' AND attempts = 1") == 2000
    pids = {int(line.split()[2]) for line in ledger.read_text().splitlines()}
    assert pids == {a.pid, b.pid}, "both workers took part"


def test_kill_9_mid_job_the_job_completes_once_elsewhere_within_the_rescue_time(pq, start, url_str, engine):
    job = pq.enqueue(tasks.record, url_str, "victim", 1.0)
    victim = start("default", name="victim")
    wait_until(lambda: scalar(engine, "SELECT count(*) FROM test_ledger") == 1, 20, message="job start")
    victim.kill9()
    killed_at = scalar(engine, "SELECT now()")
    rescuer = start("default", name="rescuer")
    wait_until(lambda: pq.get_job(job.id).status == "succeeded", 30, message="the rescued job to finish")
    done = pq.get_job(job.id)
    assert done.attempts == 2 and done.interruptions == 1 and done.failures == 0
    ledger = rows(engine, "SELECT attempt, started_at, finished_at FROM test_ledger ORDER BY id")
    assert [r[0] for r in ledger] == [1, 2]
    assert ledger[0][2] is None, "the killed attempt never finished"
    finished = [r for r in ledger if r[2] is not None]
    assert len(finished) == 1, "the job completed more than once"
    rescue_delay = (ledger[1][1] - killed_at).total_seconds()
    # lease 2 s + sweep 0.5 s, with the rescuer's own start-up and slack
    assert rescue_delay < 8, f"rescued after {rescue_delay:.1f}s"
    rescuer.signal(signal.SIGTERM)
    assert rescuer.wait(20) == 0


def test_a_job_interrupted_max_interruptions_times_fails_as_interrupted(pq, start, url_str, engine):
    job = pq.queue().enqueue_call(tasks.record, args=(url_str, "x", 30.0), max_interruptions=1)
    victim = start("default")
    wait_until(lambda: scalar(engine, "SELECT count(*) FROM test_ledger") == 1, 20, message="job start")
    victim.kill9()
    start("other-queue")  # any worker's rescuer sweeps
    wait_until(lambda: pq.get_job(job.id).status == "failed", 30, message="the job to fail")
    done = pq.get_job(job.id)
    assert done.interruptions == 1 and "WorkerLost" in done.error and "max_interruptions" in done.error


def test_sigterm_finishes_the_job_in_hand_then_exits(pq, start, engine):
    job = pq.enqueue(tasks.sleep, 2)
    w = start("default")
    wait_until(lambda: pq.get_job(job.id).status == "running", 20, message="job start")
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0
    assert pq.get_job(job.id).status == "succeeded"
    assert scalar(engine, "SELECT count(*) FROM pq_worker") == 0
    assert "Warm shut down" in w.output()


def test_a_second_signal_aborts_the_job_and_requeues_it(pq, start):
    job = pq.enqueue(tasks.sleep, 30)
    w = start("default")
    wait_until(lambda: pq.get_job(job.id).status == "running", 20, message="job start")
    w.signal(signal.SIGTERM)
    time.sleep(0.3)
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0, w.output()
    done = pq.get_job(job.id)
    assert done.status == "queued" and done.interruptions == 1
    assert "Cold shut down" in w.output()


def test_terminate_stops_every_worker_and_waits(pq, start, worker_env, engine):
    import subprocess
    import sys

    start("default", name="one")
    two = start("default", name="two")
    for w in (two,):
        w.wait_registered(engine)
    wait_until(lambda: scalar(engine, "SELECT count(*) FROM pq_worker WHERE state <> 'starting'") == 2, 20,
               message="two workers")
    result = subprocess.run([sys.executable, "-m", "sqla_pq", "worker", "--terminate", "--wait", "20"],
                            env=worker_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "asked 2 worker(s) to stop; 0 still running" in result.stdout
    assert scalar(engine, "SELECT count(*) FROM pq_worker") == 0


def test_log_lines_follow_the_seeds(pq, start):
    pq.enqueue(tasks.add, 1, 2, queue="high")
    pq.enqueue(tasks.nothing, queue="low")
    w = start("high", "low", "--burst", "--isolation", "thread")
    assert w.wait(30) == 0
    out = w.output()
    assert "*** Listening for work on high, low" in out
    assert "Got add(1, 2) from high" in out and "Job result = 3" in out
    assert "Job " in out and "ended normally without result" in out


def test_the_worker_survives_its_connections_being_killed(pq, start, engine):
    """pg_terminate_backend of every sqla_pq connection while idle and while running a job."""
    w = start("default", "--isolation", "thread")
    w.wait_registered(engine)
    first = pq.enqueue(tasks.add, 1, 1)
    assert pq.wait(first.id, timeout=15) == 2

    def kill_all() -> int:
        return len(rows(engine, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name LIKE 'sqla_pq:%%'"))

    assert kill_all() >= 3
    second = pq.enqueue(tasks.add, 2, 2)  # the NOTIFY is lost with the listener: catch-up/poll
    assert pq.wait(second.id, timeout=20) == 4
    slow = pq.enqueue(tasks.sleep, 1.5)
    wait_until(lambda: pq.get_job(slow.id).status == "running", 15, message="job start")
    kill_all()
    assert pq.wait(slow.id, timeout=30) == 1.5, "a completion that could not be written was lost"
    assert "database unavailable" in w.output() or "broke" in w.output()
    assert w.proc.poll() is None, "the worker died"


def test_a_database_restart_is_survived(pq, start, engine, server_url):
    """Stopping every backend of the database (what a restart does to clients), twice."""
    w = start("default", "--isolation", "thread")
    w.wait_registered(engine)
    for round_ in range(2):
        rows(engine, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        engine.dispose()
        job = pq.enqueue(tasks.add, round_, 1)
        assert pq.wait(job.id, timeout=30) == round_ + 1
    assert w.proc.poll() is None


def test_a_crashed_or_timed_out_job_goes_through_the_handler_chain_and_the_failure_hook(
        pq, tmp_path):
    """The job's process is gone: the worker runs the chain (Sentry's handler is its first
    link) and the failure hook, with ChildDied or JobTimeout."""
    seen: list[tuple[int, str]] = []

    def handler(job, exc_type, exc_value, tb):
        seen.append((job.id, exc_type.__name__))

    hook_file = tmp_path / "hook"
    pq.define_job("crashy", tasks=[tasks.step_segfaults], failure_hook=tasks.on_failure)
    crashed = pq.create_job("crashy", workspace={"hook_file": str(hook_file)})
    slow = pq.enqueue(tasks.sleep, 30, timeout=0.5, max_retries=1, retry_in=0.1)
    with BackgroundWorker(pq, ["default"], isolation="fork", exc_handlers=[handler],
                          maintenance=False):
        wait_until(lambda: {pq.get_job(crashed.id).status, pq.get_job(slow.id).status}
                   == {"failed"}, 30, message="both jobs to fail")
    assert sorted(seen) == sorted([(crashed.id, "ChildDied"), (slow.id, "JobTimeout"),
                                   (slow.id, "JobTimeout")]), "one call per attempt"
    hook = hook_file.read_text()
    assert hook.startswith(f"{crashed.id} ChildDied ") and "SIGSEGV" in hook and hook.count("\n") == 1
