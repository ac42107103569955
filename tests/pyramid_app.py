"""A small Pyramid app laid out like the cookiecutter (pyramid_tm, a zope.sqlalchemy-registered
``request.dbsession``), for tests/test_pyramid.py and for ``sqla-pq worker --ini`` processes
(importable as ``tests.pyramid_app``)."""

from __future__ import annotations

import os
from typing import Any

import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqla_pq import current_job
from sqla_pq.db import create_engine
from sqla_pq.pyramid import get_registry, get_request


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "test_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]


class Ledger(Base):
    __tablename__ = "test_ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None]
    tag: Mapped[str | None]


# -- tasks: they use the job's request as a view uses its own -----------------------------------


def welcome(user_id: int) -> dict[str, Any]:
    request = get_request()
    user = request.dbsession.get(User, user_id)
    job = current_job()
    request.dbsession.add(Ledger(job_id=job.id if job else None, tag=f"welcomed {user_id}"))
    return {  # no commit: the job's transaction scope commits when the task returns
        "email": user.email if user is not None else None,
        "greeting": get_registry().settings["greeting"],
        "pid": os.getpid(),
    }


def write_then_fail(tag: str) -> None:
    get_request().dbsession.add(Ledger(tag=tag))
    raise RuntimeError("the task failed after writing")


# -- views ---------------------------------------------------------------------------------------


def _signup(request: Request) -> tuple[User, Any]:
    user = User(email=request.POST["email"])
    request.dbsession.add(user)
    request.dbsession.flush()
    return user, request.pq.enqueue(welcome, user.id)


def signup(request: Request) -> dict[str, Any]:
    user, job = _signup(request)
    return {"user": user.id, "job": job.id, "status": job.status}


def signup_crash(request: Request) -> dict[str, Any]:
    _signup(request)
    raise RuntimeError("the view crashed after the insert and the enqueue")


def signup_rejected(request: Request) -> Response:
    _signup(request)
    return Response("rejected", status=400)  # tm.commit_veto aborts 4xx responses


def enqueue_only(request: Request) -> dict[str, Any]:
    """No ORM write at all: only the Core insert of the job (the mark_changed trap)."""
    job = request.pq.enqueue("tests.tasks.add", 1, 2)
    return {"job": job.id}


def get_tm_session(factory: sessionmaker[Any], manager: Any) -> Any:
    """The cookiecutter's helper: a session joined to the request's transaction manager."""
    session = factory()
    zope.sqlalchemy.register(session, transaction_manager=manager)
    return session


def main(global_config: dict[str, Any] | None = None, **settings: Any) -> Any:
    settings.setdefault("tm.commit_veto", "pyramid_tm.default_commit_veto")
    factory = sessionmaker(create_engine(settings["sqlalchemy.url"]))
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.registry["dbsession_factory"] = factory
        config.add_request_method(
            # The cookiecutter's hook: a test may hand the request its own session.
            lambda r: r.environ.get("app.dbsession") or get_tm_session(factory, r.tm),
            "dbsession", reify=True,
        )
        config.include("sqla_pq.pyramid")
        for name, view in [("signup", signup), ("signup_crash", signup_crash),
                           ("enqueue_only", enqueue_only)]:
            config.add_route(name, "/" + name.replace("_", "-"))
            config.add_view(view, route_name=name, renderer="json", request_method="POST")
        config.add_route("signup_rejected", "/signup-rejected")
        config.add_view(signup_rejected, route_name="signup_rejected", request_method="POST")
        return config.make_wsgi_app()
