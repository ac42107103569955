"""Settings and their defaults (django-pq's names and values), overridable in code and environment.

Environment variables use the ``SQLA_PQ_`` prefix and the upper-case field name, for example
``SQLA_PQ_RESULT_TTL=3600`` or ``SQLA_PQ_ALLOWED_TASKS=myapp.tasks,myapp.jobs``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError

SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
"""A schema name is quoted into DDL (the trigger, CREATE SCHEMA): this rule keeps it plain."""

DEFAULT_RESULT_TTL = 500
"""Seconds a finished job is kept (django-pq's PQ_DEFAULT_RESULT_TTL)."""

DEFAULT_WORKER_TTL = 420.0
"""Seconds between fallback polls when no notification arrives (django-pq's PQ_DEFAULT_WORKER_TTL)."""

DEFAULT_JOB_TIMEOUT = 600.0
"""Seconds a job may run before it is killed and failed (django-pq's PQ_DEFAULT_JOB_TIMEOUT)."""


@dataclass(frozen=True)
class Settings:
    """Frozen: what was resolved from a Settings (a queue's call plans) stays true of it; use
    :meth:`replace` for other values."""

    result_ttl: int = DEFAULT_RESULT_TTL
    failure_ttl: int = 365 * 86400
    """Seconds a failed job is kept before the pruner deletes it (RQ keeps them a year)."""
    worker_ttl: float = DEFAULT_WORKER_TTL
    job_timeout: float = DEFAULT_JOB_TIMEOUT
    heartbeat: float = 10.0
    """Seconds between a worker's heartbeats."""
    lease: float | None = None
    """Seconds a job's lease (and a worker's row) lasts without a heartbeat renewing it; past
    it the job is rescued.  Three heartbeats."""
    rescue_interval: float | None = None
    """Seconds between rescuer sweeps; one heartbeat."""
    prune_interval: float = 60.0
    schedule_interval: float = 1.0
    """Seconds between two looks for due schedule ticks (each worker looks)."""
    max_interruptions: int = 3
    max_payload_bytes: int = 16 * 1024 * 1024
    warn_payload_bytes: int = 1024 * 1024
    secret_keys: tuple[bytes, ...] = ()
    """HMAC keys for dill payloads; the first signs, all verify (rotation)."""
    allowed_tasks: tuple[str, ...] = ()
    """Module prefixes a worker may import tasks from; empty means any non-stdlib module."""
    schema: str | None = None
    listen_check: float = 10.0
    """Seconds of silence after which a worker checks its listener with an echo (a half-open
    socket is then replaced within this plus a few seconds)."""
    listen_url: str | None = None
    """A separate URL for the LISTEN connection (bypass a pooler such as pgbouncer, which
    does not deliver notifications in transaction mode)."""
    prepared_statements: bool = True
    """Workers PREPARE their hot statements once per connection.  Turn it off behind a pooler
    that cannot keep named prepared statements (pgbouncer in transaction mode)."""
    transaction_pooler: bool = False
    """The URL goes through a transaction-mode pooler (pgbouncer, pgcat, RDS Proxy...): workers
    then neither prepare statements nor set session state (``application_name``,
    ``plan_cache_mode``), which would stick to server connections other clients then get.
    Pair it with ``listen_url`` (notifications do not pass such a pooler)."""
    hold_connection: float = 5.0
    """Seconds PQ keeps one connection of your engine's pool checked out after its own
    one-statement transactions (an enqueue without a session, ``get_job``, ``cancel``...), so
    that back-to-back calls skip the pool's checkout and return (one per engine and process;
    see :mod:`sqla_pq.held_connection`).  0 checks a connection out for every statement."""
    default_queue: str = "default"
    serial_queues: tuple[str, ...] = ("serial",)
    """Queues whose every job is serial, however it is enqueued (``pq.enqueue(f,
    queue="reports")`` included): at most one of their jobs runs at a time.  Give every
    process that enqueues the same list (``SQLA_PQ_SERIAL_QUEUES=serial,reports``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("allowed_tasks", "serial_queues"):  # one name is a list of one, not letters
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def lease_seconds(self) -> float:
        return self.lease if self.lease is not None else 3 * self.heartbeat

    @property
    def prepare(self) -> bool:
        """Whether sqla_pq's connections use server-side prepared statements."""
        return self.prepared_statements and not self.transaction_pooler

    @property
    def rescue_seconds(self) -> float:
        return self.rescue_interval if self.rescue_interval is not None else self.heartbeat

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``SQLA_PQ_*`` environment variables, then keyword overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"SQLA_PQ_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, raw)
        secret = env.get("SQLA_PQ_SECRET_KEY")
        if secret and "secret_keys" not in values:
            values["secret_keys"] = _coerce("secret_keys", secret)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "secret_keys" in values:
            values["secret_keys"] = _keys(values["secret_keys"])
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown sqla_pq settings: {', '.join(sorted(unknown))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.heartbeat <= 0:
            raise ConfigurationError(f"heartbeat must be positive, not {self.heartbeat!r}")
        if self.lease_seconds <= self.heartbeat:
            raise ConfigurationError(
                f"lease ({self.lease_seconds}s) must be longer than the heartbeat "
                f"({self.heartbeat}s); three heartbeats is the default"
            )
        if self.worker_ttl <= 0:
            raise ConfigurationError(f"worker_ttl must be positive, not {self.worker_ttl!r}")
        if self.max_payload_bytes < self.warn_payload_bytes:
            raise ConfigurationError("max_payload_bytes must be at least warn_payload_bytes")
        if self.schema is not None and not SCHEMA_NAME.match(self.schema):
            raise ConfigurationError(
                f"invalid schema name {self.schema!r}: use 1-63 letters, digits and underscores, "
                "not starting with a digit"
            )
        if self.hold_connection < 0:
            raise ConfigurationError(
                f"hold_connection must be 0 (off) or seconds, not {self.hold_connection!r}"
            )
        if self.listen_check <= 0:
            raise ConfigurationError(f"listen_check must be positive, not {self.listen_check!r}")


def _keys(value: Any) -> tuple[bytes, ...]:
    if isinstance(value, (str, bytes)):
        value = [value]
    return tuple(k.encode() if isinstance(k, str) else bytes(k) for k in value if k)


def _coerce(name: str, raw: str) -> Any:
    if name in ("secret_keys", "allowed_tasks", "serial_queues"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if name in ("schema", "default_queue", "listen_url"):
        return raw
    if name in ("prepared_statements", "transaction_pooler"):
        return raw.strip().lower() not in ("0", "false", "no", "off")
    if name == "hold_connection" and raw.strip().lower() in ("false", "no", "off"):
        return 0.0
    try:
        if name in ("result_ttl", "failure_ttl", "max_interruptions", "max_payload_bytes",
                    "warn_payload_bytes"):
            return int(raw)
        return float(raw)
    except ValueError:
        raise ConfigurationError(
            f"SQLA_PQ_{name.upper()}={raw!r} is not a number"
        ) from None
