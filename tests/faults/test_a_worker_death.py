"""A. Worker death and rescue (S01-S08): kill -9, orphaned fork children, crashing children,
frozen workers, rescue racing completion, identity reuse, graceful stops, timeouts."""

from __future__ import annotations

import signal
import threading
import time

import psutil
import pytest

from tests.faults import tasks
from tests.faults.harness import HEARTBEAT, LEASE, RESCUE, Scenario, wait_until

pytestmark = pytest.mark.fault

RESCUE_BOUND = 5.0
"""G3: rescue within lease + sweep (2 s + 0.5 s in tests), asserted at 5 s (the plan's slack)."""


def _busiest(sc: Scenario, workers):
    """The worker (of ``workers``) running the most jobs now, with those job ids."""
    running = sc.rows("SELECT worker_id, array_agg(id) FROM pq_job WHERE status = 'running' "
                      "GROUP BY worker_id ORDER BY count(*) DESC")
    by_id = {w.worker_id(): w for w in workers}
    for worker_id, ids in running:
        if worker_id in by_id:
            return by_id[worker_id], list(ids)
    return None, []


def _rescue_delays(sc: Scenario, ids, since) -> list[float]:
    """Seconds (database clock) from ``since`` to each job's rescue (running -> queued/failed
    with an interruption), for the jobs of ``ids`` that were rescued."""
    got = sc.rows(
        "SELECT DISTINCT ON (t.job_id) extract(epoch FROM t.at - %(since)s)::float8 "
        "FROM fault_transition t WHERE t.job_id = ANY(%(ids)s) AND t.old_status = 'running' "
        "AND t.new_status IN ('queued', 'failed') AND t.at >= %(since)s ORDER BY t.job_id, t.at",
        ids=list(ids), since=since)
    return [r[0] for r in got]


# -- S01 ---------------------------------------------------------------------------------------------


@pytest.mark.scenario("S01")
def test_s01_kill_9_of_one_thread_worker_loses_nothing_and_reruns_only_its_jobs_in_flight(scenario: Scenario):
    """At-least-once: a job the victim held at the kill runs again even when its body had
    already finished (its completion was not yet written); no other job runs twice."""
    sc = scenario
    n = sc.size(1000, 10_000)
    ids = sc.ledger_ids(n, 0.02, tick=1.0)
    workers = [sc.worker("default", "--isolation", "thread", "-c", "2", label=f"w{i}") for i in range(4)]
    for w in workers:
        w.wait_registered()
    began = time.monotonic()
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'succeeded'") >= 0.3 * n,
               120, message="30 % of the jobs done")
    victim, in_flight = wait_until(lambda: (lambda v: v if v[0] else None)(_busiest(sc, workers)), 10,
                                   message="a worker with jobs in hand")
    victim.kill9()
    killed_at = sc.db_now()
    in_flight = [r[0] for r in sc.rows(
        "SELECT id FROM pq_job WHERE status = 'running' AND worker_id = %(w)s", w=victim.worker_id())]
    survivors = [w for w in workers if w is not victim]
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'succeeded'") == n,
               sc.size(120, 600), interval=0.2, message="every job to succeed")
    wall = time.monotonic() - began
    counts = sc.status_counts(ids)
    ex = sc.executions()
    delays = _rescue_delays(sc, in_flight, killed_at)
    attempts = dict(sc.rows("SELECT id, attempts FROM pq_job WHERE id = ANY(%(ids)s)", ids=in_flight))
    sc.record(jobs=n, killed_in_flight=len(in_flight), rescue_s=round(max(delays, default=0.0), 2),
              executions=ex["executions"], unfinished_executions=ex["unfinished_executions"],
              max_finished_per_job=ex["max_finished_per_job"], overlaps=sc.overlaps(),
              jobs_per_s=round(n / wall, 1))
    twice = {r[0] for r in sc.rows("SELECT job_id FROM fault_ledger GROUP BY job_id HAVING count(*) > 1")}
    assert counts == {"succeeded": n}, counts
    assert ex["jobs"] == n and ex["max_started_per_job"] <= 2, ex
    assert twice <= set(in_flight), (twice, in_flight)
    assert ex["executions"] <= n + len(in_flight), ex
    assert ex["unfinished_executions"] <= 2, ex
    assert len(in_flight) <= 2 and len(delays) == len(in_flight), (in_flight, delays)
    assert all(a == 2 for a in attempts.values()), attempts
    assert max(delays, default=0.0) <= RESCUE_BOUND, delays
    assert sc.overlaps() == 0
    assert all(w.alive() for w in survivors)
    assert {w.worker_id() for w in survivors} <= {r[0] for r in sc.rows("SELECT id FROM pq_worker")}


