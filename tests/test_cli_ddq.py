"""django-db-queue's management commands on the command line (create-job, queue-depth,
delete-old-jobs), and what ``schedule --cron`` accepts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sqla_pq import Priority
from sqla_pq.testing import drain
from tests import tasks


def finished_ago(engine, job_id: int, interval: str) -> None:
    """Backdate a finished job, as if it had finished ``interval`` ago."""
    with engine.begin() as c:
        c.exec_driver_sql(f"UPDATE pq_job SET finished_at = now() - interval '{interval}' "
                          "WHERE id = %(i)s", {"i": job_id})


# -- create-job ----------------------------------------------------------------------------------


def test_create_job_stores_name_queue_workspace_priority_and_runs_the_creation_hook(cli, pq):
    hooked = len(tasks.created)
    code, out = cli("-I", "tests.jobdefs", "create-job", "greet_twice", "--queue", "dbq",
                    "--workspace", '{"key": "value"}', "--priority", "1")
    assert code == 0, out
    (job,) = pq.list_jobs("queued", queue="dbq")
    assert out.strip() == f"created job {job.id}: greet_twice on dbq"
    assert job.task == "greet_twice" and job.workspace == {"key": "value"}
    assert job.priority == Priority.NORMAL + 1, "django-db-queue's priority: 1 runs sooner"
    assert tasks.created[hooked:] == [job.id], "the creation hook runs in the creating process"


def test_create_job_without_workspace_starts_with_an_empty_one_on_the_default_queue(cli, pq):
    code, out = cli("-I", "tests.jobdefs", "create-job", "greet_twice")
    assert code == 0, out
    (job,) = pq.list_jobs("queued")
    assert job.queue == "default" and job.workspace == {} and job.priority == Priority.NORMAL


def test_create_job_of_an_unknown_name_exits_non_zero_saying_what_to_import(cli, pq):
    code, out = cli("-I", "tests.jobdefs", "create-job", "no_such_job")
    assert code == 2
    assert "no job definition named 'no_such_job'" in out and "-I" in out
    assert "Traceback" not in out and pq.list_jobs() == []


@pytest.mark.parametrize("workspace, says", [
    ("{key: value}", "--workspace is not valid JSON"),
    ("[1, 2]", "--workspace must be a JSON object"),
])
def test_create_job_refuses_a_workspace_that_is_not_a_json_object(cli, pq, workspace, says):
    code, out = cli("-I", "tests.jobdefs", "create-job", "greet_twice", "--workspace", workspace)
    assert code == 2 and says in out and "Traceback" not in out
    assert pq.list_jobs() == []


def test_create_job_finds_definitions_only_in_the_modules_it_is_told_to_import(worker_env, pq):
    """A fresh process knows no job definitions: ``-I`` (or ``--app``) brings them."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sqla_pq", *args], env=worker_env,
                              capture_output=True, text=True, timeout=60)

    alone = run("create-job", "greet_twice")
    assert alone.returncode == 2 and "no job definition named 'greet_twice'" in alone.stderr
    imported = run("-I", "tests.jobdefs", "create-job", "greet_twice")
    assert imported.returncode == 0, imported.stderr
    (job,) = pq.list_jobs()
    assert imported.stdout.strip() == f"created job {job.id}: greet_twice on default"


# -- queue-depth ---------------------------------------------------------------------------------


def test_queue_depth_prints_waiting_jobs_per_named_queue_and_zero_for_unknown_names(cli, pq):
    pq.enqueue(tasks.add, 1, 1, queue="done")
    drain(pq)
    pq.enqueue_many([(tasks.add, (i, 1)) for i in range(2)], queue="a")
    pq.enqueue(tasks.add, 1, 1, queue="b")
    code, out = cli("queue-depth", "b", "a", "misspelled", "done")
    assert code == 0
    assert out.splitlines() == ["b: 1", "a: 2", "misspelled: 0", "done: 0"]


def test_queue_depth_without_names_lists_only_queues_with_waiting_jobs(cli, pq):
    pq.enqueue(tasks.add, 1, 1, queue="done")
    drain(pq)
    pq.enqueue_many([(tasks.add, (i, 1)) for i in range(2)], queue="a")
    pq.enqueue(tasks.add, 1, 1, queue="b")
    code, out = cli("queue-depth")
    assert code == 0 and out.splitlines() == ["a: 2", "b: 1"]


# -- delete-old-jobs -----------------------------------------------------------------------------


