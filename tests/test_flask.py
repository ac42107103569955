"""The Flask integration's promises: a job commits or rolls back with the request's session, and
runs in a real worker inside the app's context."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from sqla_pq.errors import ConfigurationError
from sqla_pq.flask import FlaskPQ
from sqla_pq.testing import assert_enqueued
from tests import flask_app
from tests.helpers import rows, scalar


@pytest.fixture
def app(url_str: str) -> Flask:
    return flask_app.create_app(url_str)


def jobs(engine: sa.Engine) -> list[tuple]:
    return [tuple(r) for r in rows(engine, "SELECT id, task, status FROM pq_job ORDER BY id")]


def users(engine: sa.Engine) -> list[str]:
    return [r[0] for r in rows(engine, "SELECT email FROM test_users ORDER BY id")]


def test_commit_promise_job_runs_in_a_fork_worker_and_sees_the_committed_user(app, engine):
    client = app.test_client()
    reply = client.post("/signup", data={"email": "ada@example.org"}).get_json()
    assert users(engine) == ["ada@example.org"]
    assert jobs(engine) == [(reply["job"], "tests.flask_app.welcome", "queued")]

    processed = flask_app.pq.run_worker(app=app, burst=True, isolation="fork",
                                        install_signals=False, maintenance=False)

    assert processed == 1
    with app.app_context():
        job = flask_app.pq.get_job(reply["job"])
    assert job.status == "succeeded", job.traceback
    result = job.return_value()
    # The task ran in the app's context, in a fork child, with the committed row at hand.
    assert result["email"] == "ada@example.org"
    assert result["app"] == "flask_test_app"
    assert result["greeting"] == "hello from the app's config"
    assert result["pid"] != __import__("os").getpid()
    # ... and its own db.session.commit() wrote.
    assert scalar(engine, "SELECT tag FROM test_ledger WHERE job_id = %(j)s", j=job.id) == \
        f"welcomed {reply['user']}"


def test_rollback_promise_a_view_that_raises_after_enqueue_leaves_no_job_and_no_user(app, engine):
    client = app.test_client()
    with pytest.raises(RuntimeError, match="crashed"):
        client.post("/signup", data={"email": "crash@example.org", "crash": "1"})
    assert users(engine) == []
    assert jobs(engine) == []


def test_rollback_promise_a_view_that_never_commits_leaves_no_job(app, engine):
    reply = app.test_client().post(
        "/signup", data={"email": "lazy@example.org", "no_commit": "1"}
    ).get_json()
    assert reply["job"]  # it was inserted, inside the request's transaction ...
    assert users(engine) == [] and jobs(engine) == []  # ... which teardown rolled back


def test_registered_task_delay_joins_the_request_session(app, engine):
    reply = app.test_client().post("/signup-delay", data={"email": "bo@example.org"}).get_json()
    assert jobs(engine) == [(reply["job"], "tests.flask_app.registered_welcome", "queued")]
    flask_app.pq.run_worker(app=app, burst=True, isolation="thread", install_signals=False,
                            maintenance=False)
    with app.app_context():
        assert flask_app.pq.get_job(reply["job"]).return_value()["email"] == "bo@example.org"


def test_the_documented_test_pattern_asserts_the_uncommitted_job_then_drains_it(app, engine):
    with app.test_request_context():
        user = flask_app.User(email="doc@example.org")
        flask_app.db.session.add(user)
        flask_app.db.session.flush()
        flask_app.pq.enqueue(flask_app.welcome, user.id)
        assert_enqueued(flask_app.db.session, task=flask_app.welcome, count=1)
        assert jobs(engine) == []  # not committed yet: other connections see nothing
        flask_app.db.session.commit()
    assert flask_app.pq.run_worker(app=app, burst=True, isolation="thread",
                                   install_signals=False) == 1


def test_flask_pq_worker_and_status_commands_process_and_report(app, engine):
    client = app.test_client()
    reply = client.post("/signup", data={"email": "cli@example.org", "queue": "mail"}).get_json()
    runner = app.test_cli_runner()

    status = runner.invoke(args=["pq", "status"])
    assert status.exit_code == 0, status.output
    assert "mail" in status.output

    result = runner.invoke(args=["pq", "worker", "mail", "--burst", "--isolation", "thread"])
    assert result.exit_code == 0, result.output
    assert jobs(engine) == [(reply["job"], "tests.flask_app.welcome", "succeeded")]


def test_is_async_false_runs_the_job_inside_the_request(url_str, engine):
    app = flask_app.create_app(url_str, SQLA_PQ_IS_ASYNC=False)
    reply = app.test_client().post("/signup", data={"email": "sync@example.org"}).get_json()
    assert reply["status"] == "succeeded"
    assert jobs(engine) == [(reply["job"], "tests.flask_app.welcome", "succeeded")]
    with app.app_context():
        assert flask_app.pq.get_job(reply["job"]).return_value()["email"] == "sync@example.org"


def test_config_keys_reach_the_apps_pq_and_each_app_keeps_its_own(url_str):
    first = flask_app.create_app(url_str, SQLA_PQ_RESULT_TTL="3600",
                                 SQLA_PQ_ALLOWED_TASKS="tests.flask_app, tests.tasks")
    second = flask_app.create_app(url_str, SQLA_PQ_DEFAULT_QUEUE="second")
    with first.app_context():
        one = flask_app.pq.core
        assert one.settings.result_ttl == 3600
        assert one.settings.allowed_tasks == ("tests.flask_app", "tests.tasks")
        assert first.config["SQLA_PQ_IS_ASYNC"] is True  # setdefault: visible in the config
    with second.app_context():
        two = flask_app.pq.core
        assert two.settings.default_queue == "second" and two.settings.result_ttl == 500
        assert flask_app.pq.queue().name == "second"
    assert one is not two


def test_misspelt_config_key_is_refused(url_str):
    with pytest.raises(ConfigurationError, match="SQLA_PQ_RESULT_TLL.*SQLA_PQ_RESULT_TTL"):
        flask_app.create_app(url_str, SQLA_PQ_RESULT_TLL=10)


def test_errors_say_what_to_do():
    ext = FlaskPQ()
    with pytest.raises(ConfigurationError, match="app_context"):
        ext.enqueue(print)
    bare = Flask("bare")
    with pytest.raises(ConfigurationError, match="db.init_app"):
        ext.init_app(bare)
    with bare.app_context(), pytest.raises(ConfigurationError, match="init_app"):
        _ = ext.core


def test_init_app_twice_is_refused(app):
    with pytest.raises(ConfigurationError, match="already has a sqla_pq extension"):
        FlaskPQ(app)


class Base(sa.orm.DeclarativeBase):
    pass


def plain_app(session: object) -> tuple[Flask, FlaskPQ]:
    app = Flask("plain")
    ext = FlaskPQ(app, session=session)  # type: ignore[arg-type]

    @app.post("/signup")
    def signup() -> dict:
        s = ext.session
        user_id = s.execute(sa.text("INSERT INTO test_users (email) VALUES (:e) RETURNING id"),
                            {"e": "plain@example.org"}).scalar_one()
        job = ext.enqueue("tests.tasks.add", 1, 2)
        s.commit()
        return {"user": user_id, "job": job.id}

    return app, ext


def test_plain_sessionmaker_is_scoped_to_the_app_context(engine):
    app, ext = plain_app(sessionmaker(engine))
    reply = app.test_client().post("/signup").get_json()
    assert users(engine) == ["plain@example.org"]
    assert jobs(engine) == [(reply["job"], "tests.tasks.add", "queued")]
    with app.app_context():
        first = ext.session
        assert ext.session is first  # one session per app context ...
    with app.app_context():
        assert ext.session is not first  # ... removed at its teardown
    assert ext.run_worker(app=app, burst=True, isolation="thread", install_signals=False,
                          maintenance=False) == 1


def test_worker_removes_a_thread_scoped_session_after_each_job(engine):
    """A plain scoped_session is per thread: without remove() the second job, in the same
    worker thread, would run in the first job's session and see its uncommitted change."""
    flask_app.plain_session.remove()
    flask_app.plain_session.configure(bind=engine)
    app, ext = plain_app(flask_app.plain_session)
    user_id = app.test_client().post("/signup").get_json()["user"]
    with app.app_context():
        with ext.core.session() as s:  # two jobs, run one after the other (concurrency 1)
            first = ext.core.queue(session=s).enqueue(flask_app.rename_without_commit, user_id)
            second = ext.core.queue(session=s).enqueue(flask_app.read_email, user_id)
    ext.run_worker(app=app, burst=True, isolation="thread", concurrency=1,
                   install_signals=False, maintenance=False)
    with app.app_context():
        assert ext.get_job(first.id).return_value() == "uncommitted@example.org"
        assert ext.get_job(second.id).return_value() == "plain@example.org"
    assert users(engine) == ["plain@example.org"]


def test_session_argument_must_be_a_session_factory():
    with pytest.raises(ConfigurationError, match="scoped_session or a sessionmaker"):
        FlaskPQ(Flask("x"), session=Session())  # type: ignore[arg-type]


def test_an_unknown_task_option_is_refused_before_the_task_is_registered():
    from sqla_pq.errors import InvalidOption
    from sqla_pq.tasks import registered

    ext = FlaskPQ()
    with pytest.raises(InvalidOption, match="unknown @pq.task option max_retry"):
        @ext.task(name="tests.flask.typo", max_retry=3)
        def typo() -> None: ...
    assert registered("tests.flask.typo") is None, "a refused task stayed registered"
