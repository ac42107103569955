"""Pyramid integration: ``config.include("sqla_pq.pyramid")``, ``request.pq``, an ini worker.

::

    def main(global_config, **settings):
        with Configurator(settings=settings) as config:
            config.include("pyramid_tm")
            config.include(".models")            # request.dbsession, registered with
                                                 # zope.sqlalchemy (the cookiecutter's layout)
            config.include("sqla_pq.pyramid")
            ...
            return config.make_wsgi_app()

    @view_config(route_name="signup", request_method="POST")
    def signup(request):
        user = User(email=request.POST["email"])
        request.dbsession.add(user)
        request.dbsession.flush()
        request.pq.enqueue(send_welcome_email, user.id)
        return ...     # pyramid_tm commits the user and the job together, or neither

Settings (``[app:main]`` of the ini): ``sqla_pq.url`` (default: ``sqlalchemy.url``),
``sqla_pq.session_attr`` (the request attribute holding the tm-joined session, default
``dbsession``), ``sqla_pq.is_async`` (``false`` runs jobs at enqueue, for tests), and every
:class:`~sqla_pq.settings.Settings` field as ``sqla_pq.<field>`` (``sqla_pq.allowed_tasks``,
``sqla_pq.default_queue``, ``sqla_pq.result_ttl``...).

Why ``mark_changed``: enqueue writes with Core statements on the session's connection, and
zope.sqlalchemy commits a session only if it saw an ORM write; a request that only enqueued
would lose its job.  The include adds a hook that marks sessions zope.sqlalchemy manages as
changed after each enqueue, and never commits anything itself.

Workers: ``sqla-pq worker --ini development.ini`` loads the app as ``pserve`` would and runs
each job inside a request of its own (``get_request()``: ``.registry``, ``.dbsession``,
``.pq``) and inside its own transaction (``request.tm``): the job's writes commit when the
task returns and roll back when it raises.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pyramid.config import Configurator
from pyramid.registry import Registry
from pyramid.request import Request
from pyramid.settings import asbool
from pyramid.threadlocal import get_current_request
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ._frameworks import SETTING_NAMES, ForkGuard, check_known, settings_from
from .enqueue import queue_for, queue_for_calls
from .errors import ConfigurationError
from .pq import PQ

if TYPE_CHECKING:
    from .enqueue import Queue
    from .execution.call import ClaimedJob
    from .models import Job
    from .worker import Worker

REGISTRY_KEY = "sqla_pq"
"""Where the app's state lives: ``registry["sqla_pq"]``."""

SETTINGS_PREFIX = "sqla_pq."
OWN_SETTINGS = ("url", "session_attr", "is_async")
"""``sqla_pq.*`` settings of the integration itself; the others are Settings fields."""

log = logging.getLogger("sqla_pq.pyramid")


@dataclasses.dataclass
class PyramidPQState:
    """The app's sqla_pq, kept in ``registry["sqla_pq"]``."""

    pq: PQ
    session_attr: str
    """The request attribute holding the session enqueue joins (``request.dbsession``)."""
    is_async: bool


def includeme(config: Configurator) -> None:
    """``config.include("sqla_pq.pyramid")``: build the app's PQ from its settings, add
    ``request.pq``, and make enqueue visible to zope.sqlalchemy."""
    settings = config.get_settings()
    state = state_from_settings(settings)
    config.registry[REGISTRY_KEY] = state
    config.add_request_method(request_pq, "pq", reify=True)


