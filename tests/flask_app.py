"""A small Flask-SQLAlchemy app for tests/test_flask.py (importable as ``tests.flask_app``)."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, current_app, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

from sqla_pq import current_job
from sqla_pq.flask import FlaskPQ


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
pq = FlaskPQ()


class User(db.Model):  # type: ignore[name-defined]
    __tablename__ = "test_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]


class Ledger(db.Model):  # type: ignore[name-defined]
    __tablename__ = "test_ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None]
    tag: Mapped[str | None]


def welcome(user_id: int) -> dict[str, Any]:
    """Uses what a view uses: current_app, the app's config, db.session and the models."""
    user = db.session.get(User, user_id)
    job = current_job()
    db.session.add(Ledger(job_id=job.id if job else None, tag=f"welcomed {user_id}"))
    db.session.commit()
    return {
        "email": user.email if user is not None else None,
        "app": current_app.name,
        "greeting": current_app.config["GREETING"],
        "pid": os.getpid(),
    }


plain_session: scoped_session[sa.orm.Session] = scoped_session(sessionmaker())
"""Flask's plain-SQLAlchemy pattern: a module-level, thread-scoped session (tests bind it)."""


def rename_without_commit(user_id: int) -> str:
    """Leaves an uncommitted change in the thread's session: the worker must not carry it
    over to the next job."""
    session = plain_session()
    session.execute(sa.text("UPDATE test_users SET email = 'uncommitted@example.org' "
                            "WHERE id = :id"), {"id": user_id})
    return str(session.execute(sa.text("SELECT email FROM test_users WHERE id = :id"),
                               {"id": user_id}).scalar_one())


def read_email(user_id: int) -> str:
    return str(plain_session().execute(sa.text("SELECT email FROM test_users WHERE id = :id"),
                                       {"id": user_id}).scalar_one())


@pq.task(name="tests.flask_app.registered_welcome")
def registered_welcome(user_id: int) -> dict[str, Any]:
    return welcome(user_id)


views = Blueprint("views", __name__)


@views.post("/signup")
def signup() -> dict[str, Any]:
    user = User(email=request.form["email"])
    db.session.add(user)
    db.session.flush()
    job = pq.enqueue(welcome, user.id, queue=request.form.get("queue", "default"))
    if request.form.get("crash"):
        raise RuntimeError("the view crashed after the insert and the enqueue")
    if not request.form.get("no_commit"):
        db.session.commit()
    return {"user": user.id, "job": job.id, "status": job.status}


@views.post("/signup-delay")
def signup_delay() -> dict[str, Any]:
    user = User(email=request.form["email"])
    db.session.add(user)
    db.session.flush()
    job = registered_welcome.delay(user.id)
    db.session.commit()
    return {"user": user.id, "job": job.id}


def create_app(url: str, **config: Any) -> Flask:
    app = Flask("flask_test_app")
    app.config.update(SQLALCHEMY_DATABASE_URI=url, GREETING="hello from the app's config",
                      TESTING=True)
    app.config.update(config)
    db.init_app(app)
    pq.init_app(app)
    app.register_blueprint(views)
    return app
