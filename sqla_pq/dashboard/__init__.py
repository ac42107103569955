"""The monitoring dashboard: a dependency-free WSGI application.

::

    from sqla_pq.dashboard import Dashboard

    dashboard = Dashboard(pq, authorize=lambda environ: is_admin(environ))

Pages: queues by state (pause, resume), jobs by queue and state (requeue, cancel, delete), a
job's every field, workers (stop), schedules (pause, resume), flows.  It denies everything
until ``authorize`` is given (``allow_all`` is the explicit opt-out for a dashboard only you
can reach), takes changes by POST with a CSRF token, escapes every value, and never loads a
payload.  Mount it in Flask with ``DispatcherMiddleware``, in Pyramid with ``wsgiapp2``, or serve
it alone with ``sqla-pq dashboard``; see docs/dashboard.md.
"""

from __future__ import annotations

from .app import Authorize, Dashboard, allow_all
from .mount import flask_authorize, pyramid_authorize

__all__ = ["Authorize", "Dashboard", "allow_all", "flask_authorize", "pyramid_authorize"]
