"""Sign up, get a welcome email: Pyramid + pyramid_tm + zope.sqlalchemy + sqla_pq.

The app is laid out as Pyramid's cookiecutter lays it out (``request.dbsession`` joined to
pyramid_tm's transaction), in one module.  ``main()`` is the WSGI app factory that
``development.ini`` names; ``app.py`` next to it serves it with a worker thread, and
``sqla-pq worker --ini development.ini`` runs workers as separate processes.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from typing import Any

import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPNotFound, HTTPSeeOther
from pyramid.registry import Registry
from pyramid.request import Request
from pyramid.response import Response
from sqlalchemy import DateTime, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqla_pq import JobNotFound
from sqla_pq.db import create_engine
from sqla_pq.pyramid import get_pq, get_request

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "pyramid_example_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True),
                                                    server_default=func.now())
    welcome_job_id: Mapped[int | None]
    welcomed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


# -- the task -----------------------------------------------------------------------------------


def send_welcome_email(user_id: int) -> str:
    """Runs in a worker, in a request and a transaction of its own: ``request.dbsession``
    and ``request.registry`` work as in a view, and the transaction commits when this returns.
    The user row is there, because it committed with this job."""
    request = get_request()
    user = request.dbsession.get(User, user_id)
    if user is None:  # cannot happen: the job only exists if the user row committed
        raise LookupError(f"no user {user_id}")
    sender = request.registry.settings["signup.welcome_sender"]
    message = f"From: {sender}\nTo: {user.email}\nSubject: Welcome!\n\nThanks for signing up."
    log.info("sending\n%s", message)  # a real app calls its mail service here
    user.welcomed_at = func.now()
    return message


# -- views --------------------------------------------------------------------------------------


def page(title: str, body: str, refresh: bool = False, status: int = 200) -> Response:
    meta = '<meta http-equiv="refresh" content="1">' if refresh else ""
    return Response(
        f"<!doctype html><title>{html.escape(title)}</title>{meta}"
        "<style>body { font-family: sans-serif; max-width: 40em; margin: 2em auto }"
        "pre { background: #f4f4f4; padding: .5em } td, th { padding: 0 .6em }</style>"
        f"<h1>{html.escape(title)}</h1>{body}",
        status=status,
    )


def home(request: Request) -> Response:
    users = request.dbsession.scalars(select(User).order_by(User.id.desc()).limit(20)).all()
    rows = "".join(
        f"<tr><td>{html.escape(u.email)}</td><td>"
        + (f'<a href="{request.route_path("job", id=u.welcome_job_id)}">job {u.welcome_job_id}</a> '
           if u.welcome_job_id else "")
        + ("sent" if u.welcomed_at else "pending") + "</td></tr>"
        for u in users
    ) or '<tr><td colspan="2">nobody yet</td></tr>'
    return page("Sign up", f"""
<form method="post" action="{request.route_path('signup')}">
  <input name="email" type="email" placeholder="you@example.org" required>
  <label><input type="checkbox" name="crash" value="1"> crash before commit</label>
  <button>Sign up</button>
</form>
<h2>Signed up</h2><table><tr><th>email</th><th>welcome email</th></tr>{rows}</table>""")


def signup(request: Request) -> Response:
    email = request.POST.get("email", "").strip().lower()
    if "@" not in email:
        return page("Sign up", "<p>That is not an email address.</p>", status=400)
    if request.dbsession.scalar(select(User.id).where(User.email == email)) is not None:
        return page("Sign up", "<p>That email has already signed up.</p>", status=409)
    user = User(email=email)
    request.dbsession.add(user)
    request.dbsession.flush()  # user.id, for the job's argument
    # In pyramid_tm's transaction, on sqla_pq.default_queue (pyramid-emails).
    job = request.pq.enqueue(send_welcome_email, user.id)
    user.welcome_job_id = job.id
    if request.POST.get("crash"):
        # pyramid_tm aborts the transaction: the user and the job are both gone.
        raise RuntimeError(f"crashed before commit; job {job.id} and {email} are gone")
    return HTTPSeeOther(request.route_path("job", id=job.id))  # pyramid_tm commits both


def job(request: Request) -> Any:
    try:
        found = request.pq.get_job(int(request.matchdict["id"]))
    except (JobNotFound, ValueError):
        raise HTTPNotFound() from None
    if request.accept.best_match(["text/html", "application/json"]) == "application/json":
        request.response.content_type = "application/json"
        request.response.json_body = {
            "id": found.id, "task": found.task, "status": found.status,
            "attempts": found.attempts, "result": found.result, "error": found.error,
        }
        return request.response
    body = (f"<p>Job {found.id} ({html.escape(found.task or '')}) is "
            f"<strong>{found.status}</strong> after {found.attempts} attempt(s).</p>")
    if found.status == "succeeded":
        body += f"<pre>{html.escape(str(found.result))}</pre>"
    if found.error:
        body += f"<pre>{html.escape(found.error)}</pre>"
    body += f'<p><a href="{request.route_path("home")}">back</a></p>'
    return page(f"Job {found.id}", body, refresh=not found.is_finished)


# -- the app ------------------------------------------------------------------------------------


def get_tm_session(factory: sessionmaker[Session], transaction_manager: Any) -> Session:
    """The cookiecutter's helper: a session whose transaction pyramid_tm commits or aborts."""
    session = factory()
    zope.sqlalchemy.register(session, transaction_manager=transaction_manager)
    return session


def include_models(config: Configurator) -> None:
    """The cookiecutter's ``models`` include: ``request.dbsession``, tm-managed."""
    factory = sessionmaker(create_engine(config.get_settings()["sqlalchemy.url"]))
    config.registry["dbsession_factory"] = factory
    config.add_request_method(lambda r: get_tm_session(factory, r.tm), "dbsession", reify=True)


def main(global_config: dict[str, Any] | None = None, **settings: Any) -> Any:
    """The WSGI app factory (``use = call:signup_app:main`` in development.ini)."""
    if not settings.get("sqlalchemy.url"):
        from sqla_pq.embedded import database_url

        settings["sqlalchemy.url"] = database_url()  # DATABASE_URL, else the embedded one
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include(include_models)
        config.include("sqla_pq.pyramid")
        config.add_route("home", "/")
        config.add_route("signup", "/signup")
        config.add_route("job", "/jobs/{id}")
        config.add_view(home, route_name="home", request_method="GET")
        config.add_view(signup, route_name="signup", request_method="POST")
        config.add_view(job, route_name="job", request_method="GET")
        return config.make_wsgi_app()


def create_tables(registry: Registry) -> None:
    """sqla_pq's tables (its migrations), then the app's own."""
    get_pq(registry).migrate()
    Base.metadata.create_all(registry["dbsession_factory"].kw["bind"])
