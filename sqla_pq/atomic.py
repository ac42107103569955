"""Effectively-once for database work: a task that runs inside the transaction recording its
completion.

``@pq.task(atomic=True)`` tasks get a session (``sqla_pq.current_session()``) from your factory.
Their writes and the job's ``succeeded`` row commit together, or not at all: if the attempt no
longer holds the job when it finishes (it was rescued meanwhile), the transaction rolls back and
nothing the task wrote remains.  The price: a transaction (and its row locks and xmin horizon)
stays open for the length of the job, so keep such tasks short.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .db import is_connection_lost
from .errors import PQError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .execution.call import ClaimedJob, Outcome
    from .pq import PQ

_current_session: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "sqla_pq_current_session", default=None
)


def current_session() -> Session:
    """The session of the running atomic task; its transaction records the job's completion."""
    session = _current_session.get()
    if session is None:
        raise PQError(
            "current_session() is only available inside a task registered with "
            "@pq.task(atomic=True)"
        )
    return session


class StaleAttempt(PQError):
    """The attempt no longer holds its job (it was rescued); its writes are rolled back."""


class AtomicRunner:
    def __init__(self, pq: PQ) -> None:
        self.pq = pq

    def __call__(self, job: ClaimedJob, call: Callable[[], Any]) -> Outcome:
        from .execution.call import ExecutionContext, success_outcome
        from .pq import SessionRunner
        from .record import record_outcomes

        settings = self.pq.settings
        ctx = ExecutionContext(secret_keys=settings.secret_keys,
                               max_result_bytes=settings.max_payload_bytes)
        try:
            with self.pq.session() as session:
                token = _current_session.set(session)
                try:
                    value = call()
                finally:
                    _current_session.reset(token)
                outcome = success_outcome(job, value, ctx)
                recorded = record_outcomes(SessionRunner(session, self.pq.execution_options),
                                           [outcome], failure_ttl=settings.failure_ttl)
                if recorded.stale:
                    raise StaleAttempt(f"job {job.id} attempt {job.attempts} was rescued while "
                                       "it ran; its writes were rolled back")
        except StaleAttempt as exc:
            from .execution.call import Outcome

            return Outcome(job.id, job.attempts, "succeeded", committed=True, stale=True,
                           error=str(exc))
        except Exception as exc:
            if not is_connection_lost(exc):
                raise
            # The database went away under the task or at its commit: its writes and its
            # completion were rolled back together (or, if the commit went through, the job is
            # already succeeded and giving it back matches nothing).  Not the task's failure:
            # the job goes back to the queue, an interruption counted.
            from .execution.call import Outcome

            return Outcome(job.id, job.attempts, "interrupted", queue=job.queue,
                           error=f"the database connection was lost: {exc.__class__.__name__}")
        outcome.committed = True
        return outcome