def state_from_settings(settings: Mapping[str, Any]) -> PyramidPQState:
    """The integration's state from an app's settings (the ``[app:main]`` section)."""
    ours = {k[len(SETTINGS_PREFIX):]: v for k, v in settings.items()
            if k.startswith(SETTINGS_PREFIX)}
    check_known(ours, (*OWN_SETTINGS, *SETTING_NAMES, "secret_key"),
                spelled=SETTINGS_PREFIX + "{}")
    url = ours.get("url") or settings.get("sqlalchemy.url")
    if not url:
        raise ConfigurationError(
            "sqla_pq.pyramid needs a database: set sqla_pq.url (or sqlalchemy.url) in the "
            "[app:main] section of your ini file"
        )
    core = PQ(url, settings=settings_from(
        {k: v for k, v in ours.items() if k not in OWN_SETTINGS}
    ))
    core.on_session_write.append(mark_changed_if_managed)
    return PyramidPQState(
        pq=core,
        session_attr=str(ours.get("session_attr") or "dbsession"),
        is_async=asbool(ours.get("is_async", True)),
    )


def get_state(registry: Registry) -> PyramidPQState:
    """The app's state; a clear error if the app did not include ``sqla_pq.pyramid``."""
    state = registry.get(REGISTRY_KEY)
    if not isinstance(state, PyramidPQState):
        raise ConfigurationError(
            "this Pyramid app does not include sqla_pq: add config.include('sqla_pq.pyramid') "
            "to its main()"
        )
    return state


def get_pq(registry: Registry) -> PQ:
    """The app's :class:`~sqla_pq.PQ` (its own transactions, job lookups, workers)."""
    return get_state(registry).pq


def mark_changed_if_managed(session: Session) -> None:
    """After an enqueue, tell zope.sqlalchemy that ``session`` wrote, if it manages it.

    zope.sqlalchemy keeps the sessions joined to a transaction in ``_SESSION_STATE``; a session
    registered with it has joined by now (enqueue began its transaction).  A session it does
    not manage is left alone: marking it would join it to the thread's transaction.
    """
    try:
        from zope.sqlalchemy import datamanager
    except ImportError:  # zope.sqlalchemy is not installed: no session can be managed by it
        return
    status = datamanager._SESSION_STATE.get(session)
    if status is None:
        return
    if status == datamanager.STATUS_READONLY:
        raise ConfigurationError(
            "this session is registered read-only with zope.sqlalchemy, so a job enqueued in "
            "it would be discarded; enqueue in a read-write session"
        )
    datamanager.mark_changed(session)


class RequestPQ:
    """``request.pq``: sqla_pq bound to the request's session (``request.dbsession``).

    Jobs join the session's transaction, which pyramid_tm commits after the view or aborts on
    an exception or a vetoed response; sqla_pq never commits it.  ``request.pq.core`` writes
    in transactions of its own.
    """

    def __init__(self, state: PyramidPQState, session: Callable[[], Session]) -> None:
        self._state = state
        self._session = session

    def __repr__(self) -> str:
        return f"<RequestPQ {self._state.pq!r} session=request.{self._state.session_attr}>"

    @property
    def core(self) -> PQ:
        """The app's :class:`~sqla_pq.PQ`."""
        return self._state.pq

    @property
    def session(self) -> Session:
        """The request's session, which enqueue joins."""
        return self._session()

    def queue(self, name: str | None = None, *, session: Session | None = None,
              **defaults: Any) -> Queue:
        """A queue bound to the request's session (or ``session``)."""
        defaults.setdefault("is_async", self._state.is_async)
        return self._state.pq.queue(name, session=session if session is not None else self.session,
                                    **defaults)

    def enqueue(self, func: Any, *args: Any, **kwargs: Any) -> Job:
        """Enqueue in the request's transaction, on the task's queue or the default one
        (``queue=`` picks another); see :meth:`sqla_pq.Queue.enqueue`."""
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
        """Bulk enqueue in the request's transaction; see :meth:`sqla_pq.Queue.enqueue_many`."""
        calls = list(calls)
        return self.queue(queue_for_calls(calls, queue), session=session).enqueue_many(
            calls, **options)

    def get_job(self, job_id: int) -> Job:
        """The job with this id."""
        return self._state.pq.get_job(job_id)