# -- S02 ---------------------------------------------------------------------------------------------


def _job_process(sc: Scenario, attempt: int = 1) -> psutil.Process:
    """The process running the ledger job's attempt (a fork server's child, or the worker's)."""
    pid = sc.scalar("SELECT pid FROM fault_ledger WHERE attempt = %(a)s", a=attempt)
    return psutil.Process(pid)


def _runner_of(sc: Scenario, job_id: int, workers):
    wid = sc.scalar("SELECT worker_id FROM pq_job WHERE id = %(j)s AND status = 'running'", j=job_id)
    return next((w for w in workers if w.worker_id() == wid), None)


@pytest.mark.scenario("S02")
def test_s02_an_orphaned_fork_child_dies_with_its_parent_and_the_job_runs_once_more(scenario: Scenario):
    sc = scenario
    seconds = sc.size(4.0, 10.0)
    a = sc.worker("default", label="a")
    b = sc.worker("default", label="b")
    a.wait_registered()
    b.wait_registered()
    (job_id,) = sc.ledger_ids(1, seconds, tick=0.2)
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger WHERE last_seen IS NOT NULL") > 0,
               20, message="the job to run and tick")
    parent = _runner_of(sc, job_id, (a, b))
    assert parent is not None
    other = b if parent is a else a
    child = _job_process(sc)
    assert child.pid in {p.pid for p in parent.children()}, "not a process of the worker"
    parent.kill_parent()
    killed = time.monotonic()
    killed_at = sc.db_now()
    wait_until(lambda: not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE,
               5, interval=0.01, message="the orphaned child to die")
    child_exit_s = time.monotonic() - killed
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job_id) == "succeeded",
               seconds + 20, interval=0.1, message="the rescued job to finish")
    first, second = sc.rows("SELECT attempt, pid, last_seen, finished_at, started_at FROM fault_ledger "
                            "ORDER BY id")
    late_tick = (first[2] - killed_at).total_seconds() if first[2] else -1.0
    delays = _rescue_delays(sc, [job_id], killed_at)
    sc.record(child_exit_s=round(child_exit_s, 3), last_tick_after_kill_s=round(late_tick, 3),
              rescue_s=round(delays[0], 2) if delays else None, executions=2, overlaps=sc.overlaps())
    assert child_exit_s <= 1.0
    assert first[3] is None and late_tick <= 1.0, first
    assert delays and delays[0] <= RESCUE_BOUND, delays
    assert second[0] == 2 and second[3] is not None
    assert sc.scalar("SELECT worker_id FROM pq_job WHERE id = %(j)s", j=job_id) == other.worker_id()
    assert sc.overlaps() == 0


# -- S03 ---------------------------------------------------------------------------------------------


