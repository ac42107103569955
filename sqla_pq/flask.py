"""Flask integration: :class:`FlaskPQ`, a Flask extension around :class:`~sqla_pq.PQ`.

::

    from flask_sqlalchemy import SQLAlchemy
    from sqla_pq.flask import FlaskPQ

    db = SQLAlchemy()
    pq = FlaskPQ()

    def create_app():
        app = Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://app@localhost/app"
        db.init_app(app)
        pq.init_app(app)          # after db.init_app: it enqueues through db.session
        return app

    @pq.task(name="send_welcome_email")
    def send_welcome_email(user_id: int) -> None:
        user = db.session.get(User, user_id)     # the worker runs jobs inside the app context
        ...

    @app.post("/signup")
    def signup():
        user = User(email=request.form["email"])
        db.session.add(user)
        db.session.flush()
        pq.enqueue(send_welcome_email, user.id)  # joins db.session's transaction
        db.session.commit()                      # the user and the job commit together
        ...

Enqueueing through the extension joins the app's session, the one views already use, so a
job exists only if that session commits; a request that raises, or never commits, leaves no
job behind.  ``pq.core`` is the app's plain :class:`~sqla_pq.PQ`, for jobs that should be
written in their own transaction and for everything else (``get_job``, ``cancel``...).

The extension object holds no app: each app's state lives in ``app.extensions["sqla_pq"]``, so
one ``FlaskPQ`` serves any number of apps (Flask's extension rule).  ``flask pq worker``,
``flask pq status`` and ``flask pq migrate`` come with it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast, overload

import click
from flask import Flask, current_app, has_app_context
from flask.cli import AppGroup
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from ._frameworks import SETTING_NAMES, ForkGuard, check_known, settings_from
from .enqueue import queue_for, queue_for_calls
from .errors import ConfigurationError
from .pq import PQ
from .tasks import TaskFunction, TaskOptions, check_task_options, register

if TYPE_CHECKING:
    from .enqueue import Queue
    from .execution.call import ClaimedJob
    from .models import Job
    from .worker import Worker

EXTENSION_KEY = "sqla_pq"
"""Where each app keeps its state: ``app.extensions["sqla_pq"]``."""

CONFIG_KEYS: dict[str, str] = {f"SQLA_PQ_{name.upper()}": name for name in SETTING_NAMES}
"""``SQLA_PQ_*`` config keys that set :class:`~sqla_pq.settings.Settings` fields."""

SessionSource = scoped_session[Session] | sessionmaker[Session]


@dataclasses.dataclass
class FlaskPQState:
    """One app's sqla_pq: its PQ, the session enqueue joins, and how to clean up after a job."""

    extension: FlaskPQ
    pq: PQ
    session: scoped_session[Session]
    """The app's scoped session; ``session()`` is the current app context's (or thread's)."""
    is_async: bool
    engines: Callable[[], Iterable[Engine]]
    """The app's engines (called inside an app context), disposed in each fork child."""


def _app_context_id() -> int:
    """Flask-SQLAlchemy's scope: one session per app context (hence per request)."""
    from flask import globals as flask_globals

    return id(flask_globals.app_ctx._get_current_object())  # type: ignore[attr-defined]


