"""The jobs table is a code-execution boundary: allowed paths only, signed dill only."""

from __future__ import annotations

import sys

from sqla_pq import PQ
from sqla_pq.testing import work_one
from tests import tasks
from tests.helpers import scalar


def test_a_path_outside_allowed_tasks_fails_without_being_imported(Session):
    pq = PQ(Session, allowed_tasks=["tests.tasks"])
    sys.modules.pop("tests.forbidden_module", None)
    import pytest

    from sqla_pq import TaskNotAllowed

    with pytest.raises(TaskNotAllowed):  # a producer with the same settings refuses it at once
        pq.enqueue("tests.forbidden_module.run")
    bad = PQ(Session).enqueue("tests.forbidden_module.run")  # a producer without them
    good = pq.enqueue(tasks.add, 1, 2)
    work_one(pq)
    work_one(pq)
    assert "tests.forbidden_module" not in sys.modules
    failed = pq.get_job(bad.id)
    assert failed.status == "failed" and "allowed_tasks" in failed.error
    assert pq.get_job(good.id).return_value() == 3


def test_standard_library_paths_are_refused_at_enqueue_and_never_run(pq, engine, tmp_path):
    import pytest

    from sqla_pq import TaskNotAllowed

    canary = tmp_path / "pwned"
    with pytest.raises(TaskNotAllowed, match="standard library"):
        pq.enqueue("os.system", f"touch {canary}")
    with engine.begin() as c:  # a row written by anyone with INSERT on the table
        c.exec_driver_sql("INSERT INTO pq_job (queue, task, args, kwargs) VALUES "
                          "('default', 'os.system', %(a)s, '{}')", {"a": f'["touch {canary}"]'})
    work_one(pq)
    failed = pq.list_failed()[0]
    assert "standard library" in failed.error and failed.attempts == 1
    assert not canary.exists()


def test_a_forged_unsigned_dill_payload_never_runs(Session, engine, tmp_path):
    """A payload whose __reduce__ would touch a file: refused before loading."""
    import os

    import dill

    canary = tmp_path / "dill-canary"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    blob = dill.dumps(((Evil(),), {}, None))
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO pq_job (queue, task, encoding, payload) VALUES "
                          "('default', 'tests.tasks.identity', 'dill', %(p)s)", {"p": blob})
    pq = PQ(Session, secret_keys=["k"])
    work_one(pq)
    assert "unsigned" in pq.list_failed()[0].error
    assert not canary.exists()


def test_import_failures_fail_once_without_retries(pq, engine):
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO pq_job (queue, task, args, kwargs, max_retries) VALUES "
                          "('default', 'tests.broken_module.run', '[]', '{}', 3), "
                          "('default', 'tests.tasks.no_such_function', '[]', '{}', 3), "
                          "('default', 'tests..tasks', '[]', '{}', 3)")
    while work_one(pq):
        pass
    failed = pq.list_failed()
    assert len(failed) == 3 and all(j.attempts == 1 for j in failed)
    assert all("TaskNotImportable" in j.error or "cannot be imported" in j.error for j in failed)


def test_dill_payloads_are_signed_and_tampering_fails_the_job_unloaded(Session, engine):
    import datetime as dt

    pq = PQ(Session, secret_keys=["s3cret"])
    job = pq.enqueue(tasks.identity, dt.date(2020, 1, 2))
    assert job.encoding == "dill" and job.signature is not None
    tampered = pq.enqueue(tasks.identity, dt.date(2021, 1, 1))
    with engine.begin() as c:
        # swap in the payload of another job: its signature names another id
        c.exec_driver_sql(
            "UPDATE pq_job SET payload = (SELECT payload FROM pq_job WHERE id = %(a)s) WHERE id = %(b)s",
            {"a": job.id, "b": tampered.id},
        )
    unsigned = PQ(Session).enqueue(tasks.identity, dt.date(2022, 1, 1))  # written without a key
    for _ in range(3):
        work_one(pq)
    assert pq.get_job(job.id).return_value() == dt.date(2020, 1, 2)
    for bad in (tampered, unsigned):
        stored = pq.get_job(bad.id)
        assert stored.status == "failed" and "signature" in stored.error or "unsigned" in stored.error
    assert scalar(engine, "SELECT count(*) FROM pq_job WHERE status = 'failed'") == 2


