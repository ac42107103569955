"""D. Claiming and concurrency (S19-S22): exactly-once claims under contention and forced plan
shapes, the claim plan, client_id and upsert races, a serial queue under kills."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.faults.harness import LEASE, RESCUE, Scenario, wait_until
from tests.helpers import plan_nodes

pytestmark = pytest.mark.fault


# -- S19 ----------------------------------------------------------------------------------------------------


PLAN_VARIANTS = {
    "default": None,
    "enable_indexscan=off": "-c enable_indexscan=off",
    "enable_nestloop=off": "-c enable_nestloop=off",
    "force_custom_plan": "-c plan_cache_mode=force_custom_plan",
}


@pytest.mark.scenario("S19")
def test_s19_every_job_is_claimed_exactly_once_under_contention_whatever_the_plan(scenario: Scenario):
    from sqla_pq import queries
    from sqla_pq.db import create_engine
    from sqla_pq.link import Link

    sc = scenario
    n = sc.size(2000, 20_000)
    claimers, batch = 8, 7
    figures = {}
    for variant, options in PLAN_VARIANTS.items():
        sc.execute("INSERT INTO pq_job (queue, task, args, kwargs) SELECT 'q' || (i %% 4), "
                   "'tests.faults.tasks.noop', '[]', '{}' FROM generate_series(1, %(n)s) i", n=n)
        sc.execute("ANALYZE pq_job")
        engine = create_engine(sc.url, connect_args={"options": options} if options else {},
                               pool_size=claimers)
        claimed: list[list[int]] = [[] for _ in range(claimers)]
        sizes: list[int] = []
        errors: list[str] = []
        barrier = threading.Barrier(claimers)

        def claim(i: int, engine=engine, variant=variant, options=options, barrier=barrier,
                  errors=errors, sizes=sizes, claimed=claimed) -> None:
            link = Link(engine, "claim", f"claimer-{variant}-{i}",
                        settings={"plan_cache_mode": "force_generic_plan"} if options is None else None)
            try:
                barrier.wait()
                empty = 0
                while empty < 3:
                    try:
                        rows = link.run(queries.job_claim(None, None, batch), {"worker": f"claimer-{i}"})
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                        link.reset()
                        continue
                    sizes.append(len(rows))
                    claimed[i].extend(r[0] for r in rows)
                    empty = empty + 1 if not rows else 0
            finally:
                link.close()

        t0 = time.monotonic()
        threads = [threading.Thread(target=claim, args=(i,)) for i in range(claimers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - t0
        engine.dispose()
        ids = [i for c in claimed for i in c]
        attempts = sc.scalar("SELECT max(attempts) FROM pq_job WHERE status = 'running'")
        figures[variant] = {"claimed": len(ids), "max_batch": max(sizes), "claims_per_s": round(len(sizes) / elapsed),
                            "deadlocks": sum("deadlock" in e for e in errors), "errors": len(errors)}
        assert len(ids) == n and len(set(ids)) == n, (variant, len(ids), len(set(ids)))
        assert max(sizes) <= batch and attempts == 1, (variant, max(sizes), attempts)
        assert not errors, (variant, errors[:3])
        sc.execute("UPDATE pq_job SET status = 'succeeded', finished_at = now() WHERE status = 'running'")
    sc.record(jobs_per_variant=n, claimers=claimers, batch=batch, variants=figures)


# -- S20 ----------------------------------------------------------------------------------------------------


def _explain(sc: Scenario, queues, batch: int) -> dict:
    from sqla_pq import queries
    from sqla_pq.db import compile_raw
    from sqla_pq.link import Prepared

    stmt = compile_raw(queries.job_claim(queues, None, batch), sc.engine.dialect, None)
    prepared = Prepared.of(stmt.sql, 0)
    raw = sc.engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("SET plan_cache_mode = force_generic_plan")  # what a worker runs
        cur.execute(prepared.prepare_sql)
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + prepared.execute_sql,
                    stmt.params({"worker": "explain"}))
        plan = cur.fetchone()[0]
        raw.rollback()  # EXPLAIN ANALYZE ran the update
    finally:
        raw.close()
    return plan[0]["Plan"]


@pytest.mark.scenario("S20")
def test_s20_the_claim_plan_locks_its_batch_through_the_ready_index_in_a_materialized_cte(scenario: Scenario):
    sc = scenario
    queued, finished = sc.size(20_000, 100_000), sc.size(50_000, 500_000)
    sc.execute("INSERT INTO pq_job (queue, task, args, kwargs) SELECT 'q' || (i %% 20), "
               "'tests.faults.tasks.noop', '[]', '{}' FROM generate_series(1, %(n)s) i", n=queued)
    sc.execute("INSERT INTO pq_job (queue, task, args, kwargs, status, finished_at, expires_at) SELECT "
               "'q' || (i %% 20), 'tests.faults.tasks.noop', '[]', '{}', 'succeeded', now(), "
               "now() + interval '1 day' FROM generate_series(1, %(n)s) i", n=finished)
    sc.autocommit("VACUUM ANALYZE pq_job")
    figures = {}
    for label, queues, index in (("one queue", ("q7",), "ix_pq_job_ready"),
                                 ("two queues", ("q3", "q7"), "ix_pq_job_ready"),
                                 ("all queues", None, "ix_pq_job_ready_any")):
        plan = _explain(sc, queues, 5)
        nodes = list(plan_nodes(plan))
        used = {n.get("Index Name") for n in nodes if "Index Name" in n}
        locked = sum(n["Actual Rows"] * n.get("Actual Loops", 1) for n in nodes if n["Node Type"] == "LockRows")
        materialized = any(n.get("Subplan Name", "").startswith("CTE candidates") for n in nodes)
        buffers = plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
        figures[label] = {"locked": locked, "index": sorted(i for i in used if i), "buffers": buffers,
                          "materialized": materialized, "ms": plan.get("Actual Total Time")}
        assert index in used, json.dumps(plan)[:2000]
        assert 0 < locked <= 5, (label, locked)
        assert materialized, json.dumps(plan)[:2000]
        assert buffers < 1000, (label, buffers)
        assert not any(n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "pq_job" for n in nodes)
    sc.record(queued=queued, finished=finished, plans=figures)


# -- S21 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S21")
def test_s21_a_client_id_inserts_once_under_concurrency_and_upsert_keeps_one_pending_job(scenario: Scenario):
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from sqla_pq.errors import DuplicateClientId
    from tests.faults import tasks

    sc = scenario
    threads, rounds = sc.size(8, 16), sc.size(10, 100)
    outcomes = {"inserted": 0, "duplicate": 0, "other": []}
    lock = threading.Lock()
    for r in range(rounds):
        barrier = threading.Barrier(threads)

        def enqueue(r: int = r, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                sc.pq.enqueue_call(tasks.echo, args=(r,), client_id=f"cid-{r}")
                key = "inserted"
            except DuplicateClientId:
                key = "duplicate"
            except Exception as exc:  # noqa: BLE001
                with lock:
                    outcomes["other"].append(repr(exc)[:200])
                return
            with lock:
                outcomes[key] += 1

        ts = [threading.Thread(target=enqueue) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
    # joined to the caller's session: the duplicate leaves its transaction usable
    with Session(sc.engine) as s, s.begin():
        q = sc.pq.queue(session=s)
        with pytest.raises(DuplicateClientId):
            q.enqueue_call(tasks.echo, args=(0,), client_id="cid-0")
        assert s.execute(text("SELECT 1")).scalar() == 1
        q.enqueue_call(tasks.echo, args=("after",), client_id="cid-after")
    # concurrent upserts: one pending job, with one of the upserted arguments
    upserted = list(range(threads))
    barrier = threading.Barrier(threads)
    errors: list[str] = []

    def upsert(i: int) -> None:
        barrier.wait()
        try:
            sc.pq.upsert(tasks.echo, i, client_id="debounced")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc)[:200])

    ts = [threading.Thread(target=upsert, args=(i,)) for i in upserted]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    pending = sc.rows("SELECT args FROM pq_job WHERE client_id = 'debounced' AND status = 'queued'")
    sc.record(threads=threads, rounds=rounds, inserted=outcomes["inserted"], duplicates=outcomes["duplicate"],
              other_errors=len(outcomes["other"]), upsert_errors=len(errors))
    assert outcomes["other"] == [], outcomes["other"][:3]
    assert outcomes["inserted"] == rounds and outcomes["duplicate"] == rounds * (threads - 1)
    assert sc.scalar("SELECT count(*) FROM pq_job WHERE client_id = 'cid-after'") == 1
    assert errors == [] and len(pending) == 1 and pending[0][0][0] in upserted, (errors, pending)


# -- S22 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S22")
def test_s22_a_serial_queue_runs_one_job_at_a_time_through_kills(scenario: Scenario):
    from tests.faults import tasks

    sc = scenario
    n = sc.size(60, 300)
    calls = [(tasks.work, (sc.url_str, 0.05), {"tick": 0.02})] * n
    ids = [j.id for j in sc.pq.queue("serial", serial=True).enqueue_many(calls)]
    workers = [sc.worker("serial", label=f"w{i}") for i in range(3)]
    for w in workers:
        w.wait_registered()
    frees = []
    for kill in range(2):
        wait_until(lambda kill=kill: sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'succeeded'")
                   >= (kill + 1) * n // 4, 60, message="progress")

        def holding():
            wid = sc.scalar("SELECT worker_id FROM pq_job WHERE status = 'running' AND queue = 'serial'")
            return next((w for w in workers if w.alive() and w.worker_id() == wid), None)

        holder = wait_until(holding, 20, interval=0.01, message="the worker holding the serial slot")
        held = sc.scalar("SELECT id FROM pq_job WHERE status = 'running' AND worker_id = %(w)s",
                         w=holder.worker_id())
        holder.kill9()
        killed_at = sc.db_now()
        workers.append(sc.worker("serial", label=f"r{kill}"))
        nxt = wait_until(lambda killed_at=killed_at: sc.scalar(
            "SELECT min(at) FROM fault_transition WHERE new_status = 'running' AND at > %(t)s", t=killed_at),
            LEASE + RESCUE + 10, interval=0.05, message="the serial slot to free")
        frees.append((nxt - killed_at).total_seconds() if held else 0.0)
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'succeeded'") == n, 120,
               interval=0.2, message="every serial job to succeed")
    overlap = sc.scalar(
        "SELECT count(*) FROM fault_ledger a JOIN fault_ledger b ON a.id < b.id AND a.job_id <> b.job_id "
        "WHERE tstzrange(a.started_at, coalesce(a.finished_at, a.last_seen, a.started_at), '[]') && "
        "tstzrange(b.started_at, coalesce(b.finished_at, b.last_seen, b.started_at), '[]')")
    sc.record(jobs=n, slot_free_after_kill_s=[round(f, 2) for f in frees], queue_overlaps=overlap)
    assert sc.status_counts(ids) == {"succeeded": n}
    assert overlap == 0
    assert max(frees) <= 5.0, frees