class FlaskPQ:
    """sqla_pq for Flask apps: enqueue joins the app's session; jobs run in the app's context.

    ``FlaskPQ()`` then ``init_app(app)`` uses Flask-SQLAlchemy's ``db.session`` (call
    ``db.init_app(app)`` first).  Without Flask-SQLAlchemy, pass ``session=``: a
    ``scoped_session`` (used as is; remove it at teardown as the Flask docs show) or a
    ``sessionmaker`` (scoped to the app context here, and removed at its teardown, as
    Flask-SQLAlchemy does); ``pq.session`` is then the request's session.

    Settings come from ``SQLA_PQ_*`` config keys (``SQLA_PQ_ALLOWED_TASKS``,
    ``SQLA_PQ_RESULT_TTL``...), over the same environment variables; ``SQLA_PQ_IS_ASYNC =
    False`` runs each job at enqueue, in the request (tests, DEBUG).
    """

    def __init__(self, app: Flask | None = None, *, session: SessionSource | None = None) -> None:
        self._session = session
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return "<FlaskPQ>"

    # -- setup -----------------------------------------------------------------------------------

    def init_app(self, app: Flask, *, session: SessionSource | None = None) -> None:
        """Set sqla_pq up for ``app``: settings, the session enqueue joins, ``flask pq``."""
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(
                f"app {app.name!r} already has a sqla_pq extension; import and use the FlaskPQ "
                "instance that was registered first instead of creating another"
            )
        for key in CONFIG_KEYS:
            app.config.setdefault(key, None)
        app.config.setdefault("SQLA_PQ_SECRET_KEY", None)
        app.config.setdefault("SQLA_PQ_IS_ASYNC", True)
        known = {*CONFIG_KEYS, "SQLA_PQ_SECRET_KEY", "SQLA_PQ_IS_ASYNC"}
        check_known((k for k in app.config if k.startswith("SQLA_PQ_")), known, spelled="{}")
        settings = settings_from({
            **{name: app.config[key] for key, name in CONFIG_KEYS.items()},
            "secret_key": app.config["SQLA_PQ_SECRET_KEY"],
        })

        source = session if session is not None else self._session
        engines: Callable[[], Iterable[Engine]]
        if source is None:
            fsa = app.extensions.get("sqlalchemy")
            if fsa is None:
                raise ConfigurationError(
                    f"FlaskPQ needs the app's session: call db.init_app(app) (Flask-SQLAlchemy) "
                    f"before pq.init_app(app), or pass session=scoped_session(...) or "
                    f"session=sessionmaker(...) (app {app.name!r})"
                )
            with app.app_context():
                engine = fsa.engine
            core = PQ(engine, settings=settings)
            scoped = fsa.session
            engines = lambda: fsa.engines.values()  # noqa: E731 - needs the app context
        elif isinstance(source, scoped_session):
            core = PQ(source, settings=settings)
            scoped = source
            engines = lambda: (core.engine,)  # noqa: E731
        elif isinstance(source, sessionmaker):
            core = PQ(source, settings=settings)
            scoped = scoped_session(source, scopefunc=_app_context_id)
            app.teardown_appcontext(lambda exc: scoped.remove())
            engines = lambda: (core.engine,)  # noqa: E731
        else:
            raise ConfigurationError(
                f"FlaskPQ(session=...) takes a scoped_session or a sessionmaker, not "
                f"{type(source).__name__}"
            )
        app.extensions[EXTENSION_KEY] = FlaskPQState(
            extension=self, pq=core, session=scoped,
            is_async=bool(app.config["SQLA_PQ_IS_ASYNC"]), engines=engines,
        )
        app.cli.add_command(pq_cli)

    def state(self, app: Flask | None = None) -> FlaskPQState:
        """The state of ``app`` (the current app by default)."""
        if app is None:
            if not has_app_context():
                raise ConfigurationError(
                    "Working outside of application context: sqla_pq's Flask extension uses the "
                    "current app's session; push a context with `with app.app_context():`, or "
                    "pass app= to worker()/state()"
                )
            app = cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
        state = app.extensions.get(EXTENSION_KEY)
        if state is None or state.extension is not self:
            raise ConfigurationError(
                f"app {app.name!r} was not set up with this FlaskPQ: call pq.init_app(app) in "
                "your app factory"
            )
        return cast(FlaskPQState, state)

    @property
    def core(self) -> PQ:
        """The current app's :class:`~sqla_pq.PQ`: its own short transactions, job lookups,
        ``cancel``, ``requeue``, ``queue_depths``, ``migrate``."""
        return self.state().pq

    @property
    def session(self) -> Session:
        """The session enqueue joins: the current app context's (``db.session()`` with
        Flask-SQLAlchemy)."""
        return self.state().session()

    # -- enqueueing ----------------------------------------------------------------------------

    def queue(self, name: str | None = None, *, session: Session | None = None,
              **defaults: Any) -> Queue:
        """A queue bound to the app's session (or ``session``): its jobs commit or roll back
        with that session.  ``pq.core.queue(name)`` writes in a transaction of its own."""
        state = self.state()
        defaults.setdefault("is_async", state.is_async)
        return state.pq.queue(name, session=session if session is not None else state.session(),
                              **defaults)

    def enqueue(self, func: Any, *args: Any, **kwargs: Any) -> Job:
        """Enqueue in the app's session, on the task's queue or the default one (``queue=``
        picks another); see :meth:`sqla_pq.Queue.enqueue`.  Commit the session
        (``db.session.commit()``) to keep the job."""
        queue_name = queue_for(func, kwargs.pop("queue", None))
        session = kwargs.pop("session", None)
        return self.queue(queue_name, session=session).enqueue(func, *args, **kwargs)

    def enqueue_call(self, func: Any, args: Sequence[Any] = (),
                     kwargs: Mapping[str, Any] | None = None, *, queue: str | None = None,
                     session: Session | None = None, **options: Any) -> Job:
        """:meth:`enqueue` with the task's arguments and the job's options kept apart."""
        return self.queue(queue_for(func, queue), session=session).enqueue_call(
            func, args=args, kwargs=kwargs, **options)

    def enqueue_many(self, calls: Iterable[Any], *, queue: str | None = None,
                     session: Session | None = None, **options: Any) -> Sequence[Job]:
        """Bulk enqueue in the app's session; see :meth:`sqla_pq.Queue.enqueue_many`."""
        calls = list(calls)
        return self.queue(queue_for_calls(calls, queue), session=session).enqueue_many(
            calls, **options)

    def get_job(self, job_id: int) -> Job:
        """The job with this id (``pq.core.get_job``)."""
        return self.core.get_job(job_id)

    @overload
    def task(self, func: Callable[..., Any], /) -> TaskFunction[Any, Any]: ...
    @overload
    def task(self, func: None = None, /, **options: Any) -> Callable[[Callable[..., Any]], TaskFunction[Any, Any]]: ...

    def task(self, func: Callable[..., Any] | None = None, /, *, name: str | None = None,
             queue: str | None = None, priority: int | None = None, timeout: Any = None,
             max_retries: int | None = None, retry_in: Any = None, result_ttl: int | None = None,
             atomic: bool = False, **extra: Any) -> Any:
        """Register a task, as :meth:`sqla_pq.PQ.task`; ``.delay()`` enqueues it in the app's
        session.  Give a ``name`` when the defining module may run as ``__main__``."""
        check_task_options(extra)  # before anything is registered

        def decorate(f: Callable[..., Any]) -> TaskFunction[Any, Any]:
            task_name = name or f"{f.__module__}.{f.__qualname__}"
            options = TaskOptions(queue=queue, priority=priority, timeout=timeout,
                                  max_retries=max_retries, retry_in=retry_in,
                                  result_ttl=result_ttl, atomic=atomic, extra=dict(extra))
            register(task_name, f, options)
            # TaskFunction only calls .queue(name, session=...), which this class provides.
            return TaskFunction(cast(PQ, self), f, task_name, options)

        return decorate(func) if func is not None else decorate

    # -- workers -------------------------------------------------------------------------------

    def worker(self, queues: Sequence[str] | str | None = None, *, app: Flask | None = None,
               **options: Any) -> Worker:
        """A worker of ``app`` (the current app by default) whose jobs run inside an app
        context of their own, with the session removed after each job; options as
        :meth:`sqla_pq.PQ.worker`."""
        state = self.state(app)
        flask_app = app if app is not None else cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
        options["call_wrapper"] = AppContextCall(flask_app, state, options.get("call_wrapper"))
        return state.pq.worker(queues, **options)

    def run_worker(self, queues: Sequence[str] | str | None = None, *, app: Flask | None = None,
                   **options: Any) -> int:
        """Run :meth:`worker` until stopped (or, with ``burst=True``, until the queues are
        empty); return how many jobs it processed."""
        return self.worker(queues, app=app, **options).run()


