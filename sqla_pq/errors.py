"""Every exception sqla_pq raises, in one place.

Each class's docstring is its default message and says what to do about it.  Two kinds live here:
errors the product raises at the caller (bad input, missing schema, unknown ids), and control-flow
exceptions a task may raise to steer its own job (:class:`Retry`, :class:`Cancel`).
"""

from __future__ import annotations

from typing import Any


class PQError(Exception):
    """A sqla_pq error."""

    def __init__(self, message: str | None = None, **context: Any) -> None:
        self.context = context
        super().__init__(message or (self.__doc__ or "").strip().splitlines()[0])


# -- bad input at the call -------------------------------------------------------------------


class TaskNotImportable(PQError, ValueError):
    """The task cannot be imported by a worker: use a module-level function, a method of a
    module-level object, or a name registered with ``@pq.task``."""


class TaskNotAllowed(PQError):
    """The task path is outside ``allowed_tasks``; add its module prefix to ``allowed_tasks`` or
    register it with ``@pq.task``."""


class SerializationError(PQError, ValueError):
    """A value could not be serialized: pass JSON-compatible values, Pydantic models, or objects
    that dill can pickle."""


class PayloadTooLarge(SerializationError):
    """The job's arguments are larger than ``max_payload_bytes``; store the data elsewhere (a
    table, object storage) and pass a key."""


class PayloadSignatureError(PQError):
    """A dill payload is unsigned or its signature does not match any configured secret key; the
    job was not loaded."""


class InvalidQueueName(PQError, ValueError):
    """Queue names are 1-64 characters of letters, digits and ``_ . - / :``."""


class InvalidTimeSpec(PQError, ValueError):
    """A time could not be understood: use a number of seconds, a timedelta, a datetime, or a
    string such as ``"10s"``, ``"5m"``, ``"1h30m"``, ``"2d"``."""


class InvalidOption(PQError, ValueError):
    """An enqueue option has an invalid value."""


class DuplicateClientId(PQError):
    """A job with this ``client_id`` already exists; use ``pq.upsert(...)`` to replace a pending
    job, or ``pq.get_job_by_client_id(...)`` to find it."""


class JobNotFound(PQError, LookupError):
    """No job has this id (it may have been pruned after its ``result_ttl``)."""


class FlowNotFound(PQError, LookupError):
    """No flow has this id."""


class ScheduleNotFound(PQError, LookupError):
    """No schedule has this id."""


class JobNotFinished(PQError):
    """The job has not finished yet; wait with ``job.wait(timeout=...)``."""


class JobFailed(PQError):
    """The job failed; its ``error`` and ``traceback`` say why."""


class InvalidTransition(PQError):
    """The job is not in a state that allows this operation."""


class SchemaMissing(PQError):
    """The sqla_pq tables do not exist in this database: run ``sqla-pq migrate`` (or ``alembic
    upgrade heads`` with sqla_pq's version location)."""


class ConfigurationError(PQError):
    """sqla_pq is not configured correctly."""


class EmbeddedUnavailable(ConfigurationError):
    """No DATABASE_URL is set and the embedded PostgreSQL is not installed: ``pip install
    'sqla_pq[embedded]'`` or set DATABASE_URL."""


# -- raised while a job runs ------------------------------------------------------------------


class JobTimeout(PQError):
    """The job ran past its timeout and was stopped."""


class ResultNotStorable(PQError):
    """The job's return value could not be stored; return JSON-compatible data, a Pydantic model
    or something dill can pickle.  The job is failed and not retried."""


class WorkerLost(PQError):
    """The job's worker stopped renewing its lease while the job ran (kill -9, lost machine)."""


class LeaseLost(BaseException):
    """Raised into a thread-mode job whose lease its worker lost (the worker was frozen, or
    could not reach the database for most of a lease): another worker may run the job now, so
    this attempt stops and the job goes back to the queue.  A BaseException, so that a task's
    ``except Exception`` does not swallow it."""


class ChildDied(PQError):
    """The process running the job died before reporting a result."""


# -- control flow a task may raise --------------------------------------------------------------


class Retry(PQError):
    """Raised by a task to be run again later, counting an attempt.

    ``raise Retry("10s")`` retries in ten seconds whatever the job's ``retry_in``.
    """

    def __init__(self, delay: Any = None, reason: str | None = None) -> None:
        self.delay = delay
        super().__init__(reason or "the task asked to be retried")


class Cancel(PQError):
    """Raised by a task to stop its job for good, without counting it as a failure."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "the task cancelled itself")
