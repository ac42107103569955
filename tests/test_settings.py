from __future__ import annotations

import pytest

from sqla_pq.errors import ConfigurationError
from sqla_pq.settings import Settings


def test_defaults_are_django_pq_s():
    s = Settings.from_env({})
    assert (s.result_ttl, s.worker_ttl, s.job_timeout) == (500, 420.0, 600.0)
    assert s.lease_seconds == 3 * s.heartbeat, "a lease is three heartbeats"


def test_environment_then_keywords_override():
    s = Settings.from_env({"SQLA_PQ_RESULT_TTL": "60", "SQLA_PQ_SECRET_KEY": "k1,k2",
                           "SQLA_PQ_ALLOWED_TASKS": "a.b, c"}, worker_ttl=5)
    assert s.result_ttl == 60 and s.worker_ttl == 5
    assert s.secret_keys == (b"k1", b"k2") and s.allowed_tasks == ("a.b", "c")
    assert Settings.from_env({}).serial_queues == ("serial",), "django-pq's serial queue"
    assert Settings.from_env({"SQLA_PQ_SERIAL_QUEUES": "serial, reports"}).serial_queues == (
        "serial", "reports")
    assert Settings.from_env({}, serial_queues="reports").serial_queues == ("reports",)
    # a single name is a list of one, however the settings are made (not its letters)
    assert Settings(serial_queues="reports").serial_queues == ("reports",)  # type: ignore[arg-type]
    assert Settings().replace(allowed_tasks="app").allowed_tasks == ("app",)
    assert Settings(serial_queues=["a", "b"]).serial_queues == ("a", "b")  # type: ignore[arg-type]


def test_bad_settings_say_what_is_wrong():
    with pytest.raises(ConfigurationError, match="SQLA_PQ_RESULT_TTL"):
        Settings.from_env({"SQLA_PQ_RESULT_TTL": "soon"})
    with pytest.raises(ConfigurationError, match="lease"):
        Settings.from_env({}, heartbeat=10, lease=5)
