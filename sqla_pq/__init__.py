"""sqla_pq: a PostgreSQL job queue for applications that already use SQLAlchemy.

Jobs are rows written through your own Session, so a job commits or rolls back with the data
that caused it; workers claim them with ``FOR UPDATE SKIP LOCKED`` and wake on LISTEN/NOTIFY.

    from sqla_pq import PQ, Priority
    pq = PQ(Session)
    pq.queue("emails", session=session).enqueue(send_email, user.email)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from .pq import PQ
from .settings import Settings
from .states import JobStatus
from .tables import metadata

if TYPE_CHECKING:
    from .models import Job

__version__ = "0.1.0"

__all__ = [
    "PQ", "Backoff", "Cancel", "ClaimedJob", "DuplicateClientId", "Flow", "Group",
    "InvalidQueueName", "MultiStepJob",
    "InvalidTimeSpec", "Job", "JobFailed", "JobNotFinished", "JobNotFound", "JobStatus",
    "JobTimeout", "PQError", "PayloadSignatureError", "PayloadTooLarge", "Priority", "Queue",
    "Retry", "SchemaMissing", "SerializationError", "Settings", "TaskNotAllowed",
    "TaskNotImportable", "current_job", "current_session", "metadata", "__version__",
]


def __getattr__(name: str) -> Any:
    """``Job`` (the ORM class) is imported on first use: a worker process never needs the ORM."""
    if name == "Job":
        from .models import Job

        return Job
    raise AttributeError(f"module 'sqla_pq' has no attribute {name!r}")
