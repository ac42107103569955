"""The WSGI application: authorization, routing, CSRF and the answers.

Every request is authorized first (no hook: 403 everywhere), then routed.  Pages answer GET and
HEAD; actions answer POST only, with a double-submit CSRF token, and redirect back (303).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from sqlalchemy.exc import DBAPIError

from ..errors import FlowNotFound, InvalidTransition, JobNotFound, PQError
from ..states import ALL_STATES
from . import data, pages
from .html import CONTENT_SECURITY_POLICY, Safe, href, page

if TYPE_CHECKING:
    from ..pq import PQ

log = logging.getLogger("sqla_pq.dashboard")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
Authorize = Callable[[Environ], bool]

CSRF_COOKIE = "sqla_pq_csrf"
CSRF_FIELD = "csrf_token"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
_LOCAL = re.compile(r"/(?!/)[A-Za-z0-9/_.~%:@!$&'()*+,;=?-]*")
"""A path under the dashboard, already percent-encoded: the only place an action goes back to."""
MAX_FORM_BYTES = 16 * 1024

SECURITY_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)


def allow_all(environ: Environ) -> bool:
    """Let every request in: only for a dashboard nobody else can reach (your own machine)."""
    return True


class NotFound(PQError):
    """No such page or record."""


class BadRequest(PQError):
    """A query parameter or form field that does not parse."""


@dataclasses.dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class Request:
    """The parts of a WSGI environ the dashboard reads, decoded once."""

    def __init__(self, environ: Environ, prefix: str) -> None:
        self.environ = environ
        self.method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        script = _wsgi_text(environ.get("SCRIPT_NAME", "")).rstrip("/")
        path = _wsgi_text(environ.get("PATH_INFO", "")) or "/"
        self.inside = not prefix or path == prefix or path.startswith(prefix + "/")
        self.path = (path[len(prefix):] or "/") if self.inside else path
        self.base = script + prefix
        query = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True)
        self.query = {k: v[0] for k, v in query.items()}
        self.cookie_token = _cookie(environ, CSRF_COOKIE)
        self.new_token: str | None = None

    @property
    def token(self) -> str:
        """The browser's CSRF token, or a new one that the answer sets as a cookie."""
        if self.cookie_token and _TOKEN.fullmatch(self.cookie_token):
            return self.cookie_token
        if self.new_token is None:
            self.new_token = secrets.token_urlsafe(32)
        return self.new_token

    def here(self) -> str:
        """This page's path and query, encoded, relative to the mount point."""
        return href("", self.path, self.query)

    def context(self) -> pages.Context:
        return pages.Context(base=self.base, here=self.here(), token=self.token)

    def who(self) -> str:
        """For the audit log line of an action."""
        address = str(self.environ.get("REMOTE_ADDR", "?"))
        user = self.environ.get("REMOTE_USER")
        return f"{user} ({address})" if user else address

    def form(self) -> dict[str, str]:
        """A url-encoded POST body (bounded); anything else reads as empty, and fails CSRF."""
        ctype = str(self.environ.get("CONTENT_TYPE", "")).split(";")[0].strip().lower()
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return {}
        if ctype != "application/x-www-form-urlencoded" or not 0 < length <= MAX_FORM_BYTES:
            return {}
        body = self.environ["wsgi.input"].read(length).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _wsgi_text(value: Any) -> str:
    """WSGI carries paths as latin-1 decoded bytes; browsers send UTF-8."""
    raw = str(value)
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return raw


def _cookie(environ: Environ, name: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(str(environ.get("HTTP_COOKIE", "")))
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


# -- routes ------------------------------------------------------------------------------------

Handler = Callable[["Dashboard", Request, "re.Match[str]"], Response]
ID = r"(\d{1,18})"
PAGES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), name) for p, name in (
        (r"/", "overview"), (r"/jobs", "jobs"), (rf"/jobs/{ID}", "job"),
        (r"/workers", "workers"), (r"/schedules", "schedules"), (r"/flows", "flows"),
        (rf"/flows/{ID}", "flow"),
    )
]
ACTIONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), name) for p, name in (
        (rf"/jobs/{ID}/(requeue|cancel|delete)", "job_action"),
        (r"/workers/stop", "stop_worker"),
        (rf"/schedules/{ID}/(pause|resume)", "schedule_action"),
        (r"/queues/(pause|resume)", "queue_action"),
    )
]


def _match(routes: Iterable[tuple[re.Pattern[str], str]], path: str) -> tuple[str, re.Match[str]] | None:
    for pattern, name in routes:
        found = pattern.fullmatch(path)
        if found:
            return name, found
    return None