@pytest.mark.scenario("S03")
def test_s03_fork_children_that_die_badly_fail_their_job_and_the_worker_lives_on(scenario: Scenario):
    sc = scenario
    k = sc.size(2, 25)
    crash = [("tests.tasks.sigkill_self", (), "SIGKILL"), ("tests.tasks.segfault", (), "SIGSEGV"),
             ("tests.tasks.hard_exit", (3,), "exited with code 3"),
             ("tests.tasks.allocate", (2048,), "MemoryError")]
    w = sc.worker("default", "--memory-limit", "512M")
    w.wait_registered()
    claim_pid = sc.scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                          "AND application_name LIKE 'sqla_pq:claim:%%'")
    calls = []
    for _ in range(k):
        for path, args, _why in crash:
            calls.append((path, args))
            calls.append((tasks.work, (sc.url_str, 0.0)))
    expected = {}
    for path, args in calls:
        job = sc.pq.enqueue_call(path, args=args)
        expected[job.id] = next((why for p, _a, why in crash if p == path), None)
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status IN ('succeeded', 'failed')")
               == len(calls), sc.size(60, 300), interval=0.1, message="every job to finish")
    jobs = sc.rows("SELECT id, status, error, started_at, finished_at FROM pq_job ORDER BY started_at")
    gaps = []
    for before, after in zip(jobs, jobs[1:]):
        if expected[before[0]] is not None:
            gaps.append((after[3] - before[4]).total_seconds())
    claim_pid_after = sc.scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                "AND application_name LIKE 'sqla_pq:claim:%%'")
    child_backends = wait_until(lambda: sc.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fault_ledger' "
        "AND datname = current_database()") == 0 or None, 5, message="the children's connections to go")
    out = w.output()
    sc.record(crash_jobs=sum(1 for v in expected.values() if v), good_jobs=sum(1 for v in expected.values() if not v),
              max_next_start_after_crash_s=round(max(gaps), 3), claim_backend_kept=claim_pid == claim_pid_after)
    for job_id, status, error, _s, _f in jobs:
        why = expected[job_id]
        if why is None:
            assert status == "succeeded", (job_id, error)
        else:
            assert status == "failed" and why in (error or ""), (job_id, why, error)
    assert w.alive()
    assert max(gaps) <= 1.0, gaps
    assert claim_pid == claim_pid_after, "the parent's claim connection was replaced"
    assert child_backends
    for bad in ("SSL error", "lost synchronization", "server closed the connection"):
        assert bad not in out


# -- S04 ---------------------------------------------------------------------------------------------


@pytest.mark.scenario("S04")
def test_s04_a_frozen_thread_workers_late_completion_is_fenced(scenario: Scenario):
    sc = scenario
    a = sc.worker("default", "--isolation", "thread", label="a")
    a.wait_registered()
    (job_id,) = sc.ledger_ids(1, 3.0, tick=0.2, max_retries=0)
    wait_until(lambda: sc.scalar("SELECT worker_id FROM pq_job WHERE id = %(j)s AND status = 'running'",
                                 j=job_id) == a.worker_id(), 20, message="A to run J")
    b = sc.worker("default", "--isolation", "thread", label="b")
    b.wait_registered()
    a.stop_process()
    frozen_at = sc.db_now()
    wait_until(lambda: sc.scalar("SELECT worker_id FROM pq_job WHERE id = %(j)s AND status = 'running' "
                                 "AND attempts = 2", j=job_id) == b.worker_id(), 15, interval=0.05,
               message="B to take J")
    rescue = _rescue_delays(sc, [job_id], frozen_at)
    remaining = 2 * LEASE - (sc.db_now() - frozen_at).total_seconds()
    if remaining > 0:
        time.sleep(remaining)  # the fault itself: A stays frozen for 2x the lease
    a.continue_process()
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job_id) == "succeeded",
               20, message="J to succeed")
    wait_until(lambda: sc.scalar(
        "SELECT count(*) FROM fault_ledger WHERE attempt = 1 AND (finished_at IS NOT NULL OR "
        "coalesce(last_seen, started_at) < clock_timestamp() - interval '1 second')") == 1,
        20, message="A's stale execution to end (finished, its outcome discarded, or stopped)")
    markers = ("were taken from this worker while they ran", "lost its lease", "stopping job")
    wait_until(lambda: any(m in a.output() for m in markers), 10,
               message="A to log that it lost the job")
    into_succeeded = sc.scalar("SELECT count(*) FROM fault_transition WHERE job_id = %(j)s "
                               "AND new_status = 'succeeded'", j=job_id)
    job = sc.pq.get_job(job_id)
    b_row = sc.scalar("SELECT id FROM fault_ledger WHERE attempt = 2")
    overlaps = sc.overlaps()
    sc.record(rescue_s=round(rescue[0], 2) if rescue else None, attempts=job.attempts,
              overlaps=overlaps, transitions_into_succeeded=into_succeeded)
    sc.allow.add("overlap")
    sc.notes.append("thread mode: a frozen-then-resumed job thread runs until its worker's next "
                    "lease check; the overlap is bounded by the next S04 test")
    assert rescue and rescue[0] <= RESCUE_BOUND
    assert job.attempts == 2 and job.return_value() == b_row, "J's result is B's"
    assert into_succeeded == 1


