#!/usr/bin/env python3
"""BENCH.md's scenarios for sqla_pq and its peers, side by side, in one run:

    python benchmarks/run.py [--quick] [--only E1,P2,...] [--peers procrastinate,pgqueuer,rq]

sqla_pq runs from this (the repository's) environment, the peers from
``benchmarks/.venv-peers`` (created and filled with pip on first use), each on its own database
of the same PostgreSQL server (``bench_sqla_pq``, ``bench_procrastinate``, ...; created here,
dropped at the end) or, for RQ, on Redis.  Scenarios run one at a time, every system's turn of a
scenario next to the others', so that they share the machine's mood.  The report goes to stdout
and ``benchmarks/RESULTS.md``.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import datetime as dt
import functools
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import report, sql_limit  # noqa: E402
from benchmarks.adapters import PEERS  # noqa: E402
from benchmarks.adapters.sqla_pq_bench import SqlaPq  # noqa: E402
from benchmarks.common import Sizes  # noqa: E402
from benchmarks.peers import VENV, Peer, ensure_venv  # noqa: E402
from benchmarks.scenarios import SCENARIOS, run_scenario  # noqa: E402

ALL = ("E1", "E2", "P1", "P2", "Q", "PF", "L", "S", "M")
"""The order of a run: Q next to P2, the figure its target compares it with."""
assert set(ALL) == {*SCENARIOS, "Q"}
PEER_VARIANTS = {"procrastinate": ("default",), "pgqueuer": ("default",), "rq": ("simple", "fork")}
PG_DATABASES = {"sqla_pq": "bench_sqla_pq", "procrastinate": "bench_procrastinate",
                "pgqueuer": "bench_pgqueuer"}


@dataclasses.dataclass
class Row:
    library: str
    variant: str
    label: str
    settings: str
    scenarios: tuple[str, ...]
    measure: Callable[[str], dict[str, Any]]
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"library": self.library, "variant": self.variant, "label": self.label,
                "settings": self.settings, "results": self.results}


# -- databases ----------------------------------------------------------------------------------


def _url(server: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(server).set(drivername="postgresql", database=database).render_as_string(
        hide_password=False)


def _admin(server: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(_url(server, "postgres"))
    conn.autocommit = True
    return conn


def recreate_database(server: str, name: str) -> str:
    """Drop (if left by an earlier run) and create one of the benchmark's own databases."""
    assert name.startswith("bench_"), name  # never anyone else's
    conn = _admin(server)
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return _url(server, name)


def drop_database(server: str, name: str) -> None:
    assert name.startswith("bench_"), name
    conn = _admin(server)
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def server_facts(server: str) -> dict[str, str]:
    conn = _admin(server)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT name, setting, unit FROM pg_settings WHERE name IN "
                        "('server_version', 'fsync', 'synchronous_commit', 'shared_buffers', "
                        "'max_connections')")
            found = {name: f"{setting}{' × ' + unit if unit else ''}"
                     for name, setting, unit in cur.fetchall()}
    finally:
        conn.close()
    version = found.pop("server_version", "?")
    return {"PostgreSQL": f"{version} ({', '.join(f'{k}={v}' for k, v in sorted(found.items()))})"}


def sqla_pq_version() -> str:
    import sqla_pq

    text = sqla_pq.__version__
    try:  # read-only git, without the optional index lock
        head = subprocess.run(["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"],
                              cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--",
                                "sqla_pq"], cwd=ROOT, capture_output=True, text=True,
                               timeout=30).stdout.strip()
        if head:
            text += f" (commit {head}{', with uncommitted changes in sqla_pq/' if dirty else ''})"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


# -- rows ---------------------------------------------------------------------------------------


def sqla_pq_rows(server: str, sizes: Sizes) -> tuple[list[Row], list[SqlaPq]]:
    from sqla_pq import PQ

    url = recreate_database(server, PG_DATABASES["sqla_pq"])
    pq = PQ(url)
    pq.migrate()
    pq.engine.dispose()
    rows, systems = [], []
    for variant, scenarios in SqlaPq.variants.items():
        system = SqlaPq(url, sizes, variant)
        systems.append(system)
        rows.append(Row("sqla_pq", variant, system.label, system.settings(), scenarios,
                        functools.partial(run_scenario, system)))
    return rows, systems


