"""JSON when it carries values exactly, Pydantic as JSON, dill otherwise; signed dill."""

from __future__ import annotations

import datetime as dt

import pytest

from sqla_pq.errors import PayloadSignatureError, PayloadTooLarge, SerializationError
from sqla_pq.serialization import (
    decode_call,
    encode_call,
    encode_result,
    sign,
    verify,
)
from sqla_pq.tasks import import_object
from tests.models_pydantic import Person

BIG = 16 * 1024 * 1024


def roundtrip(args, kwargs=None):
    enc = encode_call(args, kwargs or {}, max_bytes=BIG, warn_bytes=BIG)
    import json

    a = json.loads(enc.args_json) if enc.args_json else None
    k = json.loads(enc.kwargs_json) if enc.kwargs_json else None
    return enc, decode_call(enc.encoding, a, k, enc.payload, import_object)


def test_json_values_stay_json_and_readable():
    enc, (args, kwargs, _) = roundtrip([1, "a", [1, 2], {"k": None}], {"x": 1.5})
    assert enc.encoding == "json"
    assert args == [1, "a", [1, 2], {"k": None}] and kwargs == {"x": 1.5}


@pytest.mark.parametrize("value", [(1, 2), {1: "a"}, dt.date(2020, 1, 1), {1, 2}, float("inf"), b"x"])
def test_values_json_would_change_go_to_dill_and_come_back_equal(value):
    enc, (args, _, _) = roundtrip([value])
    assert enc.encoding == "dill"
    assert args == [value]


def test_pydantic_models_travel_as_json_and_come_back_as_models():
    enc, (args, kwargs, _) = roundtrip([Person(name="Ada", age=36)], {"p": [Person(name="B", age=1)]})
    assert enc.encoding == "json"
    assert '"__pydantic__":"tests.models_pydantic.Person"' in enc.args_json
    assert args == [Person(name="Ada", age=36)] and kwargs == {"p": [Person(name="B", age=1)]}


def test_unserializable_arguments_raise_at_enqueue():

    with pytest.raises(SerializationError) as info:
        encode_call([(x for x in [])], {}, max_bytes=BIG, warn_bytes=BIG)
    assert "cannot be serialized" in str(info.value)


def test_payload_over_the_cap_is_refused_and_large_ones_warn(caplog):
    with pytest.raises(PayloadTooLarge):
        encode_call(["x" * 2000], {}, max_bytes=1000, warn_bytes=500)
    encode_call(["x" * 700], {}, max_bytes=1000, warn_bytes=500)
    assert "large payloads" in caplog.text


def test_results_are_json_when_possible_and_refused_when_nothing_can_carry_them():
    assert encode_result({"a": 1}, max_bytes=BIG).json_text == '{"a":1}'
    assert encode_result((1, 2), max_bytes=BIG).payload is not None

    with pytest.raises(SerializationError):
        encode_result((x for x in []), max_bytes=BIG)


def test_signatures_bind_job_task_and_payload_and_rotate_keys():
    keys = (b"new", b"old")
    sig_old = sign((b"old",), 7, "t.f", b"payload")
    verify(keys, 7, "t.f", b"payload", sig_old)  # an old key still verifies
    for job_id, task, payload in [(8, "t.f", b"payload"), (7, "t.g", b"payload"), (7, "t.f", b"x")]:
        with pytest.raises(PayloadSignatureError):
            verify(keys, job_id, task, payload, sig_old)
    with pytest.raises(PayloadSignatureError):
        verify(keys, 7, "t.f", b"payload", None)
    verify((), 7, "t.f", b"payload", None)  # no keys configured: nothing to check