def request_pq(request: Request) -> RequestPQ:
    """The ``request.pq`` request method (reified: one per request)."""
    state = get_state(request.registry)
    attr = state.session_attr

    def session() -> Session:
        found = getattr(request, attr, None)
        if found is None:
            raise ConfigurationError(
                f"request.pq enqueues in request.{attr}, which this app does not provide; add "
                f"the tm-joined session as a request method (the cookiecutter's models "
                f"package), or set sqla_pq.session_attr to the attribute that holds yours"
            )
        return found  # type: ignore[no-any-return]

    return RequestPQ(state, session)


# -- inside jobs --------------------------------------------------------------------------------


def get_request() -> Request:
    """The current request: in a job run by a Pyramid worker, the job's own request (with
    ``.registry``, ``.dbsession``, ``.tm``, ``.pq``); in a view, the view's."""
    request = get_current_request()
    if request is None:
        raise ConfigurationError(
            "no Pyramid request here: get_request() works in jobs run by `sqla-pq worker --ini "
            "app.ini` (or sqla_pq.pyramid.worker(registry)) and in views"
        )
    return request


def get_registry() -> Registry:
    """The app's registry (settings, utilities), in a job or a view."""
    return get_request().registry


class JobScope:
    """Runs each task call as a script should run in a Pyramid app: in a request of its own
    (``pyramid.scripting.prepare``, so threadlocals, ``request.dbsession`` and ``request.pq``
    work) and in a transaction of its own (``request.tm``), committed when the task returns,
    aborted when it raises."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.fork_guard = ForkGuard()

    def __call__(self, job: ClaimedJob, call: Callable[[], Any]) -> Any:
        import transaction
        from pyramid.scripting import prepare

        self.fork_guard(self._app_engines())
        with prepare(registry=self.registry) as env:
            request = env["request"]
            manager = getattr(request, "tm", None) or transaction.manager
            with manager:
                return call()

    def _app_engines(self) -> Iterable[Engine]:
        """The engine of the cookiecutter's ``dbsession_factory``, if the app has one."""
        factory = self.registry.get("dbsession_factory")
        bind = getattr(factory, "kw", {}).get("bind")
        return (bind,) if isinstance(bind, Engine) else ()


def worker(registry: Registry, queues: Sequence[str] | str | None = None,
           **options: Any) -> Worker:
    """A worker of the app whose jobs run in a :class:`JobScope`; options as
    :meth:`sqla_pq.PQ.worker`."""
    if options.get("call_wrapper") is not None:
        raise ConfigurationError("sqla_pq.pyramid.worker() sets call_wrapper itself")
    options["call_wrapper"] = JobScope(registry)
    return get_pq(registry).worker(queues, **options)


@dataclasses.dataclass
class WorkerApp:
    """A Pyramid app loaded from its ini file for a worker process."""

    registry: Registry
    pq: PQ
    job_scope: JobScope
    closer: Callable[[], None]

    def close(self) -> None:
        self.closer()


def load_worker_app(config_uri: str) -> WorkerApp:
    """Load the app of ``config_uri`` (``development.ini``, ``app.ini#main``) as ``pserve``
    does, logging configured from the ini, for ``sqla-pq worker --ini``."""
    from pyramid.paster import bootstrap, setup_logging

    setup_logging(config_uri)
    # fileConfig disables loggers the ini does not name, sqla_pq's among them.
    for name, logger in logging.root.manager.loggerDict.items():
        if name.split(".")[0] == "sqla_pq" and isinstance(logger, logging.Logger):
            logger.disabled = False
    env = bootstrap(config_uri)
    registry = env["registry"]
    return WorkerApp(registry=registry, pq=get_pq(registry), job_scope=JobScope(registry),
                     closer=env["closer"])


__all__ = [
    "REGISTRY_KEY", "JobScope", "PyramidPQState", "RequestPQ", "WorkerApp", "get_pq",
    "get_registry", "get_request", "get_state", "includeme", "load_worker_app",
    "mark_changed_if_managed", "request_pq", "worker",
]
