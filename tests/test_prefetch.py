"""Prefetch: a worker holds ``prefetch`` jobs beyond ``concurrency``, never runs more than
``concurrency`` at once (threads, or fork children), and gives back the held jobs it did not
start, as they were."""

from __future__ import annotations

import pytest

from sqla_pq import queries
from tests import tasks
from tests.helpers import BackgroundWorker, rows, scalar, wait_until

ISOLATIONS = pytest.mark.parametrize("isolation", ["thread", "fork"])


def _most_at_once(engine) -> int:
    """The largest number of ledger intervals (job runs) that overlapped."""
    events = []
    for started, finished in rows(engine, "SELECT started_at, finished_at FROM test_ledger"):
        events += [(started, 1), (finished, -1)]
    now = most = 0
    for _at, step in sorted(events, key=lambda e: (e[0], e[1])):
        now += step
        most = max(most, now)
    return most


@ISOLATIONS
def test_a_prefetching_worker_holds_more_jobs_than_it_runs(pq, engine, url_str, isolation):
    jobs = [pq.enqueue(tasks.record, url_str, "p", 0.4) for _ in range(8)]
    with BackgroundWorker(pq, ["default"], concurrency=2, prefetch=3, maintenance=False,
                          isolation=isolation,
                          fork_server=isolation == "fork"):
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM pq_job WHERE status = 'running'") == 5,
                   10, message="five jobs held: two running, three prefetched")
        assert scalar(engine, "SELECT count(*) FROM test_ledger WHERE finished_at IS NULL") <= 2
        for job in jobs:
            pq.wait(job.id, timeout=30)
    assert all(pq.get_job(j.id).status == "succeeded" for j in jobs)
    assert scalar(engine, "SELECT count(*) FROM test_ledger") == 8, "a job ran twice, or not at all"
    assert _most_at_once(engine) == 2, "prefetched jobs ran beyond the concurrency"


@ISOLATIONS
def test_a_stopping_worker_gives_back_the_jobs_it_did_not_start_as_they_were(pq, engine, url_str, isolation):
    jobs = [pq.enqueue(tasks.record, url_str, "s", 1.0) for _ in range(4)]
    with BackgroundWorker(pq, ["default"], concurrency=1, prefetch=3, maintenance=False,
                          isolation=isolation,
                          fork_server=isolation == "fork"):
        wait_until(lambda: scalar(engine, "SELECT count(*) FROM test_ledger") == 1, 10,
                   message="the first job to start")
    # the worker finished the job in hand and released the three it held
    states = {j.id: pq.get_job(j.id) for j in jobs}
    ran = [j for j in states.values() if j.status == "succeeded"]
    back = [j for j in states.values() if j.status == "queued"]
    assert len(ran) == 1 and len(back) == 3
    assert all(j.attempts == 0 and j.interruptions == 0 and j.worker_id is None for j in back), \
        "a job that never started was charged an attempt or an interruption"
    assert scalar(engine, "SELECT count(*) FROM test_ledger") == 1


@ISOLATIONS
def test_a_held_job_whose_lease_is_in_doubt_is_given_back_unstarted(pq, engine, url_str, caplog, isolation):
    first = pq.enqueue(tasks.record, url_str, "first", 1.5)
    held = pq.enqueue(tasks.record, url_str, "held", 0.0)
    with BackgroundWorker(pq, ["default"], concurrency=1, prefetch=1, maintenance=False,
                          isolation=isolation,
                          fork_server=isolation == "fork"):
        wait_until(lambda: pq.get_job(held.id).status == "running", 10,
                   message="the second job to be prefetched")
        with engine.begin() as c:  # what a frozen worker finds: the lease ran out meanwhile
            c.exec_driver_sql("UPDATE pq_job SET lease_until = now() - interval '1 second' "
                              "WHERE id = %(i)s", {"i": held.id})
        pq.wait(first.id, timeout=15)
        pq.wait(held.id, timeout=15)  # released, then claimed again (here: by the same worker)
    assert f"stopping job {held.id}" in caplog.text
    tags = [t for (t,) in rows(engine, "SELECT tag FROM test_ledger ORDER BY id")]
    assert tags == ["first", "held"], "the held job ran in doubt, or twice"
    done = pq.get_job(held.id)
    assert done.attempts == 1 and done.interruptions == 0 and done.failures == 0, \
        "a job given back before it started was charged for it"


def test_release_is_a_no_op_for_a_job_another_worker_holds_now(pq, engine):
    job = pq.enqueue(tasks.nothing)
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_job SET status = 'running', attempts = 1, worker_id = 'other' "
                          "WHERE id = %(i)s", {"i": job.id})
    assert pq._run(queries.job_release(), {"ids": [job.id], "attempt_list": [1],
                                            "worker": "me"}) == []
    assert pq.get_job(job.id).status == "running"


def test_prefetch_cannot_be_negative(pq):
    with pytest.raises(ValueError, match="prefetch must be 0 or more"):
        pq.worker(["default"], isolation="thread", prefetch=-1)


def test_claim_sizes_round_down_to_a_few_statements():
    sizes = {queries.claim_size(n) for n in range(0, 200)}
    assert sizes == {0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192}
    assert all(queries.claim_size(n) <= n for n in range(0, 200))


@ISOLATIONS
def test_a_held_job_that_waited_past_its_timeout_is_still_stopped_on_time(pq, engine, isolation):
    """Its deadline counts from its start; the loop, which plans wake-ups from the earliest
    possible deadline of each held job, must hear of it when it finally starts."""
    first = pq.enqueue(tasks.sleep, 1.5)
    slow = pq.enqueue_call(tasks.busy_loop, args=(30,), timeout=0.5, max_retries=0)
    with BackgroundWorker(pq, ["default"], concurrency=1, prefetch=1, maintenance=False,
                          worker_ttl=300, isolation=isolation,
                          fork_server=isolation == "fork"):
        pq.wait(first.id, timeout=15)
        wait_until(lambda: pq.get_job(slow.id).status == "failed", 5,
                   message="the held job to be stopped at its timeout")
    assert "JobTimeout" in pq.get_job(slow.id).error
