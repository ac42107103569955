"""What the Flask and Pyramid integrations share: settings from a framework's configuration,
and a clean database pool in each fork child.

Private to ``sqla_pq.flask`` and ``sqla_pq.pyramid``; the core never imports it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy.engine import Engine

from .errors import ConfigurationError
from .settings import Settings

SETTING_NAMES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(Settings) if f.name != "extra"
)
"""The :class:`~sqla_pq.settings.Settings` fields a framework's configuration may set."""

_LISTS = ("allowed_tasks", "secret_keys", "serial_queues")


def settings_from(values: Mapping[str, Any]) -> Settings:
    """Settings from ``{field name: value}`` read out of a framework's configuration.

    Precedence is the core's, extended by one level: defaults, then ``SQLA_PQ_*`` environment
    variables, then the framework's configuration.  Strings (ini files, ``from_prefixed_env``)
    are coerced as environment variables are; lists may be separated by commas or whitespace.
    """
    as_env: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name == "secret_key":  # one key, as SQLA_PQ_SECRET_KEY
            name, value = "secret_keys", (value,) if isinstance(value, (str, bytes)) else value
        if name in _LISTS and isinstance(value, str):
            overrides[name] = tuple(p for p in re.split(r"[\s,]+", value) if p)
        elif isinstance(value, str) and name not in _LISTS:
            as_env[f"SQLA_PQ_{name.upper()}"] = value
        else:
            overrides[name] = value
    return Settings.from_env({**os.environ, **as_env}, **overrides)


def check_known(keys: Iterable[str], known: Iterable[str], *, spelled: str) -> None:
    """Refuse misspelt keys: a typo in a setting must not silently fall back to a default."""
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise ConfigurationError(
            f"unknown sqla_pq setting(s): {', '.join(spelled.format(k) for k in unknown)}; "
            f"the known ones are "
            f"{', '.join(spelled.format(k) for k in sorted(known))}"
        )


class ForkGuard:
    """Disposes inherited pools once in a fork child, before its job touches the database.

    The worker already disposes its own engine in each child; an application's other engines
    (Flask-SQLAlchemy binds, a Pyramid app's session factory) would otherwise hand the child
    sockets that the parent process also uses.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __call__(self, engines: Iterable[Engine]) -> None:
        pid = os.getpid()
        if pid == self.pid:
            return
        for engine in engines:
            engine.dispose(close=False)
        self.pid = pid