class Dashboard:
    """The monitoring dashboard as a WSGI application.

    ``authorize(environ) -> bool`` decides who may see and act; without it every request is
    refused (403), with a page that says how to configure it.  ``prefix`` is a path the
    dashboard strips from ``PATH_INFO`` and puts before its links, for a mount point that does
    not move it to ``SCRIPT_NAME`` (DispatcherMiddleware and Pyramid's ``wsgiapp2`` do).
    Queries give up after ``statement_timeout`` seconds.
    """

    def __init__(self, pq: PQ, authorize: Authorize | None = None, prefix: str = "",
                 title: str = "sqla_pq", *, statement_timeout: float = 5.0,
                 page_size: int = 50) -> None:
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            raise ValueError(f"prefix {prefix!r} must start with '/' and not end with one")
        self.pq = pq
        self.authorize = authorize
        self.prefix = prefix
        self.title = title
        self.statement_timeout = statement_timeout
        self.page_size = page_size

    def __repr__(self) -> str:
        return f"<Dashboard {self.title!r} on {self.pq!r}>"

    def __call__(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        request = Request(environ, self.prefix)
        response = self._respond(request)
        headers = [("Content-Type", "text/html; charset=utf-8"), *SECURITY_HEADERS,
                   *response.headers, ("Content-Length", str(len(response.body)))]
        if request.new_token is not None and response.status < 400:
            headers.append(("Set-Cookie", self._token_cookie(request)))
        status = HTTPStatus(response.status)
        start_response(f"{status.value} {status.phrase}", headers)
        return [b"" if request.method == "HEAD" else response.body]

    # -- the steps of a request ---------------------------------------------------------------

    def _respond(self, request: Request) -> Response:
        authorize = self.authorize
        if authorize is None:
            return self._html(request, 403, "Access denied", pages.not_configured(), nav=False)
        if not _allowed(authorize, request):
            return self._html(request, 403, "Access denied",
                              pages.message("You may not use this dashboard."), nav=False)
        try:
            return self._route(request)
        except (NotFound, JobNotFound, FlowNotFound) as exc:
            return self._html(request, 404, "Not found", pages.message(str(exc)))
        except InvalidTransition as exc:
            return self._html(request, 409, "Not possible", pages.message(
                str(exc), back=href(request.base, request.path.rsplit("/", 1)[0] or "/")))
        except (BadRequest, PQError) as exc:
            return self._html(request, 400, "Bad request", pages.message(str(exc)))
        except DBAPIError as exc:
            log.warning("dashboard: %s %s failed: %s", request.method, request.path, exc.orig)
            reason = ("the query took longer than the dashboard's statement_timeout"
                      if "statement timeout" in str(exc.orig) else
                      "the database did not answer; see the server's log")
            return self._html(request, 503, "Database unavailable", pages.message(reason))

    def _route(self, request: Request) -> Response:
        if not request.inside:
            raise NotFound(f"nothing here: {request.path}")
        action = _match(ACTIONS, request.path)
        if action is not None:
            if request.method != "POST":
                return self._html(request, 405, "Method not allowed", pages.message(
                    "This address changes the queue: it takes a POST from the dashboard's "
                    "buttons."), headers=[("Allow", "POST")])
            return self._act(request, *action)
        found = _match(PAGES, request.path)
        if found is None:
            raise NotFound(f"nothing here: {request.path}")
        if request.method not in ("GET", "HEAD"):
            return self._html(request, 405, "Method not allowed", pages.message(
                "This page only answers GET."), headers=[("Allow", "GET, HEAD")])
        name, match = found
        handler: Handler = getattr(type(self), f"page_{name}")
        return handler(self, request, match)

    def _act(self, request: Request, name: str, match: re.Match[str]) -> Response:
        form = request.form()
        if not self._csrf_ok(request, form):
            return self._html(request, 403, "Access denied", pages.message(
                "The form's security token is missing or wrong: reload the page and try "
                "again."))
        handler: Callable[[Dashboard, Request, re.Match[str], dict[str, str]], str] = getattr(
            type(self), f"do_{name}")
        default = handler(self, request, match, form)
        back = form.get("next", "")
        target = back if _LOCAL.fullmatch(back) else default
        return Response(303, b"", [("Location", href(request.base, "") + target)])

    def _csrf_ok(self, request: Request, form: dict[str, str]) -> bool:
        """Double submit: the cookie (SameSite=Strict, HttpOnly) and the form field must agree;
        a cross-site POST announced by the browser is refused outright."""
        if request.environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
            return False
        cookie = request.cookie_token or ""
        field = form.get(CSRF_FIELD, "")
        if not (_TOKEN.fullmatch(cookie) and _TOKEN.fullmatch(field)):
            return False
        return hmac.compare_digest(cookie.encode(), field.encode())

    def _token_cookie(self, request: Request) -> str:
        secure = "; Secure" if request.environ.get("wsgi.url_scheme") == "https" else ""
        path = href(request.base, "") or "/"
        return (f"{CSRF_COOKIE}={request.new_token}; Path={path}; HttpOnly; "
                f"SameSite=Strict{secure}")

    def _html(self, request: Request, status: int, heading: str, body: Safe, *,
              nav: bool = True, here: str = "", headers: list[tuple[str, str]] | None = None
              ) -> Response:
        document = page(self.title, heading, body, base=request.base, here=here, nav=nav)
        return Response(status, document, headers or [])

    def _read(self) -> Any:
        return data.reading(self.pq, self.statement_timeout)

    # -- pages --------------------------------------------------------------------------------

    def page_overview(self, request: Request, match: re.Match[str]) -> Response:
        with self._read() as s:
            queues, workers = data.queues(s), data.workers(s)
            schedules, failures = data.schedules(s), data.recent_failures(s)
        body = pages.overview(request.context(), queues, workers, schedules, failures)
        return self._html(request, 200, "Overview", body, here="/")

    def page_jobs(self, request: Request, match: re.Match[str]) -> Response:
        queue = request.query.get("queue", "").strip()[:64]
        status = request.query.get("state", "")
        status = status if status in ALL_STATES else ""
        before = _int(request.query.get("before"), "before")
        with self._read() as s:
            rows, more = data.job_page(s, queue=queue or None, state=status or None,
                                       before=before, limit=self.page_size)
        heading = " · ".join(["Jobs", *(p for p in (queue, status) if p)])
        body = pages.job_list(request.context(), rows, queue=queue, status=status, more=more,
                              first=before is None)
        return self._html(request, 200, heading, body, here="/jobs")

    def page_job(self, request: Request, match: re.Match[str]) -> Response:
        job_id = int(match.group(1))
        with self._read() as s:
            detail = data.job_detail(s, job_id)
        if detail is None:
            raise NotFound(f"no job has id {job_id} (it may have been pruned)")
        body = pages.job_detail(request.context(), detail)
        return self._html(request, 200, f"Job {job_id}", body, here="/jobs")

    def page_workers(self, request: Request, match: re.Match[str]) -> Response:
        with self._read() as s:
            rows = data.workers(s)
        return self._html(request, 200, "Workers", pages.workers_page(request.context(), rows),
                          here="/workers")

    def page_schedules(self, request: Request, match: re.Match[str]) -> Response:
        with self._read() as s:
            rows = data.schedules(s)
        return self._html(request, 200, "Schedules",
                          pages.schedule_table(request.context(), rows), here="/schedules")

    def page_flows(self, request: Request, match: re.Match[str]) -> Response:
        name = request.query.get("name", "").strip()[:255]
        with self._read() as s:
            rows = data.flows(s, name=name or None)
        return self._html(request, 200, "Flows",
                          pages.flows_page(request.context(), rows, name=name), here="/flows")

    def page_flow(self, request: Request, match: re.Match[str]) -> Response:
        flow_id = int(match.group(1))
        with self._read() as s:
            found = data.flow(s, flow_id)
        if found is None:
            raise NotFound(f"no flow has id {flow_id} (it expires with its last job)")
        body = pages.flow_page(request.context(), *found)
        return self._html(request, 200, f"Flow {flow_id}", body, here="/flows")

    # -- actions: each returns where to go back to when the form did not say -----------------

    def do_job_action(self, request: Request, match: re.Match[str], form: dict[str, str]) -> str:
        job_id, verb = int(match.group(1)), match.group(2)
        if verb == "requeue":
            self.pq.requeue(job_id)
        elif verb == "cancel":
            self.pq.cancel(job_id, reason="cancelled from the dashboard")
        else:
            self.pq.delete(job_id)
        log.info("dashboard: %s job %d, by %s", verb, job_id, request.who())
        return "/jobs" if verb == "delete" else f"/jobs/{job_id}"

    def do_stop_worker(self, request: Request, match: re.Match[str], form: dict[str, str]) -> str:
        worker = form.get("worker", "")
        if not worker or not self.pq.stop_worker(worker):
            raise NotFound(f"no worker {worker!r}")
        log.info("dashboard: stop worker %s, by %s", worker, request.who())
        return "/workers"

    def do_schedule_action(self, request: Request, match: re.Match[str],
                           form: dict[str, str]) -> str:
        schedule_id, verb = int(match.group(1)), match.group(2)
        try:
            if verb == "pause":
                self.pq.pause_schedule(schedule_id)
            else:
                self.pq.resume_schedule(schedule_id)
        except PQError as exc:
            raise NotFound(str(exc)) from exc
        log.info("dashboard: %s schedule %d, by %s", verb, schedule_id, request.who())
        return "/schedules"

    def do_queue_action(self, request: Request, match: re.Match[str], form: dict[str, str]) -> str:
        verb, queue = match.group(1), form.get("queue", "")
        if verb == "pause":
            self.pq.pause_queue(queue)
        else:
            self.pq.resume_queue(queue)
        log.info("dashboard: %s queue %s, by %s", verb, queue, request.who())
        return "/"


def _allowed(authorize: Authorize, request: Request) -> bool:
    """The hook's answer; a hook that raises denies (and is logged)."""
    try:
        return bool(authorize(request.environ))
    except Exception:
        log.exception("dashboard: the authorize hook raised; access denied")
        return False


def _int(value: str | None, name: str) -> int | None:
    if value in (None, ""):
        return None
    if not re.fullmatch(r"\d{1,18}", value):
        raise BadRequest(f"{name} must be a job id")
    return int(value)