def test_rotated_keys_still_verify(Session):
    import datetime as dt

    old = PQ(Session, secret_keys=["old"])
    job = old.enqueue(tasks.identity, dt.date(2020, 1, 2))
    new = PQ(Session, secret_keys=["new", "old"])
    work_one(new)
    assert new.get_job(job.id).return_value() == dt.date(2020, 1, 2)


def test_the_worker_says_once_how_to_lock_tasks_down(pq, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="sqla_pq"):
        work_one(pq)
    assert caplog.text.count("SQLA_PQ_ALLOWED_TASKS") == 1


# -- pickle message queues ----------------------------------------------------------------------------


def _forged_pickle(canary) -> bytes:
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    return pickle.dumps(Evil())


def test_signed_pickle_messages_round_trip_and_rotated_keys_verify(Session, engine):
    pq = PQ(Session, secret_keys=["old"])
    first = pq["jobs/pickle"].put(tasks.Calculator(3))
    assert scalar(engine, f"SELECT signature IS NOT NULL FROM pq_job WHERE id = {first}")
    pq["jobs/pickle"].put({"plain": "dict"})
    rotated = PQ(Session, secret_keys=["new", "old"])["jobs/pickle"]
    assert rotated.get(block=False).data.denominator == 3
    assert rotated.get(block=False).data == {"plain": "dict"}


def test_a_forged_or_tampered_pickle_message_is_refused_unloaded_and_failed(Session, engine, tmp_path):
    import pytest

    from sqla_pq import PayloadSignatureError

    canary = tmp_path / "pickle-canary"
    pq = PQ(Session, secret_keys=["k"])
    q = pq["jobs/pickle"]
    with engine.begin() as c:  # a row written by anyone with INSERT on the table
        c.exec_driver_sql("INSERT INTO pq_job (queue, encoding, payload) VALUES "
                          "('jobs/pickle', 'pickle', %(p)s)", {"p": _forged_pickle(canary)})
    signed = q.put("kept")
    moved = q.put("elsewhere")
    with engine.begin() as c:  # a signed payload moved to another row: its signature names its id
        c.exec_driver_sql("UPDATE pq_job SET payload = (SELECT payload FROM pq_job WHERE id = %(a)s) "
                          "WHERE id = %(b)s", {"a": signed, "b": moved})
    with pytest.raises(PayloadSignatureError, match="unsigned; it was not loaded"):
        q.get(block=False)
    assert q.get(block=False).data == "kept"
    with pytest.raises(PayloadSignatureError, match="signed with no configured key"):
        q.get(block=False)
    assert not canary.exists()
    failed = pq.list_failed()
    assert len(failed) == 2 and all("not loaded" in j.error for j in failed)
    assert q.get(block=False) is None


def test_a_refused_message_inside_a_transaction_does_not_come_back(Session, engine, tmp_path):
    import pytest

    from sqla_pq import PayloadSignatureError

    canary = tmp_path / "pickle-canary"
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO pq_job (queue, encoding, payload) VALUES "
                          "('tx/pickle', 'pickle', %(p)s)", {"p": _forged_pickle(canary)})
    pq = PQ(Session, secret_keys=["k"])
    q = pq["tx/pickle"]
    with pytest.raises(PayloadSignatureError):
        with q:
            q.get(block=False)
    assert not canary.exists()
    assert scalar(engine, "SELECT status FROM pq_job") == "failed"
    assert q.get(block=False) is None


def test_messages_have_the_enqueue_payload_limits(Session, caplog):
    import logging

    import pytest

    from sqla_pq import PayloadTooLarge

    pq = PQ(Session, max_payload_bytes=2000, warn_payload_bytes=1000)
    with pytest.raises(PayloadTooLarge, match="max_payload_bytes"):
        pq["big/pickle"].put(b"x" * 3000)
    with pytest.raises(PayloadTooLarge):
        pq["big"].put("x" * 3000)
    with caplog.at_level(logging.WARNING, logger="sqla_pq"):
        pq["big"].put("x" * 1500)
    assert "large payloads slow the queue" in caplog.text
    assert len(pq["big"]) == 1 and len(pq["big/pickle"]) == 0
