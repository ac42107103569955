"""Sign up, get a welcome email: Flask + Flask-SQLAlchemy + sqla_pq, in one file.

    python examples/flask_app/app.py          # http://127.0.0.1:5000, with a worker thread

The signup view inserts the user and enqueues ``send_welcome_email`` in the same transaction:
both commit, or neither does (tick "crash before commit" on the form to see the second case).
The job page shows the job moving from ``queued`` to ``succeeded``.

Without ``DATABASE_URL`` it uses the embedded PostgreSQL (``pip install -e '.[embedded,flask]'``),
kept under ``.sqla_pq/`` in the current directory.  Instead of the worker thread, run workers
as separate processes (the job then runs in a fork child, inside the app's context):

    flask --app examples/flask_app/app.py pq worker flask-emails
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from typing import Any

from flask import Flask, abort, current_app, redirect, render_template_string, request, url_for
from flask_sqlalchemy import SQLAlchemy
from markupsafe import Markup
from sqlalchemy import DateTime, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.wrappers import Response

from sqla_pq import JobNotFound
from sqla_pq.db import normalize_url
from sqla_pq.flask import FlaskPQ


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
pq = FlaskPQ()


class User(db.Model):  # type: ignore[name-defined]
    __tablename__ = "flask_example_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True),
                                                    server_default=func.now())
    welcome_job_id: Mapped[int | None]
    welcomed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


QUEUE = "flask-emails"
"""This example's queue: its workers take no other job (the Pyramid example may share the
database)."""


@pq.task(name="flask_example.send_welcome_email", queue=QUEUE, max_retries=3, retry_in="10s")
def send_welcome_email(user_id: int) -> str:
    """Runs in a worker, inside the app's context: ``current_app`` and ``db.session`` work as
    in a view.  The user row is there, because it committed with this job."""
    user = db.session.get(User, user_id)
    if user is None:  # cannot happen: the job only exists if the user row committed
        raise LookupError(f"no user {user_id}")
    message = (f"From: {current_app.config['WELCOME_SENDER']}\nTo: {user.email}\n"
               "Subject: Welcome!\n\nThanks for signing up.")
    current_app.logger.info("sending\n%s", message)  # a real app calls its mail service here
    user.welcomed_at = func.now()
    db.session.commit()
    return message


PAGE = """<!doctype html>
<title>{{ title }}</title>
{% if refresh %}<meta http-equiv="refresh" content="1">{% endif %}
<style>body { font-family: sans-serif; max-width: 40em; margin: 2em auto }
pre { background: #f4f4f4; padding: .5em } td, th { padding: 0 .6em; text-align: left }</style>
<h1>{{ title }}</h1>
{{ body }}
"""

HOME = """
<form method="post" action="{{ url_for('signup') }}">
  <input name="email" type="email" placeholder="you@example.org" required>
  <label><input type="checkbox" name="crash" value="1"> crash before commit</label>
  <button>Sign up</button>
</form>
<h2>Signed up</h2>
<table><tr><th>email</th><th>welcome email</th></tr>
{% for user in users %}
  <tr><td>{{ user.email }}</td><td>{% if user.welcome_job_id %}
    <a href="{{ url_for('job', job_id=user.welcome_job_id) }}">job {{ user.welcome_job_id }}</a>
    {% endif %} {{ 'sent' if user.welcomed_at else 'pending' }}</td></tr>
{% else %}<tr><td colspan="2">nobody yet</td></tr>{% endfor %}
</table>
"""

JOB = """
<p>Job {{ job.id }} ({{ job.task }}) is <strong>{{ job.status }}</strong>
after {{ job.attempts }} attempt(s).</p>
{% if job.status == 'succeeded' %}<pre>{{ job.result }}</pre>{% endif %}
{% if job.error %}<pre>{{ job.error }}</pre>{% endif %}
<p><a href="{{ url_for('home') }}">back</a></p>
"""


def page(title: str, body: str, refresh: bool = False, **context: Any) -> str:
    inner = Markup(render_template_string(body, **context))  # already escaped
    return render_template_string(PAGE, title=title, refresh=refresh, body=inner)


def register_views(app: Flask) -> None:
    @app.get("/")
    def home() -> str:
        users = db.session.scalars(select(User).order_by(User.id.desc()).limit(20)).all()
        return page("Sign up", HOME, users=users)

    @app.post("/signup")
    def signup() -> Response | tuple[str, int]:
        email = request.form.get("email", "").strip().lower()
        if "@" not in email:
            return page("Sign up", "<p>That is not an email address.</p>"), 400
        if db.session.scalar(select(User.id).where(User.email == email)) is not None:
            return page("Sign up", "<p>That email has already signed up.</p>"), 409
        user = User(email=email)
        db.session.add(user)
        db.session.flush()  # user.id, for the job's argument
        job = send_welcome_email.delay(user.id)  # in db.session's transaction
        user.welcome_job_id = job.id
        if request.form.get("crash"):
            # Nothing was committed: the teardown rolls back the user and the job together.
            raise RuntimeError(f"crashed before commit; job {job.id} and {email} are gone")
        db.session.commit()  # the user and the job, together
        return redirect(url_for("job", job_id=job.id), code=303)

    @app.get("/jobs/<int:job_id>")
    def job(job_id: int) -> Any:
        try:
            found = pq.get_job(job_id)
        except JobNotFound:
            abort(404)
        if request.accept_mimetypes.best_match(["text/html", "application/json"]) == \
                "application/json":
            return {"id": found.id, "task": found.task, "status": found.status,
                    "attempts": found.attempts, "result": found.result, "error": found.error}
        return page(f"Job {found.id}", JOB, refresh=not found.is_finished, job=found)


def create_app(database_url: str | None = None, **config: Any) -> Flask:
    """The app factory (``flask --app examples/flask_app/app.py`` calls it)."""
    if database_url is None:
        from sqla_pq.embedded import database_url as default_url

        database_url = default_url()  # DATABASE_URL, else the embedded PostgreSQL
    app = Flask(__name__)
    app.config.from_mapping(
        # Flask-SQLAlchemy builds this engine; SQLAlchemy 2.1 would read a plain
        # postgresql:// URL as psycopg 3, so name psycopg2 explicitly.
        SQLALCHEMY_DATABASE_URI=normalize_url(database_url).render_as_string(hide_password=False),
        WELCOME_SENDER=os.environ.get("WELCOME_SENDER", "welcome@example.org"),
    )
    app.config.update(config)
    db.init_app(app)
    pq.init_app(app)
    register_views(app)
    return app


def create_tables(app: Flask) -> None:
    """sqla_pq's tables (its migrations), then the app's own."""
    with app.app_context():
        pq.core.migrate()
        db.create_all()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app()
    create_tables(app)
    worker = pq.worker([QUEUE], app=app, isolation="thread", concurrency=2)
    thread = threading.Thread(target=worker.run, name="sqla_pq-worker", daemon=True)
    thread.start()
    try:
        app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
    finally:
        worker.request_stop()  # finish the jobs in hand, leave the workers' table tidy
        thread.join(30)


if __name__ == "__main__":
    main()
