"""How arguments and results are stored: JSON when it carries them exactly, Pydantic models as
JSON, dill for everything else.  The choice is made per job and recorded in ``encoding``.

JSON keeps jobs readable with plain SQL (pgtq's "fish out the queue state") and loads nothing
executable; dill carries any Python object and is therefore signed with HMAC-SHA256 when secret
keys are configured, and verified before it is loaded.  Payloads are loaded only where the job
runs, never by ``status`` or the dashboard.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import pickletools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PayloadSignatureError, PayloadTooLarge, SerializationError

if TYPE_CHECKING:
    from .models import Job

log = logging.getLogger("sqla_pq")

JSON = "json"
DILL = "dill"
PICKLE = "pickle"

PYDANTIC_TAG = "__pydantic__"
"""A Pydantic model travels as ``{"__pydantic__": "module.Class", "data": {...}}``."""


class _NeedsDill(Exception):
    pass


def _is_pydantic(value: Any) -> bool:
    cls = type(value)
    return hasattr(cls, "model_validate") and hasattr(value, "model_dump")


def to_json_value(value: Any) -> Any:
    """``value`` as JSON data that loads back equal, or raise _NeedsDill.

    Exactness matters: a tuple would come back a list and a dict with int keys would come back
    with str keys, so those go to dill.
    """
    t = type(value)
    if t is str:
        # PostgreSQL's jsonb cannot hold NUL, and lone surrogates are not UTF-8: dill carries them
        if "\x00" in value or _has_surrogate(value):
            raise _NeedsDill
        return value
    if t is int:
        if abs(value) >= _HUGE_INT:  # beyond Python's int/str conversion limit
            raise _NeedsDill
        return value
    if t is bool or value is None:
        return value
    if t is float:
        if math.isfinite(value):
            return value
        raise _NeedsDill
    if t is list:
        return [to_json_value(v) for v in value]
    if t is dict:
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise _NeedsDill
            out[k] = to_json_value(v)
        if PYDANTIC_TAG in out:
            raise _NeedsDill  # would be mistaken for a tagged model
        return out
    if _is_pydantic(value):
        return {PYDANTIC_TAG: f"{t.__module__}.{t.__qualname__}", "data": value.model_dump(mode="json")}
    raise _NeedsDill


_HUGE_INT = 10**4000


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def from_json_value(value: Any, import_object: Callable[[str], Any]) -> Any:
    """Undo :func:`to_json_value` (rebuilds tagged Pydantic models)."""
    t = type(value)
    if t is list:
        return [from_json_value(v, import_object) for v in value]
    if t is dict:
        if PYDANTIC_TAG in value and len(value) == 2 and "data" in value:
            cls = import_object(value[PYDANTIC_TAG])
            return cls.model_validate(value["data"])
        return {k: from_json_value(v, import_object) for k, v in value.items()}
    return value


def _has_pydantic(value: Any) -> bool:
    t = type(value)
    if t is list:
        return any(_has_pydantic(v) for v in value)
    if t is dict:
        return PYDANTIC_TAG in value or any(_has_pydantic(v) for v in value.values())
    return False


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps_json(value: Any) -> str:
    return _ENCODER.encode(value)


@dataclass(slots=True)
class EncodedCall:
    """Arguments ready for the job row; read-only by convention.  Not a frozen dataclass: one
    is made per enqueued call, and a frozen one takes four times as long to build."""

    encoding: str
    args_json: str | None
    kwargs_json: str | None
    payload: bytes | None
    size: int
    args_value: list[Any] | None = None
    kwargs_value: dict[str, Any] | None = None


NO_ARGUMENTS_JSON = ("[]", "{}")
"""``args_json`` and ``kwargs_json`` of a call without arguments."""


def encode_call(
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    instance: Any = None,
    max_bytes: int,
    warn_bytes: int,
    what: str = "task",
) -> EncodedCall:
    """Encode a call's arguments (and the bound instance of a method, which forces dill)."""
    if instance is None and not args and not kwargs:  # the commonest call, without the encoder
        _check_size(4, max_bytes, warn_bytes, what)
        return EncodedCall(JSON, *NO_ARGUMENTS_JSON, None, 4, [], {})
    if instance is None:
        try:
            av = to_json_value(list(args))
            kv = to_json_value(dict(kwargs)) if kwargs else {}
        except (_NeedsDill, RecursionError):  # a recursive structure: dill keeps its cycles
            pass
        else:
            a, k = dumps_json(av), (dumps_json(kv) if kv else "{}")
            size = len(a) + len(k)
            _check_size(size, max_bytes, warn_bytes, what)
            return EncodedCall(JSON, a, k, None, size, av, kv)
    try:
        blob = _dill().dumps((tuple(args), dict(kwargs), instance), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # dill raises many kinds
        raise SerializationError(
            f"the arguments of {what} cannot be serialized ({type(exc).__name__}: {exc}); pass "
            "JSON-compatible values, Pydantic models or objects that dill can pickle"
        ) from exc
    refuse_code(blob, what)
    _check_size(len(blob), max_bytes, warn_bytes, what)
    return EncodedCall(DILL, None, None, blob, len(blob))


_CODE_MARKERS = frozenset({"_create_code", "_create_function", "_create_type", "__main__"})


def refuse_code(blob: bytes, what: str) -> None:
    """Refuse a payload that carries code: dill pickles functions and classes of ``__main__``
    (or made at run time) by value, so a worker would run code it never imported."""
    for _op, arg, _pos in pickletools.genops(blob):
        if isinstance(arg, str) and any(marker in arg.split() for marker in _CODE_MARKERS):
            raise SerializationError(
                f"the arguments of {what} carry code (a function or class defined in __main__ "
                "or at run time, which dill would send by value): move it to an importable "
                "module"
            )


def _check_size(size: int, max_bytes: int, warn_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise PayloadTooLarge(
            f"the arguments of {what} take {size:,} bytes, over the {max_bytes:,}-byte limit "
            "(max_payload_bytes); store the data elsewhere and pass a key"
        )
    if size > warn_bytes:
        log.warning("the arguments of %s take %s bytes; large payloads slow the queue", what, f"{size:,}")


def decode_call(
    encoding: str,
    args: Any,
    kwargs: Any,
    payload: bytes | None,
    import_object: Callable[[str], Any],
) -> tuple[list[Any], dict[str, Any], Any]:
    """Arguments back as (args, kwargs, bound instance or None).  Verify signatures first."""
    if encoding == JSON:
        a = list(args or [])
        k = dict(kwargs or {})
        if _has_pydantic(a) or _has_pydantic(k):
            a = from_json_value(a, import_object)
            k = from_json_value(k, import_object)
        return a, k, None
    if encoding == DILL:
        if payload is None:
            raise SerializationError("the job's dill payload is missing")
        loaded_args, loaded_kwargs, instance = _dill().loads(payload)
        return list(loaded_args), dict(loaded_kwargs), instance
    if encoding == PICKLE:
        if payload is None:
            raise SerializationError("the job's pickle payload is missing")
        return [pickle.loads(payload)], {}, None
    raise SerializationError(f"unknown argument encoding {encoding!r}")


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedResult:
    json_text: str | None
    payload: bytes | None


def encode_result(value: Any, *, max_bytes: int) -> EncodedResult:
    """JSON if exact, else dill; raise SerializationError when neither can carry it."""
    try:
        text = dumps_json(to_json_value(value))
    except (_NeedsDill, RecursionError):
        pass
    else:
        if len(text) > max_bytes:
            raise SerializationError(f"the result takes {len(text):,} bytes, over {max_bytes:,}")
        return EncodedResult(text, None)
    try:
        blob = _dill().dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise SerializationError(
            f"the return value ({type(value).__name__}) cannot be stored: {exc}"
        ) from exc
    if len(blob) > max_bytes:
        raise SerializationError(f"the result takes {len(blob):,} bytes, over {max_bytes:,}")
    return EncodedResult(None, blob)


def _dill() -> Any:
    """dill, imported on first use: a worker whose jobs are all JSON starts ~10 ms sooner.
    A fork worker imports it before forking a child for a dill job (see ``preload``)."""
    import dill

    return dill


def preload(encoding: str) -> None:
    """Import what decoding ``encoding`` needs, in this process (before a fork, so that each
    child does not import it again)."""
    if encoding == DILL:
        _dill()


RESULT_PURPOSE = "result:"
"""Prefix of the task name in a result signature, so an argument payload cannot pass as one."""


def decode_result(job: Job, keys: Sequence[bytes] = ()) -> Any:
    if job.result_payload is not None:
        verify(keys, job.id, RESULT_PURPOSE + (job.task or ""), job.result_payload,
               job.result_signature)
        return _dill().loads(job.result_payload)
    if job.result is None:
        return None
    from .tasks import import_object

    return from_json_value(job.result, import_object)


# -- signing ------------------------------------------------------------------------------------


def sign(keys: Sequence[bytes], job_id: int, task: str | None, payload: bytes) -> bytes | None:
    """HMAC-SHA256 over (job id, task, payload) with the first key; None without keys."""
    if not keys:
        return None
    return _mac(keys[0], job_id, task, payload)


def verify(
    keys: Sequence[bytes], job_id: int, task: str | None, payload: bytes, signature: bytes | None
) -> None:
    """Raise PayloadSignatureError unless one of ``keys`` signed this payload for this job."""
    if not keys:
        return
    if not signature:
        raise PayloadSignatureError(
            f"job {job_id}: its dill payload is unsigned and secret keys are configured; it was "
            "not loaded"
        )
    import hmac

    for key in keys:
        if hmac.compare_digest(_mac(key, job_id, task, payload), bytes(signature)):
            return
    raise PayloadSignatureError(
        f"job {job_id}: its dill payload's signature matches no configured key; it was not loaded"
    )


def _mac(key: bytes, job_id: int, task: str | None, payload: bytes) -> bytes:
    # hashlib and hmac only when secret keys are set: hashlib maps OpenSSL's libcrypto, and
    # every mapping of a fork server makes each job process's fork and exit dearer
    import hashlib
    import hmac

    h = hmac.new(key, digestmod=hashlib.sha256)
    h.update(str(job_id).encode())
    h.update(b"\0")
    h.update((task or "").encode())
    h.update(b"\0")
    h.update(bytes(payload))
    return h.digest()


# -- display -----------------------------------------------------------------------------------


def describe_call(job: Job) -> str:
    """``send_email('a@b.c', subject='Hi')`` for JSON jobs; dill arguments are not loaded."""
    name = (job.task or "message").rsplit(".", 1)[-1]
    if job.encoding != JSON:
        return f"{name}(<{job.encoding} arguments>)"
    parts = [_short(repr(a)) for a in (job.args or [])]
    parts += [f"{k}={_short(repr(v))}" for k, v in (job.kwargs or {}).items()]
    return f"{name}({', '.join(parts)})"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