@pytest.mark.scenario("S04")
def test_s04_a_frozen_then_resumed_thread_workers_lost_job_stops_within_a_lease_check(
        scenario: Scenario):
    """Thread mode cannot stop a thread while its whole process is frozen (SIGSTOP, a VM pause):
    on resume the job thread and the worker's lease check race.  The promise is bounded: the
    stale thread is stopped (LeaseLost) at the first lease check, well within a heartbeat, and
    its attempt is neither completed nor failed.  Fork mode has no such window (S04b)."""
    sc = scenario
    a = sc.worker("default", "--isolation", "thread", label="a")
    b = sc.worker("default", "--isolation", "thread", label="b")
    a.wait_registered()
    b.wait_registered()
    b.stop_process()  # keep J for A
    (job_id,) = sc.ledger_ids(1, 3.0, tick=0.1, max_retries=0)
    wait_until(lambda: sc.scalar("SELECT worker_id FROM pq_job WHERE id = %(j)s AND status = 'running'",
                                 j=job_id) == a.worker_id(), 20, message="A to run J")
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger WHERE attempt = 1 "
                                 "AND last_seen IS NOT NULL") == 1, 10, message="J's body to be running")
    b.continue_process()
    a.stop_process()
    wait_until(lambda: sc.scalar("SELECT attempts FROM pq_job WHERE id = %(j)s AND status = 'running'",
                                 j=job_id) == 2, 15, message="B to take J")
    a.continue_process()
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job_id) == "succeeded",
               20, message="J to succeed on B")
    wait_until(lambda: "lost its lease" in a.output() or "stopping job" in a.output(), 10,
               message="A to say it stopped the job it lost")
    resumed = sc.scalar(
        "SELECT extract(epoch FROM greatest(a.last_seen, b.started_at) - b.started_at)::float8 "
        "FROM fault_ledger a, fault_ledger b WHERE a.attempt = 1 AND b.attempt = 2")
    first = sc.rows("SELECT finished_at IS NOT NULL FROM fault_ledger WHERE attempt = 1")[0][0]
    into_succeeded = sc.scalar("SELECT count(*) FROM fault_transition WHERE job_id = %(j)s "
                               "AND new_status = 'succeeded'", j=job_id)
    sc.record(stale_thread_ran_alongside_s=round(resumed or 0.0, 2), overlaps=sc.overlaps(),
              stale_attempt_finished=first)
    sc.allow.add("overlap")
    assert not first, "A's stale execution ran to its end instead of being stopped"
    assert into_succeeded == 1
    assert (resumed or 0.0) <= HEARTBEAT + 1.0


@pytest.mark.scenario("S04")
def test_s04b_a_frozen_fork_parents_child_stops_itself_before_the_job_is_rescued(scenario: Scenario):
    sc = scenario
    a = sc.worker("default", label="a")
    a.wait_registered()
    (job_id,) = sc.ledger_ids(1, sc.size(4.0, 10.0), tick=0.1, max_retries=0)
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger WHERE last_seen IS NOT NULL") > 0,
               20, message="A's child to run J")
    child = _job_process(sc)
    b = sc.worker("default", label="b")
    b.wait_registered()
    a.stop_process()  # the parent only: its child runs on, unrenewed
    frozen = time.monotonic()
    frozen_at = sc.db_now()
    wait_until(lambda: not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE,
               10, interval=0.02, message="the child to stop itself")
    child_gone_s = time.monotonic() - frozen
    wait_until(lambda: sc.scalar("SELECT attempts FROM pq_job WHERE id = %(j)s AND status = 'running'",
                                 j=job_id) == 2, 15, message="B to take J")
    rescue = _rescue_delays(sc, [job_id], frozen_at)
    a.continue_process()
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job_id) == "succeeded",
               30, message="J to succeed on B")
    first_last_seen = sc.scalar("SELECT last_seen FROM fault_ledger WHERE attempt = 1")
    second_start = sc.scalar("SELECT started_at FROM fault_ledger WHERE attempt = 2")
    margin = (second_start - first_last_seen).total_seconds()
    sc.record(child_self_stop_s=round(child_gone_s, 2), rescue_s=round(rescue[0], 2) if rescue else None,
              gap_between_executions_s=round(margin, 2), overlaps=sc.overlaps())
    assert "stopped renewing its lease" in a.output()
    assert rescue and rescue[0] <= RESCUE_BOUND
    assert margin > 0 and sc.overlaps() == 0


