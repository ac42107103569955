"""Every bad input gets a clear, named error, and nothing is half-written."""

from __future__ import annotations

import pytest

from sqla_pq import PQ
from sqla_pq.errors import (
    InvalidOption,
    InvalidQueueName,
    InvalidTimeSpec,
    JobNotFound,
    PayloadTooLarge,
    SchemaMissing,
    SerializationError,
    TaskNotImportable,
)
from tests import tasks
from tests.helpers import scalar


def test_bad_enqueues_raise_and_store_nothing(pq, engine):
    def local():
        return 1

    cases = [
        (TaskNotImportable, lambda: pq.enqueue(lambda: 1)),
        (TaskNotImportable, lambda: pq.enqueue(local)),
        (SerializationError, lambda: pq.enqueue(tasks.identity, (x for x in []))),
        (InvalidTimeSpec, lambda: pq.enqueue(tasks.add, 1, 2, run_at="soonish")),
        (InvalidTimeSpec, lambda: pq.enqueue(tasks.add, 1, 2, retry_in="5 parsecs")),
        (InvalidQueueName, lambda: pq.queue("bad name!")),
        (InvalidQueueName, lambda: pq.queue("x" * 65)),
        (InvalidOption, lambda: pq.enqueue(tasks.add, 1, 2, priority="high")),
        (InvalidOption, lambda: pq.enqueue(tasks.add, 1, 2, result_ttl=-5)),
        (InvalidOption, lambda: pq.enqueue(tasks.add, 1, 2, max_retries=-1)),
        (InvalidOption, lambda: pq.enqueue(tasks.add, 1, 2, depends_on="job-1")),
        (JobNotFound, lambda: pq.enqueue(tasks.add, 1, 2, depends_on=987654)),
        (JobNotFound, lambda: pq.get_job(987654)),
        (JobNotFound, lambda: pq.get_job_by_client_id("nobody")),
    ]
    for error, call in cases:
        with pytest.raises(error) as info:
            call()
        assert str(info.value), f"{error.__name__} without a message"
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 0


def test_payloads_over_the_cap_are_refused(Session, engine):
    small = PQ(Session, max_payload_bytes=10_000, warn_payload_bytes=5_000)
    with pytest.raises(PayloadTooLarge, match="max_payload_bytes"):
        small.enqueue(tasks.identity, "x" * 20_000)
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 0


def test_a_database_without_the_schema_says_run_migrate(empty_db_url):
    pq = PQ(empty_db_url)
    with pytest.raises(SchemaMissing, match="sqla-pq migrate"):
        pq.enqueue(tasks.add, 1, 2)
    with pytest.raises(SchemaMissing):
        pq.get_job(1)
    pq.engine.dispose()


def test_queue_names_are_bound_parameters_not_sql(pq):
    name = "a'b"  # not allowed by the name rule anyway
    with pytest.raises(InvalidQueueName):
        pq.queue(name)
    ok = "tenant:42/emails.v2-x_y"
    pq.enqueue(tasks.add, 1, 1, queue=ok)
    assert pq.queue_depths() == {ok: 1}


def test_hostile_schema_names_are_refused_when_pq_is_built(db_url):
    from sqla_pq.errors import ConfigurationError

    for bad in ['x"; DROP SCHEMA public;--', "a b", "$$", "1abc", "x" * 64, ""]:
        with pytest.raises(ConfigurationError, match="schema name"):
            PQ(db_url, schema=bad)


@pytest.mark.parametrize("bad", ["1e309s", "1e400", "9" * 400 + "d"])
def test_durations_out_of_range_are_refused(pq, bad):
    with pytest.raises(InvalidTimeSpec, match="out of range|invalid"):
        pq.enqueue(tasks.add, 1, 2, run_at=bad)


@pytest.mark.parametrize("cron", ["* * 30 2 *", "@reboot", "", "x" * 300, "0 0 * * 8"])
def test_cron_expressions_that_never_match_or_do_not_parse_are_refused_fast(pq, cron):
    import time

    t0 = time.monotonic()
    with pytest.raises(InvalidTimeSpec):
        pq.schedule(tasks.nothing, cron=cron)
    assert time.monotonic() - t0 < 0.5
    assert pq.schedules() == []


def test_a_worker_on_a_database_without_the_schema_says_run_migrate(empty_db_url):
    import subprocess
    import sys

    url = empty_db_url.render_as_string(hide_password=False)
    result = subprocess.run([sys.executable, "-m", "sqla_pq", "--url", url, "worker", "--burst"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "run ``sqla-pq migrate``" in result.stderr or "sqla-pq migrate" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_refuses_a_schema_newer_than_it_knows(pq, engine):
    from sqla_pq.errors import ConfigurationError

    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_alembic_version SET version_num = 'sqla_pq_9999'")
    with pytest.raises(ConfigurationError, match="newer than this installed sqla_pq"):
        pq.run_worker(burst=True, install_signals=False)


def test_upsert_while_running_queues_the_successor_and_leaves_the_running_job(pq, engine):
    first = pq.upsert(tasks.echo, "v1", client_id="debounce")
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET status = 'running', attempts = 1 WHERE id = %(i)s",
                          {"i": first.id})
    second = pq.upsert(tasks.echo, "v2", client_id="debounce")
    assert second.id != first.id
    running = pq.get_job(first.id)
    assert running.status == "running" and running.client_id is None
    assert running.meta == {"client_id": "debounce"}
    assert pq.get_job_by_client_id("debounce").args == ["v2"]
