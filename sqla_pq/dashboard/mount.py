"""Authorization hooks that ask the host framework, for a dashboard mounted inside an app.

A mounted dashboard sees the request's WSGI environ, not the framework's request object; these
hooks rebuild (Flask) or find (Pyramid) it so the app's own login check decides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .app import Authorize, Environ


def flask_authorize(app: Any, check: Callable[[], Any]) -> Authorize:
    """Run ``check()`` inside a request context of ``app`` built from the dashboard's request,
    so it can use ``flask.session``, ``flask_login.current_user`` and ``g`` as a view does.

    The dashboard runs beside Flask (``DispatcherMiddleware``), not inside a view, so without
    this the app's login state is out of reach.
    """

    def authorize(environ: Environ) -> bool:
        with app.request_context(environ):
            return bool(check())

    return authorize


def pyramid_authorize(check: Callable[[Any], Any]) -> Authorize:
    """Call ``check(request)`` with the Pyramid request being served (its ``identity``,
    ``has_permission``...), for a dashboard mounted as a view with ``wsgiapp2``.  Outside a
    Pyramid request it denies."""

    def authorize(environ: Environ) -> bool:
        from pyramid.threadlocal import get_current_request

        request = get_current_request()
        return request is not None and bool(check(request))

    return authorize