def peer_rows(peers: list[str], server: str, redis_url: str, sizes: Sizes, install: bool,
              peer_memory: bool, skipped: list[str], versions: dict[str, str]) -> tuple[list[Row], list[Peer]]:
    python, missing = ensure_venv(peers, install=install)
    rows: list[Row] = []
    handles: list[Peer] = []
    for library in peers:
        if library in missing or python is None:
            skipped.append(f"{library}: cannot be imported from {VENV} "
                           f"({missing.get(library, 'no python')})")
            continue
        if library == "rq":
            target = redis_url
        else:
            try:
                target = recreate_database(server, PG_DATABASES[library])
            except Exception as exc:
                skipped.append(f"{library}: could not create its database ({exc})")
                continue
        first = Peer(python, library, PEER_VARIANTS[library][0], target, sizes)
        installed = first.install()
        if "error" in installed:
            where = "Redis unreachable" if library == "rq" else "schema install failed"
            skipped.append(f"{library}: {where} ({installed['error']})")
            continue
        for variant in PEER_VARIANTS[library]:
            peer = Peer(python, library, variant, target, sizes)
            info = peer.describe()
            if "error" in info:
                skipped.append(f"{library} ({variant}): {info['error']}")
                continue
            versions.update(info["versions"])
            scenarios = tuple(info["scenarios"]) + (("M",) if peer_memory and variant in
                                                    ("default", "simple") else ())
            handles.append(peer)
            rows.append(Row(library, variant, info["label"], info["settings"], scenarios,
                            peer.run))
    return rows, handles


# -- the run ------------------------------------------------------------------------------------


def _summary(figures: dict[str, Any]) -> str:
    if "error" in figures:
        return "ERROR " + figures["error"]
    if "p50_ms" in figures:
        return (f"p50 {figures['p50_ms']:.1f} / p95 {figures['p95_ms']:.1f} / "
                f"p99 {figures['p99_ms']:.1f} ms")
    if "growth_pct" in figures:
        return (f"RSS {figures['rss_before_mb']:.1f} -> {figures['rss_after_mb']:.1f} MB "
                f"({figures['growth_pct']:+.1f} %)")
    return f"{figures['jobs_per_s']:,.1f} jobs/s in {figures['seconds']:.2f} s"


MEDIAN_OF = {"L": "p50_ms", "M": "growth_pct"}
"""The figure a repeated scenario's median is taken on (jobs/s for the others)."""


