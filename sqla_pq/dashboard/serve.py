"""``sqla-pq dashboard``: the dashboard served on its own (wsgiref, a thread per request).

It binds to 127.0.0.1 unless told otherwise.  Access is HTTP Basic authentication
(``--auth user:password`` or ``SQLA_PQ_DASHBOARD_AUTH``), or nothing at all (``--no-auth``),
which is refused unless the address is a loopback one; with neither, every page answers 403.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import IO, TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..errors import ConfigurationError
from .app import Dashboard, Environ, StartResponse, allow_all

if TYPE_CHECKING:
    from ..pq import PQ

log = logging.getLogger("sqla_pq.dashboard")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321
AUTH_ENV = "SQLA_PQ_DASHBOARD_AUTH"
"""``user:password``, read when ``--auth`` is not given (a command line shows in ``ps``)."""


class AccessRefused(ConfigurationError):
    """The options would serve the dashboard to others without authentication."""


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address; names are not resolved (a name can change)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_credentials(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise AccessRefused("--auth takes USER:PASSWORD, both non-empty")
    return user, password


@dataclasses.dataclass(frozen=True)
class Access:
    """Who the standalone server lets in: Basic credentials, everyone, or no one."""

    credentials: tuple[str, str] | None = None
    everyone: bool = False


def access_from(host: str, auth: str | None = None, no_auth: bool = False,
                environ: Mapping[str, str] = os.environ) -> Access:
    """Check the command line's choice before anything listens."""
    if no_auth:
        if auth:
            raise AccessRefused("--auth and --no-auth exclude each other")
        if not is_loopback(host):
            raise AccessRefused(
                f"--no-auth would let anyone who reaches {host} use the dashboard; it is only "
                "allowed on a loopback address (127.0.0.1, ::1, localhost). Use --auth "
                "USER:PASSWORD instead"
            )
        return Access(everyone=True)
    auth = auth or environ.get(AUTH_ENV)
    return Access(credentials=parse_credentials(auth)) if auth else Access()


class BasicAuth:
    """HTTP Basic authentication in front of a WSGI application: a 401 challenge unless the
    credentials match (compared in constant time, as digests, so lengths do not leak either);
    ``REMOTE_USER`` is set when they do."""

    def __init__(self, app: Any, user: str, password: str,
                 realm: str = "sqla_pq dashboard") -> None:
        self.app = app
        self.user = user
        self._expected = _digest(user, password)
        self.realm = realm

    def authenticated(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        return hmac.compare_digest(_digest(user, password), self._expected)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if not self.authenticated(str(environ.get("HTTP_AUTHORIZATION", ""))):
            body = b"Authentication required.\n"
            start_response("401 Unauthorized", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("WWW-Authenticate", f'Basic realm="{self.realm}", charset="UTF-8"'),
                ("Cache-Control", "no-store"),
            ])
            return [body]
        environ["REMOTE_USER"] = self.user
        return self.app(environ, start_response)  # type: ignore[no-any-return]


def _digest(user: str, password: str) -> bytes:
    return hashlib.sha256(f"{user}\0{password}".encode()).digest()


def _authenticated(environ: Environ) -> bool:
    """The dashboard's hook behind :class:`BasicAuth`, which sets ``REMOTE_USER``."""
    return bool(environ.get("REMOTE_USER"))


def build_app(pq: PQ, access: Access, title: str = "sqla_pq") -> Any:
    if access.credentials is not None:
        return BasicAuth(Dashboard(pq, authorize=_authenticated, title=title),
                         *access.credentials)
    return Dashboard(pq, authorize=allow_all if access.everyone else None, title=title)


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server with a thread per request, so a slow page does not block the others."""

    daemon_threads = True


class ThreadingWSGIServer6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class LoggingHandler(WSGIRequestHandler):
    """Access lines through logging rather than raw stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def make_wsgi_server(app: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> WSGIServer:
    """A listening server (``port=0``: any free port; see ``server.server_address``)."""
    server_class = ThreadingWSGIServer6 if ":" in host else ThreadingWSGIServer
    return make_server(host.strip("[]"), port, app, server_class=server_class,
                       handler_class=LoggingHandler)


def describe(access: Access, server: WSGIServer) -> str:
    host, port = str(server.server_address[0]), server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    lines = [f"sqla_pq dashboard on http://{shown}:{port}/"]
    if access.credentials is not None:
        lines.append(f"access: HTTP Basic authentication as {access.credentials[0]!r}")
        if not is_loopback(host):
            lines.append("warning: Basic credentials cross the network in clear text; put a "
                         "TLS-terminating proxy in front")
    elif access.everyone:
        lines.append("access: anyone on this machine (--no-auth)")
    else:
        lines.append(f"access: none yet, every page answers 403. Pass --auth USER:PASSWORD (or "
                     f"set {AUTH_ENV}), or --no-auth on a loopback address")
    return "\n".join(lines)


def serve(pq: PQ, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          auth: str | None = None, no_auth: bool = False, out: IO[str] | None = None) -> int:
    """Serve until interrupted."""
    access = access_from(host, auth, no_auth)
    server = make_wsgi_server(build_app(pq, access), host, port)
    print(describe(access, server), file=out or sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
