"""The fork server: fork-mode jobs are forked by a small process, not by the worker."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from sqla_pq.execution import call, forkserver
from sqla_pq.execution.call import current_job
from sqla_pq.tasks import registry_generation
from tests import tasks
from tests.helpers import WorkerProcess, wait_until

pytestmark = pytest.mark.slow


def _facts_of(pq, *worker_args: str, worker_env) -> tuple[dict, int]:
    job = pq.enqueue(tasks.process_facts)
    w = WorkerProcess(worker_env, ["default", "--burst", *worker_args])
    try:
        assert w.wait(60) == 0, w.output()
    finally:
        w.stop()
    done = pq.get_job(job.id)
    assert done.status == "succeeded", done.error
    return done.return_value(), w.pid


def test_a_fork_job_runs_in_a_process_without_sqlalchemy_forked_by_the_fork_server(pq, worker_env):
    facts, worker_pid = _facts_of(pq, worker_env=worker_env)
    assert facts["ppid"] != worker_pid, "the worker forked the job itself"
    assert facts["sqlalchemy"] is False, "the job's process carries the worker's SQLAlchemy"
    assert facts["gc_frozen"] > 0, "the fork server did not freeze what its start-up built"
    # each shared library a fork server maps makes every job process's fork and exit dearer:
    # hashlib maps OpenSSL (only payload signing needs it), ctypes.util brings shutil,
    # tempfile and subprocess with their compression libraries (only an unusual libc needs it)
    assert facts["loaded"] == [], "the fork server loaded modules its jobs do not need"
    assert facts["warmed_up"] == forkserver.WARM_UP_RUNS, "the fork server forked it cold"


def test_without_the_fork_server_the_worker_forks_each_job_itself(pq, worker_env):
    facts, worker_pid = _facts_of(pq, "--no-fork-server", worker_env=worker_env)
    assert facts["ppid"] == worker_pid and facts["sqlalchemy"] is True
    assert facts["warmed_up"] == 0, "the worker ran the fork server's warm-up itself"


def test_the_fork_servers_warm_up_runs_only_its_own_no_op_task(capsys):
    generation, before = registry_generation(), forkserver.warmed_up
    assert forkserver._warm_up() - before == forkserver.WARM_UP_RUNS
    assert registry_generation() == generation, "the warm-up registered a task"
    assert current_job() is None, "the warm-up left its job as the current one"
    assert capsys.readouterr().err == ""


def test_a_warm_up_that_fails_says_so_and_the_server_goes_on(monkeypatch, capsys):
    def broken(job, ctx):
        raise RuntimeError("no")

    monkeypatch.setattr(call, "execute", broken)
    before = forkserver.warmed_up
    assert forkserver._warm_up() == before
    assert "warm-up stopped: RuntimeError('no')" in capsys.readouterr().err


def test_a_fork_server_killed_mid_job_fails_that_job_and_the_next_job_still_runs(pq, worker_env,
                                                                              tmp_path):
    marker = tmp_path / "server-pid"
    job = pq.enqueue(tasks.parent_pid_then_sleep, str(marker), 30)
    w = WorkerProcess(worker_env, ["default"])
    try:
        wait_until(lambda: marker.exists() and marker.read_text(), 30, message="the job to start")
        server = int(marker.read_text())
        assert server != w.pid
        os.kill(server, signal.SIGKILL)
        wait_until(lambda: pq.get_job(job.id).status == "failed", 30, message="the job to fail")
        assert "SIGKILL" in pq.get_job(job.id).error
        after = pq.enqueue(tasks.process_facts)
        wait_until(lambda: pq.get_job(after.id).status == "succeeded", 30,
                   message="a job after the server's death")
        facts = pq.get_job(after.id).return_value()
        assert facts["ppid"] not in (server, w.pid), "no new fork server was started"
        assert w.proc.poll() is None, "the worker died with its fork server"
        assert "fork server" in w.output()
    finally:
        w.stop()


def test_a_job_of_a_task_the_fork_server_cannot_find_is_forked_by_the_worker(pq, tmp_path):
    """A task registered at run time (here, inside the test) exists only in the worker."""
    pids = tmp_path / "pids"

    @pq.task(name="tests.fork_server.local")
    def local() -> int:
        with open(pids, "a", encoding="ascii") as f:
            f.write(f"{os.getppid()}\n")
        return 7

    jobs = [local.delay() for _ in range(3)]
    processed = pq.run_worker(["default"], burst=True, isolation="fork", install_signals=False,
                              maintenance=False, fork_server=True)
    assert processed == 3
    assert all(pq.get_job(j.id).return_value() == 7 for j in jobs)
    assert set(pids.read_text().split()) == {str(os.getpid())}


def test_job_processes_draw_their_own_random_numbers_and_can_start_threads(pq, worker_env):
    """The server forks with libc's fork (no after-fork callbacks): each child reseeds and
    its threading still works."""
    jobs = [pq.enqueue(tasks.random_and_thread) for _ in range(3)]
    w = WorkerProcess(worker_env, ["default", "--burst"])
    try:
        assert w.wait(60) == 0, w.output()
    finally:
        w.stop()
    values = [pq.get_job(j.id).return_value() for j in jobs]
    assert all(v["thread_ran"] for v in values)
    assert len({v["random"] for v in values}) == 3, "two jobs drew the same random number"


def test_an_after_fork_callback_of_a_task_module_runs_in_its_job_processes(pq, worker_env):
    from tests import at_fork_module

    jobs = [pq.enqueue(at_fork_module.hook_ran) for _ in range(2)]
    w = WorkerProcess(worker_env, ["default", "--burst", "-I", "tests.at_fork_module"])
    try:
        assert w.wait(60) == 0, w.output()
    finally:
        w.stop()
    assert [pq.get_job(j.id).return_value() for j in jobs] == [True, True]


def test_a_fork_server_that_cannot_start_fails_no_job(pq, tmp_path):
    """Its hook lives in a module only this process has: the server dies while starting, and
    the worker forks the jobs itself (they ran nowhere else)."""
    import sys
    import types

    module = types.ModuleType("sqla_pq_test_only_here")

    def hook(job) -> None:
        pass

    hook.__module__, hook.__qualname__ = module.__name__, "hook"
    module.hook = hook
    sys.modules[module.__name__] = module
    try:
        pids = tmp_path / "pids"
        jobs = [pq.enqueue(tasks.write_pid, str(pids)) for _ in range(3)]
        processed = pq.run_worker(["default"], burst=True, isolation="fork", install_signals=False,
                                  maintenance=False, fork_server=True, pre_execute=hook)
    finally:
        del sys.modules[module.__name__]
    assert processed == 3
    assert [pq.get_job(j.id).status for j in jobs] == ["succeeded"] * 3


def test_a_worker_in_code_forks_its_jobs_itself_unless_asked(pq):
    job = pq.enqueue(tasks.process_facts)
    pq.run_worker(["default"], burst=True, isolation="fork", install_signals=False,
                  maintenance=False)
    assert pq.get_job(job.id).return_value()["ppid"] == os.getpid()


def test_a_job_the_fork_server_refuses_and_the_worker_cannot_fork_goes_back_to_the_queue(
        pq, monkeypatch):
    """The server's fork failed (a transient refusal): the worker forks the job itself, and
    when that fails too the job goes back to the queue unstarted, to run at a later claim."""
    from sqla_pq.execution import forkserver

    real_start = forkserver.ForkServer.start
    refused: list[int] = []

    def refuse_once(self, job, *args):
        if not refused:
            refused.append(job.id)
            raise forkserver.ForkServerRefused(f"the fork server could not fork job {job.id}",
                                               transient=True)
        return real_start(self, job, *args)

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(forkserver.ForkServer, "start", refuse_once)
    monkeypatch.setattr(os, "fork", no_fork)  # the worker's; the server is a process of its own
    job = pq.enqueue(tasks.add, 2, 3)
    processed = pq.run_worker(["default"], burst=True, isolation="fork", install_signals=False,
                              maintenance=False, fork_server=True)
    assert processed == 1 and refused == [job.id]
    done = pq.get_job(job.id)
    assert done.status == "succeeded" and done.return_value() == 5
    assert (done.attempts, done.failures, done.interruptions) == (1, 0, 0)