# -- S05 ---------------------------------------------------------------------------------------------


@pytest.mark.scenario("S05")
def test_s05_rescue_racing_completion_leaves_exactly_one_final_state_per_attempt(scenario: Scenario):
    from sqla_pq.execution.call import Outcome
    from sqla_pq.link import Link
    from sqla_pq.maintenance.rescuer import Rescuer
    from sqla_pq.record import record_outcomes

    sc = scenario
    n, rounds = sc.size(200, 1000), sc.size(10, 50)
    rescuer_link = Link(sc.engine, "maintenance", "race-rescuer")
    worker_link = Link(sc.engine, "claim", "race-worker")
    rescuer = Rescuer(RESCUE, 3600.0, forget_after=3600.0)
    won = {"completion": 0, "rescue": 0}
    deadlocks = 0
    try:
        for r in range(rounds):
            ghost = f"ghost-{r}"
            sc.execute("INSERT INTO pq_worker (id, name, hostname, pid, isolation, state, expires_at) "
                       "VALUES (%(g)s, 'ghost', 'nowhere', 0, 'thread', 'busy', now())", g=ghost)
            ids = [row[0] for row in sc.rows(
                "INSERT INTO pq_job (queue, task, args, kwargs, status, attempts, worker_id, started_at) "
                "SELECT 'race', 'tests.faults.tasks.noop', '[]', '{}', 'running', 1, %(g)s, now() "
                "FROM generate_series(1, %(n)s) RETURNING id", g=ghost, n=n)]
            if r % 2:
                ids.reverse()  # the other lock order, every other round
            outcomes = [Outcome(i, 1, "succeeded", result_json="1") for i in ids]
            barrier = threading.Barrier(2)
            recorded: list = []
            errors: list = []

            def complete(barrier=barrier, recorded=recorded, outcomes=outcomes,
                         errors=errors) -> None:
                nonlocal deadlocks
                barrier.wait()
                for _ in range(20):  # what the worker does: keep the outcomes, retry
                    try:
                        recorded.append(record_outcomes(worker_link, outcomes, failure_ttl=3600))
                        return
                    except Exception as exc:  # noqa: BLE001
                        worker_link.reset()
                        if "deadlock" in str(exc):
                            deadlocks += 1
                        else:
                            errors.append(exc)
                            return

            def rescue(barrier=barrier, errors=errors) -> None:
                nonlocal deadlocks
                barrier.wait()
                for _ in range(20):
                    try:
                        rescuer.run_once(rescuer_link)
                        return
                    except Exception as exc:  # noqa: BLE001
                        rescuer_link.reset()
                        if "deadlock" in str(exc):
                            deadlocks += 1
                        else:
                            errors.append(exc)
                            return

            threads = [threading.Thread(target=complete), threading.Thread(target=rescue)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            done = recorded[0]
            states = dict(sc.rows("SELECT status, count(*) FROM pq_job WHERE worker_id = %(g)s "
                                  "GROUP BY status", g=ghost))
            assert states.get("succeeded", 0) + states.get("queued", 0) == n, states
            assert len(done.succeeded) == states.get("succeeded", 0)
            assert len(done.stale) == states.get("queued", 0)
            assert sc.scalar("SELECT count(*) FROM pq_job WHERE worker_id = %(g)s AND status = 'queued' "
                             "AND interruptions <> 1", g=ghost) == 0
            won["completion"] += states.get("succeeded", 0)
            won["rescue"] += states.get("queued", 0)
            sc.execute("DELETE FROM pq_job WHERE worker_id = %(g)s AND status = 'queued'", g=ghost)
    finally:
        rescuer_link.close()
        worker_link.close()
    twice = sc.scalar("SELECT count(*) FROM (SELECT job_id FROM fault_transition WHERE old_status = "
                      "'running' GROUP BY job_id HAVING count(*) > 1) x")
    back = sc.scalar("SELECT count(*) FROM fault_transition WHERE old_status = 'succeeded'")
    sc.record(rounds=rounds, jobs_per_round=n, completions_won=won["completion"],
              rescues_won=won["rescue"], deadlocks=deadlocks)
    assert twice == 0 and back == 0


# -- S06 ---------------------------------------------------------------------------------------------


@pytest.mark.scenario("S06")
def test_s06a_a_restarted_worker_with_the_same_name_does_not_own_its_predecessors_job(scenario: Scenario):
    sc = scenario
    old = sc.worker("default", name="w1", label="w1-old")
    old_id = old.wait_registered()
    (job_id,) = sc.ledger_ids(1, 2.0, tick=0.2)
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger") == 1, 20, message="the job to start")
    old.kill9()
    killed_at = sc.db_now()
    new = sc.worker("default", name="w1", label="w1-new")
    new_id = new.wait_registered()
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job_id) == "succeeded",
               30, message="the job to be rescued and finish")
    delays = _rescue_delays(sc, [job_id], killed_at)
    job = sc.pq.get_job(job_id)
    sc.record(rescue_s=round(delays[0], 2) if delays else None, attempts=job.attempts)
    assert new_id != old_id and new_id.startswith("w1.") and old_id.startswith("w1.")
    assert delays and delays[0] <= RESCUE_BOUND
    assert job.attempts == 2 and job.interruptions == 1
    assert sc.scalar("SELECT count(*) FROM fault_ledger WHERE finished_at IS NOT NULL") == 1


