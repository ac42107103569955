"""Q, the SQL limit: how fast PostgreSQL itself claims and finishes jobs, with pgbench.

A table shaped like a job queue (the columns and partial index a SKIP LOCKED queue needs) is
filled with ``rows`` queued jobs in a database of its own; then ``q_clients`` pgbench clients
each repeat: claim ``q_claim`` rows with ``FOR UPDATE SKIP LOCKED`` (marking them running) in
one transaction, mark them succeeded in a second.  Each client runs exactly its share of the
rows, so no claim comes back short.  jobs/s = rows finished / pgbench's measured duration.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from .common import BenchError, Sizes

DATABASE = "bench_sql_limit"
ORIENTATION_JOBS_PER_S = 52_000
"""BENCH.md's figure at 2 clients: sizes the table for about ``q_seconds_hint`` seconds."""

DDL = """
CREATE TABLE bench_job (
    id bigserial PRIMARY KEY,
    queue text NOT NULL DEFAULT 'default',
    task text NOT NULL DEFAULT 'benchmarks.tasks.noop',
    status text NOT NULL DEFAULT 'queued',
    priority smallint NOT NULL DEFAULT 50,
    args jsonb NOT NULL DEFAULT '[]',
    run_at timestamptz NOT NULL DEFAULT now(),
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    attempts int NOT NULL DEFAULT 0,
    worker_id text
);
CREATE INDEX bench_job_ready ON bench_job (queue, priority DESC, run_at, id)
    WHERE status = 'queued';
"""

SCRIPT = """\
WITH claimed AS MATERIALIZED (
    SELECT id FROM bench_job
    WHERE queue = 'default' AND status = 'queued' AND run_at <= now()
    ORDER BY priority DESC, run_at, id
    LIMIT {claim}
    FOR UPDATE SKIP LOCKED
), started AS (
    UPDATE bench_job j
    SET status = 'running', started_at = now(), attempts = j.attempts + 1,
        worker_id = 'pgbench'
    FROM claimed WHERE j.id = claimed.id
    RETURNING j.id
)
SELECT coalesce(array_agg(id), '{{}}') AS ids FROM started
\\gset
UPDATE bench_job SET status = 'succeeded', finished_at = now()
WHERE id = ANY (:ids::bigint[]);
"""


def pgbench_path() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for version in ("17", "16", "15", "14"):
        path = f"/usr/lib/postgresql/{version}/bin/pgbench"
        if os.path.exists(path):
            return path
    raise BenchError("pgbench is not installed")


def measure(server_url: str, sizes: Sizes, keep: bool = False) -> dict[str, Any]:
    """Run Q on the server of ``server_url`` (any database in the URL is ignored)."""
    import psycopg2

    pgbench = pgbench_path()
    per_client = max(1, round(ORIENTATION_JOBS_PER_S * sizes.q_seconds_hint
                              / (sizes.q_clients * sizes.q_claim)))
    rows = per_client * sizes.q_clients * sizes.q_claim
    parts = urlsplit(server_url.replace("+psycopg2", ""))
    conn_args = {"host": parts.hostname or "127.0.0.1", "port": parts.port or 5432,
                 "user": unquote(parts.username or "postgres"),
                 "password": unquote(parts.password) if parts.password else None}
    admin = psycopg2.connect(dbname="postgres", **conn_args)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
            cur.execute(f"CREATE DATABASE {DATABASE}")
        db = psycopg2.connect(dbname=DATABASE, **conn_args)
        db.autocommit = True
        try:
            with db.cursor() as cur:
                cur.execute(DDL)
                cur.execute("INSERT INTO bench_job (queue) SELECT 'default' "
                            "FROM generate_series(1, %s)", (rows,))
                cur.execute("VACUUM ANALYZE bench_job")
            output = _pgbench(pgbench, conn_args, sizes, per_client)
            with db.cursor() as cur:
                cur.execute("SELECT count(*) FROM bench_job WHERE status = 'succeeded'")
                finished = cur.fetchone()[0]
        finally:
            db.close()
        if not keep:
            with admin.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
    finally:
        admin.close()
    tps = _number(r"^tps = ([\d.]+)", output)
    processed = _number(r"number of transactions actually processed: (\d+)", output)
    seconds = processed / tps
    if finished != rows:
        raise BenchError(f"pgbench finished {finished} of {rows} rows", output)
    return {"jobs": rows, "clients": sizes.q_clients, "claim": sizes.q_claim,
            "transactions": int(processed), "tps": tps, "seconds": seconds,
            "jobs_per_s": finished / seconds}


def _pgbench(pgbench: str, conn: dict[str, Any], sizes: Sizes, per_client: int) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="bench_claim_",
                                     delete=False) as f:
        f.write(SCRIPT.format(claim=sizes.q_claim))
    env = dict(os.environ)
    if conn["password"]:
        env["PGPASSWORD"] = conn["password"]
    cmd = [pgbench, "-n", "-M", "prepared", "-c", str(sizes.q_clients), "-j",
           str(sizes.q_clients), "-t", str(per_client), "-f", f.name,
           "-h", conn["host"], "-p", str(conn["port"]), "-U", conn["user"], DATABASE]
    try:
        started = time.monotonic()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=600 + sizes.q_seconds_hint * 20)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise BenchError(f"pgbench exited with {done.returncode} after "
                         f"{time.monotonic() - started:.1f}s", done.stdout + done.stderr)
    return done.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text, re.MULTILINE)
    if not match:
        raise BenchError(f"pgbench output without /{pattern}/", text)
    return float(match.group(1))
