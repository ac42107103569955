"""The two example apps, end to end: real HTTP requests through the framework's test client,
a real worker process started the way their docs say, a real database."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

import pytest
import sqlalchemy as sa
import webtest

from tests.conftest import ROOT
from tests.helpers import rows

FLASK_APP = ROOT / "examples" / "flask_app" / "app.py"
PYRAMID_DIR = ROOT / "examples" / "pyramid_app"


def run_worker(cmd: list[str], env: dict[str, str], timeout: float = 60) -> str:
    """A burst worker process; its output, once it has exited normally."""
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def table(engine: sa.Engine, sql: str) -> list[tuple]:
    return [tuple(r) for r in rows(engine, sql)]


# -- Flask -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flask_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flask_signup_example", FLASK_APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # SQLAlchemy resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def flask_client(flask_example, url_str):
    app = flask_example.create_app(url_str)
    flask_example.create_tables(app)
    return app.test_client()


def test_flask_example_signup_commits_user_and_job_and_a_flask_worker_process_sends_it(
        flask_client, worker_env, engine):
    reply = flask_client.post("/signup", data={"email": "ada@example.org"})
    assert reply.status_code == 303
    job_url = reply.headers["Location"]
    assert table(engine, "SELECT email, welcomed_at FROM flask_example_users") == \
        [("ada@example.org", None)]
    assert flask_client.get(job_url, headers={"Accept": "application/json"}).json["status"] == \
        "queued"
    assert table(engine, "SELECT queue FROM pq_job") == [("flask-emails",)]  # the task's queue

    # The worker the example's docs give: `flask --app examples/flask_app/app.py pq worker`.
    run_worker([sys.executable, "-m", "flask", "--app", str(FLASK_APP), "pq", "worker",
                "flask-emails", "--burst"], worker_env)

    job = flask_client.get(job_url, headers={"Accept": "application/json"}).json
    assert job["status"] == "succeeded", job
    assert "To: ada@example.org" in job["result"]
    assert "From: welcome@example.org" in job["result"]  # the app's config, in the worker
    (welcomed_at,) = table(engine, "SELECT welcomed_at FROM flask_example_users")[0]
    assert welcomed_at is not None  # the task's db.session.commit()
    assert "is <strong>succeeded</strong>" in flask_client.get(job_url).get_data(as_text=True)


def test_flask_example_a_crash_before_commit_leaves_neither_user_nor_job(flask_client, engine):
    reply = flask_client.post("/signup", data={"email": "crash@example.org", "crash": "1"})
    assert reply.status_code == 500
    assert table(engine, "SELECT email FROM flask_example_users") == []
    assert table(engine, "SELECT id FROM pq_job") == []


# -- Pyramid -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signup_app() -> ModuleType:
    sys.path.insert(0, str(PYRAMID_DIR))
    try:
        import signup_app
    finally:
        sys.path.remove(str(PYRAMID_DIR))
    return signup_app


@pytest.fixture
def pyramid_client(signup_app, url_str):
    from pyramid.paster import get_appsettings

    settings = get_appsettings(str(PYRAMID_DIR / "development.ini"))
    wsgi = signup_app.main({}, **{**settings, "sqlalchemy.url": url_str})
    signup_app.create_tables(wsgi.registry)
    return webtest.TestApp(wsgi)


def test_pyramid_example_signup_commits_user_and_job_and_an_ini_worker_process_sends_it(
        pyramid_client, worker_env, engine):
    reply = pyramid_client.post("/signup", {"email": "ada@example.org"}, status=303)
    job_url = reply.headers["Location"]
    assert table(engine, "SELECT email, welcomed_at FROM pyramid_example_users") == \
        [("ada@example.org", None)]
    assert pyramid_client.get(job_url, headers={"Accept": "application/json"}).json["status"] \
        == "queued"
    assert table(engine, "SELECT queue FROM pq_job") == [("pyramid-emails",)]  # from the ini

    # The worker the example's docs give, on the shipped ini (DATABASE_URL names the database).
    env = {**worker_env,
           "PYTHONPATH": f"{PYRAMID_DIR}:{worker_env['PYTHONPATH']}"}
    output = run_worker([sys.executable, "-m", "sqla_pq", "worker", "--ini",
                         str(PYRAMID_DIR / "development.ini"), "pyramid-emails", "--burst"], env)

    job = pyramid_client.get(job_url, headers={"Accept": "application/json"}).json
    assert job["status"] == "succeeded", (job, output)
    assert "To: ada@example.org" in job["result"]
    assert "From: welcome@example.org" in job["result"]  # the ini's setting, from the registry
    (welcomed_at,) = table(engine, "SELECT welcomed_at FROM pyramid_example_users")[0]
    assert welcomed_at is not None  # committed by the job's own transaction
    assert "[signup_app] sending" in output  # the ini's logging configuration applies
    assert "is <strong>succeeded</strong>" in pyramid_client.get(job_url).text


def test_pyramid_example_a_crash_before_commit_leaves_neither_user_nor_job(pyramid_client,
                                                                          engine):
    with pytest.raises(RuntimeError, match="crashed before commit"):
        pyramid_client.post("/signup", {"email": "crash@example.org", "crash": "1"})
    assert table(engine, "SELECT email FROM pyramid_example_users") == []
    assert table(engine, "SELECT id FROM pq_job") == []


def test_pyramid_example_duplicate_signup_is_refused_and_enqueues_nothing(pyramid_client, engine):
    pyramid_client.post("/signup", {"email": "twice@example.org"}, status=303)
    pyramid_client.post("/signup", {"email": "twice@example.org"}, status=409)
    assert len(table(engine, "SELECT id FROM pq_job")) == 1