@pytest.mark.scenario("S06")
def test_s06b_a_job_whose_workers_registry_row_vanished_is_not_lost(scenario: Scenario):
    sc = scenario
    # A's own rescuer sweeps only at start: A's heartbeat is the first to see the row gone
    a = sc.worker("default", label="a", rescue_interval=60)
    a_id = a.wait_registered()
    (job_id,) = sc.ledger_ids(1, 2.0, tick=0.1)
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger WHERE last_seen IS NOT NULL") > 0, 20,
               message="A to run the job")
    sc.execute("DELETE FROM pq_worker WHERE id = %(w)s", w=a_id)
    deleted = time.monotonic()
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_worker WHERE pid = %(p)s", p=a.pid) == 1, 10,
               message="A to re-register")
    sc.record(reregistered_s=round(time.monotonic() - deleted, 2),
              same_id=sc.scalar("SELECT id FROM pq_worker WHERE pid = %(p)s", p=a.pid) == a_id)
    b = sc.worker("default", label="b")  # a healthy rescuer
    b.wait_registered()
    bound = LEASE + RESCUE + 2.0 + 3.0
    try:
        wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job_id) == "succeeded",
                   bound, message="the job to run again and finish")
    finally:
        sc.record(status=sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job_id),
                  executions=sc.executions()["executions"])


@pytest.mark.scenario("S06")
def test_s06b_a_worker_whose_registry_row_vanishes_never_runs_its_job_alongside_another(scenario: Scenario):
    sc = scenario
    # A beats every 2 s (lease 6 s), B sweeps every 0.1 s: the rescuer sees the row gone first
    a = sc.worker("default", label="a", heartbeat=2, lease=6)
    a_id = a.wait_registered()
    (job_id,) = sc.ledger_ids(1, 3.0, tick=0.1)
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger WHERE last_seen IS NOT NULL") > 0, 20,
               message="A to run the job")
    b = sc.worker("default", label="b", rescue_interval=0.1)
    b.wait_registered()
    sc.execute("DELETE FROM pq_worker WHERE id = %(w)s", w=a_id)
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job_id) == "succeeded",
               30, message="the job to finish")
    overlaps = sc.overlaps()
    sc.record(overlaps=overlaps, executions=sc.executions()["executions"])
    assert overlaps == 0


