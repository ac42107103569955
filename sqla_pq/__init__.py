"""sqla_pq: a PostgreSQL job queue for applications that already use SQLAlchemy.

Jobs are rows written through your own Session, so a job commits or rolls back with the data
that caused it; workers claim them with ``FOR UPDATE SKIP LOCKED`` and wake on LISTEN/NOTIFY.

    from sqla_pq import PQ, Priority
    pq = PQ(Session)
    pq.queue("emails", session=session).enqueue(send_email, user.email)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .atomic import current_session
    from .enqueue import Backoff, Priority, Queue
    from .errors import (
        Cancel,
        DuplicateClientId,
        InvalidQueueName,
        InvalidTimeSpec,
        JobFailed,
        JobNotFinished,
        JobNotFound,
        JobTimeout,
        PayloadSignatureError,
        PayloadTooLarge,
        PQError,
        Retry,
        SchemaMissing,
        SerializationError,
        TaskNotAllowed,
        TaskNotImportable,
    )
    from .execution.call import ClaimedJob, current_job
    from .flows import Flow, Group, MultiStepJob
    from .metrics import JobMetric, PrometheusMetrics
    from .models import Job
    from .pq import PQ
    from .settings import Settings
    from .states import JobStatus
    from .tables import metadata

_ERRORS = (
    "Cancel", "DuplicateClientId", "InvalidQueueName", "InvalidTimeSpec", "JobFailed",
    "JobNotFinished", "JobNotFound", "JobTimeout", "PayloadSignatureError", "PayloadTooLarge",
    "PQError", "Retry", "SchemaMissing", "SerializationError", "TaskNotAllowed",
    "TaskNotImportable",
)
_WHERE: dict[str, str] = {
    "current_session": ".atomic", "Backoff": ".enqueue", "Priority": ".enqueue",
    "Queue": ".enqueue", "ClaimedJob": ".execution.call", "current_job": ".execution.call",
    "Flow": ".flows", "Group": ".flows", "MultiStepJob": ".flows", "Job": ".models",
    "JobMetric": ".metrics", "PrometheusMetrics": ".metrics",
    "PQ": ".pq", "Settings": ".settings", "JobStatus": ".states", "metadata": ".tables",
    **{name: ".errors" for name in _ERRORS},
}
"""Where each public name lives.  Names are imported on first use: a fork worker's job
processes start from a small interpreter that must not load SQLAlchemy for ``current_job``."""

__version__ = "0.1.0"

__all__ = [
    "PQ", "Backoff", "Cancel", "ClaimedJob", "DuplicateClientId", "Flow", "Group",
    "InvalidQueueName", "MultiStepJob",
    "InvalidTimeSpec", "Job", "JobFailed", "JobMetric", "PrometheusMetrics", "JobNotFinished", "JobNotFound", "JobStatus",
    "JobTimeout", "PQError", "PayloadSignatureError", "PayloadTooLarge", "Priority", "Queue",
    "Retry", "SchemaMissing", "SerializationError", "Settings", "TaskNotAllowed",
    "TaskNotImportable", "current_job", "current_session", "metadata", "__version__",
]


def __getattr__(name: str) -> Any:
    import importlib

    where = _WHERE.get(name)
    if where is None:
        try:  # a submodule, as `import sqla_pq` used to leave them: sqla_pq.tables, ...
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists; something it imports does not
            raise AttributeError(f"module 'sqla_pq' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