class AppContextCall:
    """Runs each task call inside a fresh app context, then removes the app's session, so a
    task uses ``current_app`` and ``db.session`` as a view does and leaves nothing behind for
    the next job (a worker thread runs many jobs)."""

    def __init__(self, app: Flask, state: FlaskPQState,
                 inner: Callable[[ClaimedJob, Callable[[], Any]], Any] | None = None) -> None:
        self.app = app
        self.state = state
        self.inner = inner
        self.fork_guard = ForkGuard()

    def __call__(self, job: ClaimedJob, call: Callable[[], Any]) -> Any:
        with self.app.app_context():
            self.fork_guard(self.state.engines())
            try:
                return call() if self.inner is None else self.inner(job, call)
            finally:
                self.state.session.remove()


# -- flask pq ... ---------------------------------------------------------------------------------

pq_cli = AppGroup("pq", help="sqla_pq: run workers, see the queues, migrate the tables.")


def _current_state() -> FlaskPQState:
    state = current_app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise click.ClickException("this app has no sqla_pq extension: call pq.init_app(app)")
    return cast(FlaskPQState, state)


@pq_cli.command("worker")
@click.argument("queues", nargs=-1)
@click.option("--burst", is_flag=True, help="Exit once the queues are empty.")
@click.option("--isolation", type=click.Choice(["fork", "thread"]), default="fork",
              show_default=True, help="A fork child per job, or threads of the worker.")
@click.option("-c", "--concurrency", type=int, default=1, show_default=True,
              help="Jobs at once.")
@click.option("--name", help="Worker name (default: host.pid).")
@click.option("--max-runtime", type=float, help="Cap on any job's timeout, in seconds.")
def worker_command(queues: tuple[str, ...], burst: bool, isolation: str, concurrency: int,
                   name: str | None, max_runtime: float | None) -> None:
    """Process jobs of QUEUES (all by default, in priority order), inside the app's context."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s",
                            datefmt="%H:%M:%S")
    state = _current_state()
    app = cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    state.extension.run_worker(list(queues) or None, app=app, burst=burst, isolation=isolation,
                               concurrency=concurrency, name=name, max_runtime=max_runtime)


@pq_cli.command("status")
def status_command() -> None:
    """Queue depths by state, workers."""
    from .status import render_status

    click.echo(render_status(_current_state().pq))


@pq_cli.command("migrate")
@click.option("--revision", default="heads", show_default=True)
def migrate_command(revision: str) -> None:
    """Create or upgrade the sqla_pq tables in the app's database."""
    _current_state().pq.migrate(revision)
    click.echo(f"sqla_pq schema is at {revision}")


__all__ = ["CONFIG_KEYS", "EXTENSION_KEY", "AppContextCall", "FlaskPQ", "FlaskPQState", "pq_cli"]