# -- S07 ---------------------------------------------------------------------------------------------


def _three_busy(sc: Scenario, workers, seconds: float) -> dict:
    """Enqueue one ledger job per worker and wait until each worker runs one: {worker: job}."""
    sc.ledger_ids(len(workers), seconds, tick=0.2)
    wait_until(lambda: sc.scalar("SELECT count(DISTINCT worker_id) FROM pq_job WHERE status = 'running'")
               == len(workers), 20, message="every worker to hold a job")
    held = dict(sc.rows("SELECT worker_id, id FROM pq_job WHERE status = 'running'"))
    return {w: held[w.worker_id()] for w in workers}


@pytest.mark.scenario("S07")
def test_s07_every_graceful_stop_path_finishes_or_gives_back_the_job_in_hand(scenario: Scenario):
    sc = scenario
    job_s = sc.size(2.0, 5.0)
    w1, w2, w3 = (sc.worker("default", label=f"w{i}") for i in (1, 2, 3))
    for w in (w1, w2, w3):
        w.wait_registered()
    held = _three_busy(sc, (w1, w2, w3), job_s)
    sc.ledger_ids(6, job_s, tick=0.2)  # work a worker that ignored its stop would take
    signalled_at = sc.db_now()
    t0 = time.monotonic()
    w1.signal(signal.SIGTERM)
    w2.signal(signal.SIGTERM)
    time.sleep(0.3)
    w2.signal(signal.SIGTERM)
    t2 = time.monotonic()
    sc.pq.stop_worker(w3.worker_id())
    assert w2.wait(10) == 0
    cold_exit_s = time.monotonic() - t2
    assert w1.wait(job_s + 10) == 0
    warm_exit_s = time.monotonic() - t0
    assert w3.wait(job_s + 10) == 0
    flag_exit_s = time.monotonic() - t0
    states = {w.label: sc.rows("SELECT status, interruptions FROM pq_job WHERE id = %(j)s", j=held[w])[0]
              for w in (w1, w2, w3)}
    claims_after = sc.scalar(
        "SELECT count(*) FROM fault_transition WHERE new_status = 'running' AND at > %(t)s "
        "AND worker_id = ANY(%(w)s)", t=signalled_at, w=[w.worker_id() for w in (w1, w2, w3)])

    # sqla-pq worker --terminate: three more workers, each with a job in hand
    more = [sc.worker("default", label=f"t{i}") for i in (1, 2, 3)]
    for w in more:
        w.wait_registered()
    wait_until(lambda: sc.scalar("SELECT count(DISTINCT worker_id) FROM pq_job WHERE status = 'running'")
               == 3, 20, message="the three new workers to hold jobs")
    t3 = time.monotonic()
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sqla_pq", "worker", "--terminate", "--wait", "60"],
                            env=sc.env(), capture_output=True, text=True, timeout=120)
    terminate_s = time.monotonic() - t3
    exits = [w.wait(10) for w in more]
    sc.record(warm_exit_s=round(warm_exit_s, 2), cold_exit_s=round(cold_exit_s, 2),
              stop_flag_exit_s=round(flag_exit_s, 2), terminate_s=round(terminate_s, 2), job_s=job_s)
    assert states["w1"][0] == "succeeded" and states["w3"][0] == "succeeded", states
    assert states["w2"] == ("queued", 1), states
    assert claims_after == 0, "a stopping worker claimed a new job"
    assert cold_exit_s <= 2.0
    assert warm_exit_s <= job_s + 2.0
    assert flag_exit_s <= job_s + HEARTBEAT + 2.0
    assert result.returncode == 0 and "0 still running" in result.stdout, result.stdout + result.stderr
    assert exits == [0, 0, 0]
    assert terminate_s <= job_s + 5.0
    assert sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'running'") == 0
    assert "Warm shut down" in w1.output() and "Cold shut down" in w2.output()