def median_of(scenario: str, tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The try with the median figure (of an even count, the worse of the middle two); every
    try's figure is kept in ``tries``.  Failed tries count only when all failed."""
    key = MEDIAN_OF.get(scenario, "jobs_per_s")
    good = [t for t in tries if "error" not in t]
    if not good:
        return tries[0]
    ordered = sorted(good, key=lambda t: t[key], reverse=key == "jobs_per_s")  # best first
    chosen = dict(ordered[len(ordered) // 2])
    if len(tries) > 1:
        chosen["tries"] = [round(t[key], 3) if "error" not in t else "error" for t in tries]
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (2,000 jobs, M 20,000)")
    p.add_argument("--only", help=f"comma-separated scenarios of {','.join(ALL)}")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers, or 'none' (default: %(default)s)")
    p.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL",
                                                      "postgresql://postgres@127.0.0.1:5432"),
                   help="the PostgreSQL server (its databases bench_* are created and dropped)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL",
                                                         "redis://127.0.0.1:6379/15"),
                   help="RQ's Redis database; every rq:* key in it is deleted")
    p.add_argument("--concurrency", type=int, help="sqla_pq thread worker's -c (default 16)")
    p.add_argument("--fork-concurrency", type=int, help="sqla_pq fork worker's -c (default 1)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="measure each scenario N times, round robin, and keep the median")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one of common.Sizes (e.g. --set drain=500); repeatable")
    p.add_argument("--quiet-workers", action="store_true",
                   help="turn every worker's per-job log lines off")
    p.add_argument("--peer-memory", action="store_true", help="run M for the peers too")
    p.add_argument("--no-install", action="store_true", help="never pip install the peers")
    p.add_argument("--keep-databases", action="store_true")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.concurrency:
        sizes.concurrency = args.concurrency
    if args.fork_concurrency:
        sizes.fork_concurrency = args.fork_concurrency
    sizes.quiet_workers = args.quiet_workers
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        fields = {f.name: f.type for f in dataclasses.fields(Sizes)}
        if name not in fields:
            raise SystemExit(f"--set: Sizes has no {name!r} (one of {', '.join(fields)})")
        current = getattr(sizes, name)
        setattr(sizes, name, value.lower() in ("1", "true", "yes") if isinstance(current, bool)
                else type(current)(value))
    wanted = tuple(s.strip().upper() for s in args.only.split(",")) if args.only else ALL
    unknown = set(wanted) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    peers = [] if args.peers.strip().lower() == "none" else [
        p.strip() for p in args.peers.split(",") if p.strip()]
    if set(peers) - set(PEERS):
        raise SystemExit(f"unknown peers: {', '.join(sorted(set(peers) - set(PEERS)))}")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    environment = {"load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                   "cpus": os.cpu_count()}
    versions = {"Python": platform.python_version(), **server_facts(args.pg_url),
                "sqla_pq": sqla_pq_version()}
    skipped: list[str] = []
    # The peers run from pip-installed packages, whose bytecode pip compiled; sqla_pq runs from
    # this checkout, which PYTHONDONTWRITEBYTECODE may leave uncompiled: every worker would
    # compile the package again as it starts (0.1 s of a drain's two seconds).
    compileall.compile_dir(str(ROOT / "sqla_pq"), quiet=1)
    compileall.compile_dir(str(ROOT / "benchmarks"), quiet=1, maxlevels=0)
    rows, systems = sqla_pq_rows(args.pg_url, sizes)
    handles: list[Peer] = []
    if peers and set(wanted) - {"Q"}:
        more, handles = peer_rows(peers, args.pg_url, args.redis_url, sizes,
                                  not args.no_install, args.peer_memory, skipped, versions)
        rows += more
    for reason in skipped:
        log(f"skipped {reason}")

    q: dict[str, Any] | None = None
    try:
        for scenario in (s for s in ALL if s in wanted):
            if scenario == "Q":
                log("[Q] PostgreSQL (pgbench) ...")
                try:
                    q = sql_limit.measure(args.pg_url, sizes)
                except Exception as exc:
                    q = {"error": f"{type(exc).__name__}: {exc}",
                         "detail": getattr(exc, "detail", "")}
                log(f"[Q] {_summary(q)}")
                continue
            tries: dict[str, list[dict[str, Any]]] = {}
            for attempt in range(1, args.repeat + 1):  # round robin: a bad minute hits all
                for row in rows:
                    if scenario not in row.scenarios:
                        continue
                    of = f" ({attempt}/{args.repeat})" if args.repeat > 1 else ""
                    log(f"[{scenario}] {row.label}{of} ...")
                    figures = row.measure(scenario)
                    tries.setdefault(row.label, []).append(figures)
                    log(f"[{scenario}] {row.label}{of}: {_summary(figures)}")
            for row in rows:
                if row.label in tries:
                    row.results[scenario] = median_of(scenario, tries[row.label])
    finally:
        for system in systems:
            system.close()
        for peer in handles:
            if peer.library == "rq":
                peer.reset()
        if not args.keep_databases:
            for name in PG_DATABASES.values():
                try:
                    drop_database(args.pg_url, name)
                except Exception as exc:
                    log(f"could not drop {name}: {exc}")

    environment["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    run = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick, "repeat": args.repeat, "sizes": dataclasses.asdict(sizes),
        "versions": versions,
        "environment": environment, "rows": [r.as_dict() for r in rows if r.results],
        "sql_limit": q, "skipped": skipped, "elapsed_s": time.perf_counter() - started,
    }
    text = report.render(run)
    print(text)
    Path(args.output).write_text(text, encoding="utf-8")
    log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
