"""The Pyramid integration's promises: a job exists only if pyramid_tm commits the request's
transaction, and runs in a real worker inside the app's registry and a transaction of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
import transaction
import webtest
import zope.sqlalchemy
from pyramid import testing
from sqlalchemy.orm import sessionmaker
from zope.sqlalchemy.datamanager import _SESSION_STATE

from sqla_pq.errors import ConfigurationError
from sqla_pq.pyramid import (
    get_pq,
    get_request,
    mark_changed_if_managed,
    request_pq,
    state_from_settings,
    worker,
)
from sqla_pq.testing import assert_enqueued
from tests import pyramid_app
from tests.helpers import WorkerProcess, rows, scalar


@pytest.fixture
def settings(url_str: str) -> dict[str, str]:
    return {
        "sqlalchemy.url": url_str,
        "greeting": "hello from the settings",
        "sqla_pq.allowed_tasks": "tests.pyramid_app tests.tasks",
    }


@pytest.fixture
def wsgi(settings):
    return pyramid_app.main({}, **settings)


@pytest.fixture
def client(wsgi) -> webtest.TestApp:
    return webtest.TestApp(wsgi)


def jobs(engine: sa.Engine) -> list[tuple]:
    return [tuple(r) for r in rows(engine, "SELECT id, task, status FROM pq_job ORDER BY id")]


def users(engine: sa.Engine) -> list[str]:
    return [r[0] for r in rows(engine, "SELECT email FROM test_users ORDER BY id")]


def run_burst(wsgi, isolation: str = "thread") -> int:
    return worker(wsgi.registry, burst=True, isolation=isolation, install_signals=False,
                  maintenance=False).run()


def test_commit_promise_job_runs_in_a_fork_worker_with_the_apps_registry(client, wsgi, engine):
    reply = client.post("/signup", {"email": "ada@example.org"}).json
    assert users(engine) == ["ada@example.org"]
    assert jobs(engine) == [(reply["job"], "tests.pyramid_app.welcome", "queued")]

    assert run_burst(wsgi, isolation="fork") == 1

    job = get_pq(wsgi.registry).get_job(reply["job"])
    assert job.status == "succeeded", job.traceback
    result = job.return_value()
    assert result["email"] == "ada@example.org"  # the committed row, through request.dbsession
    assert result["greeting"] == "hello from the settings"  # the app's registry
    assert result["pid"] != os.getpid()
    # The task did not commit: its job scope's transaction manager did.
    assert scalar(engine, "SELECT tag FROM test_ledger WHERE job_id = %(j)s", j=job.id) == \
        f"welcomed {reply['user']}"


def test_rollback_promise_a_view_that_raises_after_enqueue_leaves_no_job_and_no_user(client, engine):
    with pytest.raises(RuntimeError, match="crashed"):
        client.post("/signup-crash", {"email": "crash@example.org"})
    assert users(engine) == []
    assert jobs(engine) == []


def test_rollback_promise_a_vetoed_response_leaves_no_job_and_no_user(client, engine):
    client.post("/signup-rejected", {"email": "veto@example.org"}, status=400)
    assert users(engine) == []
    assert jobs(engine) == []


def test_a_request_that_only_enqueues_commits_its_job(client, engine):
    """No ORM write: without mark_changed, zope.sqlalchemy would end the transaction as
    'no work' and the job would vanish."""
    reply = client.post("/enqueue-only").json
    assert jobs(engine) == [(reply["job"], "tests.tasks.add", "queued")]


def test_without_the_mark_changed_hook_the_job_would_be_lost(client, wsgi, engine):
    """The control for the test above: it fails if the hook stops mattering."""
    get_pq(wsgi.registry).on_session_write.clear()
    client.post("/enqueue-only")
    assert jobs(engine) == []


def test_a_failing_task_rolls_back_its_own_writes(wsgi, engine):
    job = get_pq(wsgi.registry).enqueue(pyramid_app.write_then_fail, "rolled back")
    run_burst(wsgi)
    done = get_pq(wsgi.registry).get_job(job.id)
    assert done.status == "failed" and "failed after writing" in done.error
    assert scalar(engine, "SELECT count(*) FROM test_ledger WHERE tag = 'rolled back'") == 0


def test_the_cookiecutters_doomed_transaction_test_pattern_sees_the_uncommitted_job(
        client, wsgi, engine):
    """What docs/pyramid.md tells users to write: the job is visible inside the test's own
    transaction, and nothing is left once it is aborted."""
    manager = transaction.TransactionManager(explicit=True)
    manager.begin()
    manager.doom()
    dbsession = pyramid_app.get_tm_session(wsgi.registry["dbsession_factory"], manager)
    try:
        reply = client.post("/signup", {"email": "doomed@example.org"}, extra_environ={
            "tm.active": True, "tm.manager": manager, "app.dbsession": dbsession}).json
        (job,) = assert_enqueued(dbsession, task=pyramid_app.welcome, count=1)
        assert job.id == reply["job"]
    finally:
        manager.abort()
    assert users(engine) == [] and jobs(engine) == []


def test_ini_worker_process_runs_the_job_with_the_ini_settings(client, url_str, worker_env,
                                                              engine, tmp_path: Path):
    ini = tmp_path / "test.ini"
    ini.write_text(
        "[app:main]\n"
        "use = call:tests.pyramid_app:main\n"
        f"sqlalchemy.url = {url_str.replace('%', '%%')}\n"
        "greeting = hello from the ini file\n"
        "sqla_pq.allowed_tasks = tests.pyramid_app\n"
    )
    reply = client.post("/signup", {"email": "ini@example.org"}).json
    proc = WorkerProcess(worker_env, ["--ini", str(ini), "--burst"])
    try:
        assert proc.wait(30) == 0, proc.output()
        job = get_pq(client.app.registry).get_job(reply["job"])
        assert job.status == "succeeded", (job.traceback, proc.output())
        assert job.return_value()["greeting"] == "hello from the ini file"
        assert job.return_value()["email"] == "ini@example.org"
        assert job.return_value()["pid"] not in (os.getpid(), proc.pid)  # a fork child
    finally:
        proc.stop()


def test_is_async_false_runs_the_job_inside_the_request(settings, engine):
    client = webtest.TestApp(pyramid_app.main({}, **settings, **{"sqla_pq.is_async": "false"}))
    reply = client.post("/signup", {"email": "sync@example.org"}).json
    assert reply["status"] == "succeeded"
    assert jobs(engine) == [(reply["job"], "tests.pyramid_app.welcome", "succeeded")]
    # The task wrote through the view's dbsession, and pyramid_tm committed it with the view.
    assert scalar(engine, "SELECT count(*) FROM test_ledger") == 1


def test_ini_settings_reach_the_pq(url_str):
    state = state_from_settings({
        "sqla_pq.url": url_str, "sqla_pq.result_ttl": "3600", "sqla_pq.default_queue": "web",
        "sqla_pq.allowed_tasks": "myapp.tasks\nmyapp.jobs", "sqla_pq.session_attr": "db",
    })
    assert state.pq.settings.result_ttl == 3600
    assert state.pq.settings.default_queue == "web"
    assert state.pq.settings.allowed_tasks == ("myapp.tasks", "myapp.jobs")
    assert state.session_attr == "db" and state.is_async is True


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ConfigurationError, match="set sqla_pq.url"):
        state_from_settings({})
    with pytest.raises(ConfigurationError, match="sqla_pq.alowed_tasks.*sqla_pq.allowed_tasks"):
        state_from_settings({"sqlalchemy.url": "postgresql://x/y", "sqla_pq.alowed_tasks": "a"})


def test_request_pq_without_a_dbsession_says_what_to_add(settings):
    config = testing.setUp(settings=settings)
    try:
        config.include("sqla_pq.pyramid")
        request = testing.DummyRequest()
        request.registry = config.registry
        with pytest.raises(ConfigurationError, match="request.dbsession.*sqla_pq.session_attr"):
            request_pq(request).enqueue("tests.tasks.add", 1, 2)
    finally:
        testing.tearDown()


def test_get_request_outside_jobs_and_views_says_where_it_works():
    with pytest.raises(ConfigurationError, match="sqla-pq worker --ini"):
        get_request()


def test_sessions_zope_does_not_manage_are_not_marked(engine, pq):
    with sessionmaker(engine)() as session:
        pq.on_session_write.append(mark_changed_if_managed)
        pq.queue(session=session).enqueue("tests.tasks.add", 1, 2)
        assert session not in _SESSION_STATE  # marking it would have joined it to a transaction
        session.commit()
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 1


def test_a_read_only_zope_session_is_refused(engine, pq):
    manager = transaction.TransactionManager(explicit=True)
    session = sessionmaker(engine)()
    zope.sqlalchemy.register(session, initial_state="readonly", transaction_manager=manager)
    pq.on_session_write.append(mark_changed_if_managed)
    manager.begin()
    try:
        with pytest.raises(ConfigurationError, match="read-only"):
            pq.queue(session=session).enqueue("tests.tasks.add", 1, 2)
    finally:
        manager.abort()
        session.close()
