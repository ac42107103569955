"""The embedded default: a private PostgreSQL that pip installs (the ``embedded`` extra).

With no ``DATABASE_URL``, ``sqla-pq demo`` (and the test suite) start one under a local data
folder through pgserver.  It is a real PostgreSQL server, only started for you.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .errors import EmbeddedUnavailable

DEFAULT_DATA_DIR = Path(".sqla_pq") / "pgdata"


def start(data_dir: str | os.PathLike[str] | None = None, *, cleanup: str | None = "stop") -> Any:
    """Start (or attach to) the embedded server in ``data_dir``; return the pgserver handle.

    ``cleanup="stop"`` stops it when this process exits (the data stays), ``"delete"`` also
    removes the data, ``None`` leaves it running.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver
    except ImportError as exc:
        raise EmbeddedUnavailable() from exc
    import logging

    pg_log = logging.getLogger("pgserver")
    if pg_log.level == logging.NOTSET:  # it narrates every pg_ctl call at INFO
        pg_log.setLevel(logging.WARNING)
    path = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pgserver.get_server(path.resolve(), cleanup_mode=cleanup)


def url_of(server: Any, database: str = "postgres") -> str:
    """A psycopg2 URL for a database on the embedded server."""
    from sqlalchemy.engine import make_url

    url = make_url(server.get_uri())
    return url.set(drivername="postgresql+psycopg2", database=database).render_as_string(
        hide_password=False
    )


def database_url(data_dir: str | os.PathLike[str] | None = None) -> str:
    """``DATABASE_URL`` if set, else the embedded server's (started on demand)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return url_of(start(data_dir))
