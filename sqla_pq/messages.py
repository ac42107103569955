"""pq's message queue: ``pq["apples"].put(data)`` and ``.get()``.

Messages are rows of ``pq_job`` without a task.  ``get()`` takes the next ready message (by
priority, ``expected_at``, ``schedule_at``, insertion) with ``FOR UPDATE SKIP LOCKED`` and marks
it consumed, waiting on NOTIFY up to ``timeout`` when there is none.  Inside ``with queue as
session:`` the get is part of that session's transaction: work, write your results with the
session, and a crash (an exception) rolls the get back, leaving the message in the queue.
Queues named ``<name>/pickle`` carry any picklable object; with ``secret_keys`` configured their
payloads are signed at ``put()`` and verified by ``get()`` before anything is unpickled.
"""

from __future__ import annotations

import datetime as dt
import functools
import pickle
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import queries
from .enqueue import check_queue_name
from .errors import PayloadSignatureError
from .notify import pending_payloads
from .serialization import PICKLE, EncodedCall, _check_size, dumps_json, sign, to_json_value, verify
from .tables import NOTIFY_CHANNEL, job_table
from .timeparse import When

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .pq import PQ

RECHECK = 1.0
"""Seconds a blocking get waits on its LISTEN socket before looking again anyway (a
notification lost, a pooler that drops them)."""


@dataclass
class Message:
    """A message taken from a queue."""

    id: int
    data: Any
    enqueued_at: dt.datetime
    schedule_at: dt.datetime | None
    expected_at: dt.datetime | None
    priority: int

    @property
    def size(self) -> int:
        return 1

    def __repr__(self) -> str:
        schedule = self.schedule_at.isoformat() if self.schedule_at else None
        return (f"<pq.Job id={self.id} size={self.size} enqueued_at=\"{self.enqueued_at:%Y-%m-%dT%H:%M:%SZ}\" "
                f"schedule_at={schedule}>")