def test_delete_old_jobs_deletes_finished_jobs_over_a_day_old_and_keeps_the_rest(cli, pq, engine):
    old_ok, old_failed, recent = (pq.enqueue(tasks.add, 1, 1), pq.enqueue(tasks.fail),
                                  pq.enqueue(tasks.add, 2, 2))
    drain(pq)
    assert pq.get_job(old_failed.id).status == "failed"
    finished_ago(engine, old_ok.id, "25 hours")
    finished_ago(engine, old_failed.id, "25 hours")
    finished_ago(engine, recent.id, "23 hours")
    waiting = pq.enqueue(tasks.add, 3, 3, run_at="1h")
    code, out = cli("delete-old-jobs")
    assert code == 0 and out.strip() == "deleted 2 finished job(s) older than 1d"
    assert sorted(j.id for j in pq.list_jobs()) == [recent.id, waiting.id]


def test_delete_old_jobs_leaves_cancelled_jobs_to_the_pruner(cli, pq, engine):
    """As django-db-queue (COMPLETE and FAILED only); they expire ``result_ttl`` after."""
    cancelled = pq.enqueue(tasks.add, 1, 1, run_at="1h")
    pq.cancel(cancelled.id)
    finished_ago(engine, cancelled.id, "2 days")
    assert cli("delete-old-jobs")[0] == 0
    assert pq.get_job(cancelled.id).status == "cancelled"


def test_delete_old_jobs_older_than_sets_the_age(cli, pq, engine):
    job = pq.enqueue(tasks.add, 1, 1)
    drain(pq)
    finished_ago(engine, job.id, "2 hours")
    assert cli("delete-old-jobs", "--older-than", "3h") == (0, "deleted 0 finished job(s) older than 3h\n")
    assert cli("delete-old-jobs", "--older-than", "1h") == (0, "deleted 1 finished job(s) older than 1h\n")
    assert pq.list_jobs() == []


def test_delete_old_jobs_refuses_an_invalid_age(cli):
    code, out = cli("delete-old-jobs", "--older-than", "soon")
    assert code == 2 and "--older-than" in out and "Traceback" not in out


def test_prune_older_than_deletes_old_finished_jobs_like_delete_old_jobs(cli, pq, engine):
    old, recent = pq.enqueue(tasks.fail), pq.enqueue(tasks.add, 1, 1)
    drain(pq)
    finished_ago(engine, old.id, "8 days")
    code, out = cli("prune", "--older-than", "7d")
    assert code == 0 and "deleted 1 finished job(s) older than 7d" in out
    assert [j.id for j in pq.list_jobs()] == [recent.id]


# -- schedule --cron -----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [
    ["--until", "2030-01-01"], ["--repeat", "3"], ["--interval", "60"], ["--between", "9-17"],
    ["--mo"], ["--sa", "--su"],
])
def test_schedule_cron_refuses_flags_a_periodic_task_cannot_honour(cli, pq, flag):
    code, out = cli("schedule", "now", "tests.tasks.nothing", "--cron", "0 9 * * *", *flag)
    assert code == 2, out
    assert all(f in out for f in flag if f.startswith("--")) and "--cron" in out
    assert pq.schedules() == [], "nothing is stored"


def test_schedule_cron_stores_the_options_a_periodic_task_has(cli, pq):
    code, out = cli("schedule", "now", "tests.tasks.add", "1", "2", "--cron", "0 9 * * 1-5",
                    "--timezone", "Europe/Paris", "--key", "weekdays", "--queue", "reports",
                    "--max-concurrent", "2")
    assert code == 0, out
    (s,) = pq.schedules()
    assert (s.cron, s.timezone, s.key, s.queue, s.max_concurrent, s.args) == (
        "0 9 * * 1-5", "Europe/Paris", "weekdays", "reports", 2, [1, 2])


def test_schedule_cron_refuses_a_start_other_than_now(cli, pq):
    code, out = cli("schedule", "2030-01-01", "tests.tasks.nothing", "--cron", "0 9 * * *")
    assert code == 2 and "WHEN must be 'now' with --cron" in out
    assert pq.schedules() == []


def test_schedule_cron_without_max_concurrent_keeps_the_api_default_of_one(cli, pq):
    code, out = cli("schedule", "now", "tests.tasks.nothing", "--cron", "0 9 * * *")
    assert code == 0, out
    (s,) = pq.schedules()
    assert s.max_concurrent == 1  # no overlapping runs unless asked for


def test_enqueue_with_kwargs_that_are_not_a_json_object_says_so(cli, pq):
    code, out = cli("enqueue", "tests.tasks.echo", "--kwargs", "{not json")
    assert code == 2 and "--kwargs is not valid JSON" in out and "Traceback" not in out
    assert pq.list_jobs() == []
