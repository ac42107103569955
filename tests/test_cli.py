"""The command line: enqueue, status, requeue, cancel, prune, migrate, demo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sqla_pq.cli import main
from sqla_pq.testing import drain
from tests import tasks


def test_enqueue_parses_json_arguments_and_options(cli, pq):
    code, out = cli("enqueue", "tests.tasks.echo", "5", "hello", "[1,2]", "--queue", "cli",
                    "--timeout", "10", "--run-at", "5m", "--kwargs", '{"k": true}')
    assert code == 0 and "enqueued job" in out
    job = pq.list_jobs("queued", queue="cli")[0]
    assert job.args == [5, "hello", [1, 2]] and job.kwargs == {"k": True} and job.timeout == 10


def test_status_shows_depths_by_state_and_workers(cli, pq):
    pq.enqueue(tasks.add, 1, 1, queue="a")
    pq.enqueue(tasks.fail, queue="a")
    drain(pq)
    pq.enqueue(tasks.add, 1, 1, queue="b")
    code, out = cli("status")
    assert code == 0
    line_a = next(line for line in out.splitlines() if line.strip().startswith("a "))
    assert line_a.split()[1:] == ["0", "0", "0", "1", "1", "0"]
    assert "Workers (0 alive)" in out


def test_requeue_cancel_and_prune(cli, pq, engine):
    failed = pq.enqueue(tasks.fail)
    waiting = pq.enqueue(tasks.add, 1, 1, run_at="1h")
    drain(pq)
    assert cli("requeue", "--all-failed")[0] == 0
    assert pq.get_job(failed.id).status == "queued"
    assert cli("cancel", str(waiting.id))[0] == 0
    assert pq.get_job(waiting.id).status == "cancelled"
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET expires_at = now() - interval '1s' WHERE id = %(i)s",
                          {"i": waiting.id})
    code, out = cli("prune")
    assert code == 0 and "deleted 1 expired job(s)" in out


def test_errors_are_one_line_with_what_to_do(cli):
    code, out = cli("cancel", "424242")
    assert code == 2 and "no job has id 424242" in out


def test_migrate_prints_sql_offline(empty_db_url, capsys):
    url = empty_db_url.render_as_string(hide_password=False)
    assert main(["--url", url, "migrate", "--sql"]) == 0
    sql = capsys.readouterr().out
    assert "CREATE TABLE pq_job" in sql and "pq_notify_v1" in sql


def test_the_demo_runs_against_database_url(url_str):
    env = dict(os.environ, DATABASE_URL=url_str)
    result = subprocess.run([sys.executable, "-m", "sqla_pq", "demo"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Using DATABASE_URL" in out
    assert "'Hello, world!'" in out and "succeeded on attempt 2" in out
    assert "never stored: it rolled back with its transaction" in out
    assert out.count("succeeded") >= 9


@pytest.mark.slow
def test_the_demo_starts_an_embedded_postgresql_without_database_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SQLA_PQ_TEST_URL")}
    result = subprocess.run([sys.executable, "-m", "sqla_pq", "demo", "--data-dir", str(tmp_path / "pg")],
                            env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting an embedded PostgreSQL" in result.stdout
    assert "'Hello, world!'" in result.stdout


@pytest.mark.slow
def test_the_benchmark_command_reports_real_figures(url_str, capsys):
    """django-pq's pqbenchmark: workers consume while jobs are enqueued; a tiny run."""
    code = main(["--url", url_str, "benchmark", "200", "-w", "2", "--isolation", "thread", "-c", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    figures = dict(line.split(None, 1) for line in out.splitlines() if line.startswith(("throughput", "jobs ")))
    assert figures["jobs"].strip() == "200"
    assert float(figures["throughput"].split()[0].replace(",", "")) > 0
    assert "latency p50 / p95 / p99" in out


def test_a_worker_runs_its_jobs_without_loading_the_orm(pq, worker_env):
    """A worker's start-up counts in every drain: it works from the Core tables alone, and
    dill, croniter and dateutil's parser wait until a job or schedule needs them."""
    ids = pq.enqueue_many([(tasks.add, (i, 1)) for i in range(20)], queue="light").ids
    code = (
        "import sys\n"
        "from sqla_pq.cli import main\n"
        "rc = main(['worker', 'light', '--burst', '-q'])\n"
        "heavy = ('sqlalchemy.orm', 'dill', 'croniter', 'dateutil.parser')\n"
        "print(rc, sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=worker_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    assert [pq.get_job(i).return_value() for i in ids] == [i + 1 for i in range(20)]


def test_the_worker_command_freezes_its_start_up_objects_and_collects_garbage_after(pq, worker_env):
    """The import-time objects (~80,000 with SQLAlchemy's) are frozen out of the
    collector's reach, and the collector is on again while jobs run (a worker left without
    one would leak every reference cycle its jobs make)."""
    job = pq.enqueue(tasks.process_facts, queue="light")
    done = subprocess.run(
        [sys.executable, "-m", "sqla_pq", "worker", "light", "--burst", "-q", "--isolation", "thread"],
        env=worker_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    facts = pq.get_job(job.id).return_value()
    assert facts["gc_enabled"] is True
    assert facts["gc_frozen"] > 10_000, facts
