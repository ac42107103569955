"""I. Workflows, pruning, migrations (S36-S38): flows and fan-in under faults, the pruner's
correctness and lock footprint, concurrent migrations and schema checks."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest

from tests.faults.harness import Scenario, wait_until

pytestmark = pytest.mark.fault


# -- S36 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S36")
def test_s36_flows_survive_a_kill_stop_at_a_failed_step_and_fan_in_releases_once(scenario: Scenario):
    from sqla_pq import queries
    from sqla_pq.execution.call import Outcome
    from sqla_pq.link import Link
    from sqla_pq.record import record_outcomes
    from tests.faults import tasks

    sc = scenario
    # (a) a three-step flow, kill -9 during step 1
    with sc.pq.flow("flow", name="killed") as f:
        one = f.enqueue(tasks.work, sc.url_str, 2.0, tag="step1")
        f.enqueue(tasks.work, sc.url_str, 0.0, tag="step2")
        three = f.enqueue(tasks.work, sc.url_str, 0.0, tag="step3")
    # (b) a flow whose second step fails for good
    with sc.pq.flow("flow", name="failing") as g:
        g.enqueue(tasks.work, sc.url_str, 0.0, tag="ok")
        broken = g.enqueue_call(tasks.fail_step, args=("step two broke",), max_retries=0)
        never = g.enqueue(tasks.work, sc.url_str, 0.0, tag="never")
    a = sc.worker("flow", label="a")
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger WHERE tag = 'step1'") == 1, 30,
               message="step 1 to start")
    a.kill9()
    killed_at = sc.db_now()
    b = sc.worker("flow", label="b")
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=three.id) == "succeeded",
               30, message="the killed flow to finish")
    wait_until(lambda: sc.scalar("SELECT status FROM pq_job WHERE id = %(j)s", j=never.id) in
               ("cancelled", "failed"), 30, message="the failing flow to stop")
    ledger = {tag: rows for tag, rows in (
        (t, sc.rows("SELECT started_at, finished_at FROM fault_ledger WHERE tag = %(t)s ORDER BY id", t=t))
        for t in ("step1", "step2", "step3", "never"))}
    rescue = sc.scalar("SELECT extract(epoch FROM min(at) - %(k)s)::float8 FROM fault_transition WHERE "
                       "job_id = %(j)s AND new_status = 'queued' AND at > %(k)s", j=one.id, k=killed_at)
    stopped = sc.pq.get_job(never.id)
    # (c) fan-in: the last two parents finish at the same moment, the child is released once
    reps, parents_n = sc.size(10, 200), 50
    links = [Link(sc.engine, "claim", f"fanin-{i}") for i in range(3)]
    # the claimer below holds a lease like a worker's, so no rescuer takes its jobs meanwhile
    sc.execute("INSERT INTO pq_worker (id, name, hostname, pid, isolation, state, expires_at) VALUES "
               "('fanin', 'fanin', 'here', 0, 'thread', 'busy', now() + interval '1 hour')")
    released_twice = not_released = 0
    try:
        for _ in range(reps):
            parents = [j.id for j in sc.pq.queue("fanin").enqueue_many([tasks.noop] * parents_n)]
            child = sc.pq.queue("fanin").enqueue(tasks.noop, depends_on=parents)
            claimed = links[0].run(queries.job_claim(("fanin",), None, parents_n),
                                   {"worker": "fanin", "lease": 3600.0})
            by_id = {r[0]: r for r in claimed}
            assert sorted(by_id) == sorted(parents)
            record_outcomes(links[0], [Outcome(p, 1, "succeeded", result_json="null")
                                       for p in parents[:-2]], failure_ttl=3600)
            barrier = threading.Barrier(2)
            released: list[list[int]] = []

            def finish(link: Link, parent: int, barrier: threading.Barrier = barrier,
                       released: list[list[int]] = released) -> None:
                barrier.wait()
                done = record_outcomes(link, [Outcome(parent, 1, "succeeded", result_json="null")],
                                       failure_ttl=3600)
                released.append(done.released)

            ts = [threading.Thread(target=finish, args=(links[i + 1], parents[-2 + i])) for i in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
            times = sum(r.count(child.id) for r in released)
            released_twice += times > 1
            not_released += sc.scalar("SELECT status FROM pq_job WHERE id = %(c)s", c=child.id) != "queued"
            sc.execute("DELETE FROM pq_job WHERE queue = 'fanin'")
    finally:
        for link in links:
            link.close()
    sc.record(step1_rescue_s=round(rescue, 2) if rescue is not None else None,
              executions={k: len(v) for k, v in ledger.items()}, fan_in_reps=reps,
              fan_in_released_twice=released_twice, fan_in_not_released=not_released)
    assert len(ledger["step1"]) == 2 and len(ledger["step2"]) == 1 and len(ledger["step3"]) == 1
    assert ledger["step2"][0][0] >= ledger["step1"][1][1] and ledger["step3"][0][0] >= ledger["step2"][0][1]
    assert rescue is not None and rescue <= 5.0
    assert ledger["never"] == [] and stopped.started_at is None and str(broken.id) in (stopped.error or "")
    assert released_twice == 0 and not_released == 0
    assert b.alive()


# -- S37 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S37")
def test_s37_the_pruner_deletes_what_expired_in_batches_alone_and_touches_nothing_else(own_scenario: Scenario):
    from sqla_pq.link import Link
    from sqla_pq.maintenance.pruner import Pruner

    sc = own_scenario
    n = sc.size(10_000, 50_000)
    log_from = sc.cluster.log_size()
    sc.execute("INSERT INTO pq_job (queue, task, args, kwargs, status, attempts, result_ttl, finished_at, "
               "expires_at) SELECT 'done', 'tests.faults.tasks.noop', '[]', '{}', 'succeeded', 1, 1, now(), "
               "now() + interval '1 second' FROM generate_series(1, %(n)s)", n=n)
    sc.execute("INSERT INTO pq_job (queue, task, args, kwargs, status, attempts, result_ttl, finished_at) "
               "SELECT 'kept', 'tests.faults.tasks.noop', '[]', '{}', 'succeeded', 1, -1, now() "
               "FROM generate_series(1, 10)")
    sc.execute("INSERT INTO pq_job (queue, task, args, kwargs) SELECT 'parked', 'tests.faults.tasks.noop', "
               "'[]', '{}' FROM generate_series(1, 1000)")
    sc.pq.pause_queue("parked")
    expires = sc.scalar("SELECT max(expires_at) FROM pq_job")
    workers = [sc.worker("nothing-here", "--isolation", "thread", label=f"w{i}") for i in range(3)]
    for w in workers:
        w.wait_registered()
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE queue = 'done'") == 0, 30, interval=0.1,
               message="the expired jobs to be pruned")
    pruned_s = (sc.db_now() - expires).total_seconds()
    # one pruner at a time: while one pass holds the lock, another pass does nothing
    holder, other = Link(sc.engine, "maintenance", "holder"), Link(sc.engine, "maintenance", "other")
    pruner = Pruner(1.0)
    from sqla_pq import queries

    try:
        second: object = "never ran"
        for _ in range(50):  # the workers' own pruners take the lock now and then: retry
            with holder.transaction():
                if holder.run(queries.maintenance_try_lock(), {"key": pruner.lock_key})[0][0]:
                    second = pruner.run_locked(other)
                    break
            time.sleep(0.05)
    finally:
        holder.close()
        other.close()
    log = sc.cluster.log_text(log_from)
    waits = [float(m) for m in re.findall(r"still waiting for \S+ on .*? after ([\d.]+) ms", log)]
    deadlocks = log.count("deadlock detected")
    sc.record(expired_jobs=n, pruned_after_expiry_s=round(pruned_s, 2), batch=pruner.batch,
              max_batches_per_pass=pruner.max_batches, second_pass_while_locked=second,
              lock_waits_ms=waits[:5], deadlocks=deadlocks)
    assert pruned_s <= 1.0 + 2.0 + (n // (pruner.batch * pruner.max_batches)), pruned_s
    assert sc.scalar("SELECT count(*) FROM pq_job WHERE queue = 'kept'") == 10
    assert sc.scalar("SELECT count(*) FROM pq_job WHERE queue = 'parked' AND status = 'queued'") == 1000
    assert pruner.batch <= 5000
    assert second is None
    assert deadlocks == 0 and not [w for w in waits if w > 1000], waits


# -- S38 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S38")
def test_s38_concurrent_migrations_and_schema_checks_at_worker_start(scenario: Scenario, empty_db_url):
    sc = scenario
    empty = empty_db_url.render_as_string(hide_password=False)
    env = sc.env(url=empty)
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "sqla_pq", "migrate"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    migrate_s = time.monotonic() - t0
    import sqlalchemy as sa

    engine = sa.create_engine(empty_db_url, poolclass=sa.pool.NullPool)
    with engine.connect() as c:
        versions = [r[0] for r in c.exec_driver_sql("SELECT version_num FROM pq_alembic_version")]
        tables = c.exec_driver_sql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'pq_%%'").scalar()
    # a worker on a database without the schema says so and exits, once
    with engine.begin() as c:
        c.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    bare = subprocess.run([sys.executable, "-m", "sqla_pq", "worker", "--burst"], env=env,
                          capture_output=True, text=True, timeout=60)
    # a worker older than the schema refuses to start; a running one stops when told of a migration
    running = sc.worker("default", "--isolation", "thread", label="running")
    running.wait_registered()
    sc.execute("INSERT INTO pq_alembic_version (version_num) VALUES ('sqla_pq_9999_from_the_future')")
    refused = subprocess.run([sys.executable, "-m", "sqla_pq", "worker", "--burst"], env=sc.env(),
                             capture_output=True, text=True, timeout=60)
    sc.execute("SELECT pg_notify('sqla_pq', '!migrated')")
    stopped_code = running.wait(20)
    sc.execute("DELETE FROM pq_alembic_version WHERE version_num = 'sqla_pq_9999_from_the_future'")
    sc.record(concurrent_migrate_exit_codes=codes, migrate_s=round(migrate_s, 2), versions=versions,
              no_schema_exit=bare.returncode, newer_schema_exit=refused.returncode,
              running_worker_exit=stopped_code)
    sc.notes.append("upgrade -> downgrade -> upgrade with jobs kept needs a second revision; with one "
                    "revision a downgrade goes to base and drops the tables (covered by test_migrations)")
    assert codes == [0, 0, 0], outs
    assert len(versions) == 1 and tables >= 5
    assert bare.returncode != 0 and "sqla-pq migrate" in (bare.stdout + bare.stderr)
    assert (bare.stdout + bare.stderr).count("Traceback") == 0
    assert refused.returncode != 0 and "upgrade sqla_pq" in (refused.stdout + refused.stderr)
    assert stopped_code == 0 and "schema changed" in running.output()