# -- S08 ---------------------------------------------------------------------------------------------


@pytest.mark.scenario("S08")
def test_s08_a_timeout_kills_the_fork_job_with_its_grandchildren_and_no_thread_retry_overlaps(
        scenario: Scenario, tmp_path):
    sc = scenario
    fork = sc.worker("fork", label="fork")
    thread = sc.worker("thread", "--isolation", "thread", "-c", "2", label="thread")
    fork.wait_registered()
    thread.wait_registered()
    pidfile = tmp_path / "grandchild"
    forked = sc.pq.queue("fork").enqueue_call(tasks.spawn_sleeper, args=(sc.url_str, str(pidfile)),
                                              timeout=2)
    stuck = sc.pq.queue("thread").enqueue_call(tasks.stuck, args=(sc.url_str, 5.0, "stuck"), timeout=2,
                                               max_retries=1)
    grandchild = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20,
                                message="the grandchild to start"))
    stuck_started = wait_until(lambda: sc.scalar(
        "SELECT started_at FROM fault_ledger WHERE tag = 'stuck'"), 20, message="the stuck job to start")
    # past its timeout, the stuck thread's job keeps its lease: still running, no retry
    wait_until(lambda: (sc.db_now() - stuck_started).total_seconds() > 3.0, 10, message="3 s")
    mid = sc.rows("SELECT j.status, j.attempts, w.expires_at > now() FROM pq_job j JOIN pq_worker w "
                  "ON w.id = j.worker_id WHERE j.id = %(j)s", j=stuck.id)
    for job in (forked,):
        wait_until(lambda job=job: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job.id)
                   == "failed", 15, message=f"job {job.id} to fail")
    wait_until(lambda: not psutil.pid_exists(grandchild), 5, message="the grandchild to be killed")
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=stuck.id) == "succeeded",
               20, message="the stuck job's retry to succeed")
    f = sc.pq.get_job(forked.id)
    s = sc.pq.get_job(stuck.id)
    fork_s = (f.finished_at - f.started_at).total_seconds()
    first, second = sc.rows("SELECT started_at, coalesce(finished_at, last_seen) FROM fault_ledger "
                            "WHERE tag = 'stuck' ORDER BY id")
    sc.record(fork_timeout_kill_s=round(fork_s, 2),
              thread_retry_gap_s=round((second[0] - first[1]).total_seconds(), 3))
    assert 2.0 <= fork_s <= 3.5 and "timeout" in f.error.lower(), (fork_s, f.error)
    assert fork.alive() and thread.alive()
    assert mid == [("running", 1, True)], "the stuck job must keep its lease until its thread ends"
    assert s.attempts == 2 and s.failures == 1
    assert second[0] >= first[1], "the retry started while the stuck thread still ran"


@pytest.mark.scenario("S08")
def test_s08_an_async_job_past_its_timeout_is_cancelled_at_the_timeout(scenario: Scenario):
    sc = scenario
    w = sc.worker("async", "--isolation", "thread", "-c", "1", label="thread")
    w.wait_registered()
    jobs = [sc.pq.queue("async").enqueue_call(tasks.async_work, args=(sc.url_str, 10.0, f"async{i}"),
                                              timeout=2) for i in range(3)]
    for job in jobs:
        wait_until(lambda job=job: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=job.id)
                   == "failed", 20, message=f"job {job.id} to time out")
    time.sleep(1.0)  # the cancellation has had a second to run after the last timeout
    got = sc.rows("SELECT tag, extract(epoch FROM last_seen - started_at)::float8 FROM fault_ledger ORDER BY id")
    errors = [sc.pq.get_job(j.id).error for j in jobs]
    sc.record(ledger=[(t, round(d, 2) if d is not None else None) for t, d in got])
    assert all("timeout" in (e or "").lower() for e in errors), errors
    # each coroutine saw its CancelledError at about 2 s, during its own job
    assert all(tag.endswith(":cancelled") and d is not None and d <= 3.0 for tag, d in got), got