class MessageQueue:
    """``pq["name"]``: put and get messages; ``name/pickle`` for any Python object."""

    def __init__(self, pq: PQ, name: str) -> None:
        self.pq = pq
        self.name = check_queue_name(name)
        self.pickled = name.endswith("/pickle")
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<MessageQueue {self.name!r}>"

    # -- put ---------------------------------------------------------------------------------------

    def put(self, data: Any, schedule_at: When | None = None, expected_at: When | None = None,
            *, priority: int | None = None, session: Session | None = None) -> int:
        """Add a message; ``schedule_at`` delays it, ``expected_at`` orders it.  Returns its id."""
        session = session or self._session()
        encoded = self._encode(data)
        queue = self.pq.queue(self.name, session=session)
        spec = queue.build(None, (), {}, run_at=schedule_at, expected_at=expected_at,
                           priority=priority, timeout=None)
        spec.encoded = encoded
        keys = self.pq.settings.secret_keys
        if keys and encoded.payload is not None:
            # the signature covers the row's id: reserve it, as enqueue does for dill
            spec.id = self._reserve_id(session)
            spec.signature = sign(keys, spec.id, self._purpose, encoded.payload)
        return self.pq._insert([spec], session=session)[0].id

    def _encode(self, data: Any) -> EncodedCall:
        """JSON, or pickle on a ``/pickle`` queue; within the enqueue's payload limits."""
        if self.pickled:
            blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
            encoded = EncodedCall(PICKLE, None, None, blob, len(blob))
        else:
            value = to_json_value(data) if _json_ok(data) else _not_json(data)
            text = dumps_json([value])
            encoded = EncodedCall("json", text, "{}", None, len(text), [value], {})
        settings = self.pq.settings
        _check_size(encoded.size, settings.max_payload_bytes, settings.warn_payload_bytes,
                    f"a message on {self.name!r}")
        return encoded

    def _reserve_id(self, session: Session | None) -> int:
        return int(self._rows(session, queries.job_ids_reserve(), {"n": 1})[0][0])

    @property
    def _purpose(self) -> str:
        """What a message's signature covers besides its id and payload: its queue."""
        return f"message:{self.name}"

    # -- get ---------------------------------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = 1.0) -> Message | None:
        """The next ready message, or None once ``timeout`` seconds passed without one
        (``block=False``: at once)."""
        message = self._take()
        if message is not None or not block:
            return message
        deadline = None if timeout is None else time.monotonic() + timeout
        listener = self.pq.engine.raw_connection()
        try:
            conn = listener.dbapi_connection
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
            while True:
                message = self._take()  # after LISTEN: nothing can slip between
                if message is not None:
                    return message
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                wait = RECHECK if remaining is None else min(remaining, RECHECK)
                select.select([conn], [], [], wait)
                pending_payloads(conn)  # any notification: look again
        finally:
            try:
                with listener.dbapi_connection.cursor() as cur:
                    cur.execute(f"UNLISTEN {NOTIFY_CHANNEL}")
                listener.dbapi_connection.autocommit = False
            except Exception:
                listener.invalidate()
            listener.close()

    def _take(self) -> Message | None:
        session = self._session()
        if session is not None:
            rows = list(session.connection().execute(queries.message_get(), {"message_queue": self.name},
                                                     execution_options=self.pq.execution_options))
            self.pq._session_written(session)  # zope.sqlalchemy must commit this get
        else:
            rows = self.pq._run(queries.message_get(), {"message_queue": self.name})
        if not rows:
            return None
        job_id, encoding, args, payload, enqueued_at, run_at, expected_at, priority = rows[0]
        if encoding == PICKLE:
            data = self._unpickle(job_id, bytes(payload or b""), session)
        else:
            data = (args or [None])[0]
        return Message(job_id, data, enqueued_at, run_at if run_at and run_at > enqueued_at else None,
                       expected_at, priority)

    def _unpickle(self, message_id: int, blob: bytes, session: Session | None) -> Any:
        """Unpickling runs code: with secret keys, only a payload this queue's ``put`` signed."""
        keys = self.pq.settings.secret_keys
        if keys:
            signature = self._rows(session, _signature_of(), {"job_id": message_id})[0][0]
            try:
                verify(keys, message_id, self._purpose, blob, signature)
            except PayloadSignatureError:
                state = "unsigned" if not signature else "signed with no configured key"
                error = PayloadSignatureError(
                    f"message {message_id} on {self.name!r}: its pickle payload is {state}; it was "
                    "not loaded and is marked failed (check secret_keys, and who writes pq_job)",
                    message_id=message_id,
                )
                self._refuse(message_id, str(error), session)
                raise error from None
        return pickle.loads(blob)

    def _refuse(self, message_id: int, reason: str, session: Session | None) -> None:
        """Mark a refused message failed, so it neither comes back nor passes for consumed."""
        self._rows(session, _mark_failed(), {"job_id": message_id, "reason": reason})

    def _rows(self, session: Session | None, statement: Any, params: dict[str, Any]) -> list[Any]:
        if session is None:
            return self.pq._run(statement, params)
        result = session.connection().execute(statement, params,
                                              execution_options=self.pq.execution_options)
        return list(result) if result.returns_rows else []

    def __iter__(self) -> Iterator[Message | None]:
        """Blocks for a message; yields None after each timeout (one second)."""
        while True:
            yield self.get()

    def __len__(self) -> int:
        return self.pq.queue_depths().get(self.name, 0)

    # -- a transaction around get, work and write ----------------------------------------------------

    def __enter__(self) -> Session:
        session = self.pq.session_factory(bind=self.pq._bound_engine, expire_on_commit=False)
        session.begin()
        stack = getattr(self._local, "stack", [])
        stack.append(session)
        self._local.stack = stack
        return session

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        session = self._local.stack.pop()
        try:
            if exc is None:
                session.commit()
            else:
                session.rollback()
        finally:
            session.close()
        refused = exc.context.get("message_id") if isinstance(exc, PayloadSignatureError) else None
        if refused is not None:  # the rollback undid its refusal: record it on its own
            self._refuse(refused, str(exc), None)

    def _session(self) -> Session | None:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    # -- pq's tasks --------------------------------------------------------------------------------

    def task(self, **options: Any) -> Any:
        """pq's ``@queue.task(schedule_at=..., max_retries=..., retry_in=...)``: ``@pq.task`` on
        this queue."""
        return self.pq.task(queue=self.name, **options)


@functools.cache
def _signature_of() -> Any:
    j = job_table
    return sa.select(j.c.signature).where(j.c.id == sa.bindparam("job_id"))


@functools.cache
def _mark_failed() -> Any:
    j = job_table
    return (sa.update(j).where(j.c.id == sa.bindparam("job_id"))
            .values(status="failed", error=sa.bindparam("reason")))


def _json_ok(data: Any) -> bool:
    from .serialization import _NeedsDill

    try:
        to_json_value(data)
    except _NeedsDill:
        return False
    return True


def _not_json(data: Any) -> Any:
    from .errors import SerializationError

    raise SerializationError(
        f"a message on a JSON queue must be JSON data, not {type(data).__name__}; name the queue "
        "'<name>/pickle' to carry any Python object"
    )
