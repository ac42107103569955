"""``sqla-pq``: the command line.

    sqla-pq worker [QUEUE ...] [--burst] [--isolation fork|thread] [--concurrency N] [--prefetch N]
    sqla-pq enqueue PATH [ARGS ...] [--queue Q] [--timeout T] [--run-at WHEN]
    sqla-pq schedule WHEN PATH [ARGS ...] [--repeat N --interval S --mo ... | --cron EXPR]
    sqla-pq status | requeue ID... | cancel ID... | prune | migrate | benchmark | demo
    sqla-pq create-job NAME [--workspace JSON] | queue-depth [QUEUE ...] | delete-old-jobs
    sqla-pq dashboard [--host 127.0.0.1] [--port 8321] [--auth USER:PASSWORD]

The database comes from ``--url`` or ``DATABASE_URL``; ``--app module:attr`` loads your ``PQ``
object (its settings and registered tasks), ``-I module`` imports modules that register tasks.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import InvalidOption, PQError

log = logging.getLogger("sqla_pq")

WEEKDAY_FLAGS = ("mo", "tu", "we", "th", "fr", "sa", "su")


def _parse_value(text: str) -> Any:
    """Command-line arguments are JSON when they parse as JSON (``5``, ``true``, ``[1,2]``),
    strings otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _setup_logging(verbosity: int, command: str | None = None) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    fmt, datefmt = "%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"
    if command == "worker" and not logging.getLogger().handlers:
        from .logs import install

        install(level, fmt, datefmt)  # two lines per job: written in batches, not one by one
    else:
        logging.basicConfig(level=level, format=fmt, datefmt=datefmt)
    if command != "migrate" and verbosity <= 0:  # alembic narrates every run at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _pq(args: argparse.Namespace) -> Any:
    from .pq import PQ

    for module in args.imports or ():
        importlib.import_module(module)
    if args.app:
        module_name, _, attr = args.app.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in (attr or "pq").split("."):
            obj = getattr(obj, part)
        if callable(obj) and not isinstance(obj, PQ):
            obj = obj()
        if not isinstance(obj, PQ):
            raise SystemExit(f"--app {args.app} is not a PQ instance")
        return obj
    url = args.url or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("no database: pass --url or set DATABASE_URL (or --app module:pq)")
    return PQ(url, schema=args.schema)


def _imported_modules(args: argparse.Namespace) -> list[str]:
    """What the worker imported to load the application: its fork server imports them too."""
    modules = list(args.imports or ())
    if args.app:
        modules.append(args.app.partition(":")[0])
    return modules


# -- commands ----------------------------------------------------------------------------------


def _freeze_startup_objects() -> None:
    """End the collector-free start-up of ``worker``: what the imports built (SQLAlchemy, the
    application's modules: ~80,000 objects) lives as long as the process, so it is moved out
    of the collector's reach (``gc.freeze``) before collection is turned back on.  Otherwise
    the first full collection rescans all of it (~25 ms, at the worker's first claim), every
    later one does again, and in fork mode a collection writes to pages the job processes
    share."""
    gc.freeze()
    gc.enable()


def cmd_worker(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.ini:  # a Pyramid app: jobs run in its registry and transaction manager
        from .pyramid import load_worker_app

        app = load_worker_app(args.ini)
        pq, extra["call_wrapper"] = app.pq, app.job_scope
    else:
        pq = _pq(args)
    if args.metrics_port is not None and not args.terminate:
        _serve_metrics(pq, args)
    _freeze_startup_objects()
    if args.terminate:
        n = pq.terminate_workers(wait=True, timeout=args.wait)
        alive = [w for w in pq.workers() if w.alive]
        print(f"asked {n} worker(s) to stop; {len(alive)} still running")
        return 0 if not alive else 1
    processed = pq.run_worker(
        args.queues or None,
        burst=args.burst,
        name=args.name,
        isolation=args.isolation,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        max_runtime=args.max_runtime,
        rate_limit=args.rate_limit,
        priorities=args.priority or None,
        worker_ttl=args.worker_ttl,
        memory_limit=args.memory_limit,
        fork_server=args.fork_server,
        fork_server_imports=_imported_modules(args),
        **extra,
    )
    log.debug("processed %d jobs", processed)
    return 0


def _serve_metrics(pq: Any, args: argparse.Namespace) -> None:
    """Prometheus metrics of this worker's jobs, served from a thread of its process."""
    from .errors import ConfigurationError
    from .metrics import PrometheusMetrics

    prom = PrometheusMetrics(pq=pq if args.metrics_queue_counts else None)
    pq.add_metrics_hook(prom)
    try:
        prom.serve(args.metrics_port, args.metrics_addr)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on {args.metrics_addr}:{args.metrics_port}"
                                 f" ({exc.strerror or exc}): pick another --metrics-port") from None
    log.info("*** Metrics on http://%s:%d/metrics", args.metrics_addr, args.metrics_port)


def cmd_enqueue(args: argparse.Namespace) -> int:
    pq = _pq(args)
    options: dict[str, Any] = {}
    if args.timeout is not None:
        options["timeout"] = args.timeout
    if args.run_at is not None:
        options["run_at"] = _when(args.run_at)
    if args.priority is not None:
        options["priority"] = args.priority
    if args.client_id:
        options["client_id"] = args.client_id
    if args.max_retries is not None:
        options["max_retries"] = args.max_retries
    kwargs = _json_object(args.kwargs, "--kwargs") if args.kwargs else {}
    job = pq.queue(args.queue).enqueue_call(
        args.path, args=[_parse_value(a) for a in args.args], kwargs=kwargs, **options
    )
    print(f"enqueued job {job.id}: {job.description} on {job.queue} (run at {job.run_at:%Y-%m-%d %H:%M:%S%z})")
    return 0


def _when(text: str) -> Any:
    """``5m``-style delays, or ISO 8601 moments."""
    from .errors import InvalidTimeSpec
    from .timeparse import parse_duration, parse_moment

    try:
        return parse_duration(text)
    except InvalidTimeSpec:
        return parse_moment(text, what="run_at")


def cmd_schedule(args: argparse.Namespace) -> int:
    """django-pq's pqschedule: ``schedule now pkg.mod.func --repeat=-1 --interval=86400 --mo``;
    with ``--cron``, a periodic task (python-pq)."""
    from .timeparse import parse_moment

    task_args = [_parse_value(a) for a in args.args]
    weekdays = [d for d in WEEKDAY_FLAGS if getattr(args, d)]
    if args.cron:
        _refuse_with_cron(args, weekdays)
        pq = _pq(args)
        limit = {} if args.max_concurrent is None else {"max_concurrent": args.max_concurrent}
        s = pq.schedule(args.path, cron=args.cron, key=args.key or "", timezone=args.timezone,
                        queue=args.queue, args=task_args, **limit)
        print(f"periodic task {s.task} [{s.key}] on '{s.cron}' ({s.timezone}); next run "
              f"{s.next_run_at:%Y-%m-%d %H:%M:%S%z}")
        return 0
    pq = _pq(args)
    options: dict[str, Any] = {}
    if args.repeat is not None:
        options["repeat"] = args.repeat
    if args.interval is not None:
        options["interval"] = _parse_value(args.interval)
    if args.between:
        options["between"] = args.between
    if weekdays:
        options["weekdays"] = weekdays
    if args.until:
        options["until"] = args.until
    if args.timezone:
        options["timezone"] = args.timezone
    if args.key:
        options["key"] = args.key
    if args.max_concurrent is not None:
        options["max_concurrent"] = args.max_concurrent
    when = parse_moment(args.when, what="WHEN")
    result = pq.queue(args.queue).schedule_call(when, args.path, args=task_args, **options)
    if hasattr(result, "next_run_at"):
        print(f"schedule {result.id}: {result.task}, next run {result.next_run_at:%Y-%m-%d %H:%M:%S%z}")
    else:
        print(f"enqueued job {result.id}: {result.description}, run at {result.run_at:%Y-%m-%d %H:%M:%S%z}")
    return 0


def _refuse_with_cron(args: argparse.Namespace, weekdays: list[str]) -> None:
    """A periodic task (``pq.schedule``) is timed by its cron expression alone: a flag it has
    no place for is refused, not dropped."""
    given = [f"--{name}" for name in ("repeat", "interval", "between", "until")
             if getattr(args, name) is not None]
    given += [f"--{day}" for day in weekdays]
    if args.when.strip().lower() != "now":
        raise InvalidOption(
            f"WHEN must be 'now' with --cron, not {args.when!r}: a periodic task's runs come from "
            "its cron expression (pause it with pq.schedule(..., active=False) until it should run)")
    if given:
        raise InvalidOption(
            f"{', '.join(given)} cannot be combined with --cron: a periodic task runs on its cron "
            "expression alone (put days and hours in it: '0 9-17 * * 1-5'); for --repeat, "
            "--interval or --until, schedule without --cron")


def cmd_status(args: argparse.Namespace) -> int:
    from .status import render_status

    print(render_status(_pq(args)))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    pq = _pq(args)
    ids = list(args.ids)
    if args.all_failed:
        ids += [j.id for j in pq.list_failed(queue=args.queue, limit=1_000_000)]
    for job_id in ids:
        pq.requeue(job_id)
    print(f"requeued {len(ids)} job(s)")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    pq = _pq(args)
    for job_id in args.ids:
        pq.cancel(job_id)
    print(f"cancelled {len(args.ids)} job(s)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """The pruner, on demand; with ``--older-than``, delete-old-jobs too."""
    from .link import Link
    from .maintenance.pruner import Pruner

    pq = _pq(args)
    link = Link(pq.engine, "prune", None, pq.schema)
    try:
        result = Pruner(0, max_batches=1_000_000).run_once(link)
    finally:
        link.close()
    print(f"deleted {result['deleted']} expired job(s)")
    if args.older_than is not None:
        _delete_finished(pq, args.older_than)
    return 0


def cmd_delete_old_jobs(args: argparse.Namespace) -> int:
    """django-db-queue's delete_old_jobs: keeps the table small when run from cron."""
    _delete_finished(_pq(args), args.older_than)
    return 0


def _delete_finished(pq: Any, older_than: str) -> None:
    """Delete succeeded and failed jobs that finished more than ``older_than`` ago.  Cancelled
    jobs are left to the pruner (they expire ``result_ttl`` after cancelling)."""
    import datetime as dt

    from .timeparse import parse_duration

    before = dt.datetime.now(dt.UTC) - parse_duration(older_than, what="--older-than")
    n = pq.clear_completed(before=before) + pq.clear_failed(before=before)
    print(f"deleted {n} finished job(s) older than {older_than}")


def cmd_create_job(args: argparse.Namespace) -> int:
    """django-db-queue's create_job: a multi-step job, from definitions the user imports."""
    from .flows import MultiStepJob
    from .tasks import registered

    workspace = _json_object(args.workspace, "--workspace") if args.workspace is not None else {}
    pq = _pq(args)
    entry = registered(args.name)
    if entry is None or not isinstance(entry.func, MultiStepJob):
        raise PQError(f"no job definition named {args.name!r}: import the module that defines it "
                      "(-I app.jobs, or --app app:pq) before create-job")
    job = pq.create_job(args.name, workspace=workspace, queue=args.queue, priority=args.priority)
    print(f"created job {job.id}: {args.name} on {job.queue}")
    return 0


def _json_object(text: str, option: str) -> dict[str, Any]:
    """A JSON object from the command line, or a one-line error naming the option."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidOption(f"{option} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise InvalidOption(f"{option} must be a JSON object ({{\"key\": \"value\"}}), "
                            f"not {type(value).__name__} {text!r}")
    return value


def cmd_queue_depth(args: argparse.Namespace) -> int:
    """django-db-queue's queue_depth: a name with no waiting jobs (or misspelled) shows 0."""
    depths = _pq(args).queue_depths()
    for name in args.queues or sorted(depths):
        print(f"{name}: {depths.get(name, 0)}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrations import upgrade

    pq = _pq(args)
    upgrade(pq.engine, revision=args.revision, schema=pq.schema, sql=args.sql)
    if not args.sql:
        print(f"sqla_pq schema is at {args.revision}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import main as benchmark

    return benchmark(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.verbose <= 0:  # the demo prints its own few lines
        logging.getLogger().setLevel(logging.WARNING)
    return run_demo(url=args.url, data_dir=args.data_dir)


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the web dashboard alone; the access options are checked before anything listens."""
    from .dashboard.serve import access_from, serve

    access_from(args.host, args.auth, args.no_auth)
    return serve(_pq(args), host=args.host, port=args.port, auth=args.auth,
                 no_auth=args.no_auth)


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    def common(p: argparse.ArgumentParser, default: Any) -> None:
        """Options accepted before and after the command (``sqla-pq worker -I app.tasks``)."""
        p.add_argument("--url", default=default, help="database URL (default: DATABASE_URL)")
        p.add_argument("--schema", default=default,
                       help="schema of the sqla_pq tables (default: SQLA_PQ_SCHEMA)")
        p.add_argument("--app", default=default, help="module:attr of your PQ object")
        p.add_argument("-I", "--import", dest="imports", action="append", default=default,
                       help="import a module first (to register tasks); repeatable")
        p.add_argument("-v", "--verbose", action="count", default=default)
        p.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbose",
                       default=default)

    parser = argparse.ArgumentParser(prog="sqla-pq", description="A PostgreSQL job queue for SQLAlchemy applications.")
    common(parser, None)
    shared = argparse.ArgumentParser(add_help=False)
    common(shared, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser

    def sub_add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return add_parser(name, parents=[shared], **kw)

    sub.add_parser = sub_add_parser  # type: ignore[method-assign]

    w = sub.add_parser("worker", help="process jobs")
    w.add_argument("queues", nargs="*", help="queues in priority order (default: all)")
    w.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    w.add_argument("--name", help="worker name (default: host.pid)")
    w.add_argument("--isolation", choices=["fork", "thread"], default="fork")
    w.add_argument("-c", "--concurrency", type=int, default=1)
    w.add_argument("--prefetch", type=int, default=0,
                   help="hold this many jobs beyond -c, started the moment a slot frees up")
    w.add_argument("--max-runtime", type=float, help="cap on any job's timeout, in seconds")
    w.add_argument("--rate-limit", type=float, help="minimum seconds between two job starts")
    w.add_argument("--priority", type=int, action="append",
                   help="only take jobs of this priority; repeatable")
    w.add_argument("--worker-ttl", type=float, help="seconds between fallback polls")
    w.add_argument("--memory-limit", help="address-space limit of each fork child (e.g. 512M)")
    w.add_argument("--no-fork-server", dest="fork_server", action="store_false",
                   help="fork each job from the worker itself (with all it imported), not from "
                        "its small fork server")
    w.add_argument("--terminate", action="store_true",
                   help="ask every worker to stop after its current jobs, and wait")
    w.add_argument("--wait", type=float, default=None, help="with --terminate: wait at most this long")
    w.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics of this worker's jobs on this port "
                        "(needs prometheus_client: pip install 'sqla_pq[prometheus]')")
    w.add_argument("--metrics-addr", default="127.0.0.1",
                   help="address the metrics are served on (default 127.0.0.1)")
    w.add_argument("--metrics-queue-counts", action="store_true",
                   help="with --metrics-port: also job counts per queue and status, read from "
                        "the database at each scrape (enable it on one worker)")
    w.add_argument("--ini", help="a Pyramid app's ini file (development.ini, app.ini#main): load "
                   "the app and run each job in its registry and a transaction of its own")
    w.set_defaults(func=cmd_worker)

    e = sub.add_parser("enqueue", help="enqueue a task by import path")
    e.add_argument("path")
    e.add_argument("args", nargs="*", help="arguments (JSON values, else strings)")
    e.add_argument("--queue", default=None)
    e.add_argument("--timeout", type=float)
    e.add_argument("--run-at", help="'5m', '1h', or an ISO 8601 moment")
    e.add_argument("--priority", type=int)
    e.add_argument("--client-id")
    e.add_argument("--max-retries", type=int)
    e.add_argument("--kwargs", help="keyword arguments as a JSON object")
    e.set_defaults(func=cmd_enqueue)

    sc = sub.add_parser("schedule", help="schedule a task: once, repeating, or periodic (--cron)")
    sc.add_argument("when", help="'now' or an ISO 8601 date or datetime")
    sc.add_argument("path")
    sc.add_argument("args", nargs="*")
    sc.add_argument("--repeat", type=int, help="repeats after the first run; -1 for ever")
    sc.add_argument("--interval", help="seconds (or '1h', '1d') between runs")
    for day in WEEKDAY_FLAGS:
        sc.add_argument(f"--{day}", action="store_true")
    sc.add_argument("--between", help="a daily window: '2:00/18:30', '2.00-18.30', '2-18:30'")
    sc.add_argument("--until", help="no run after this moment")
    sc.add_argument("--cron", help="a cron expression: a periodic task (python-pq); not with "
                    "--repeat, --interval, --between, --until or the weekday flags")
    sc.add_argument("--key", help="tells several schedules of one task apart")
    sc.add_argument("--timezone", help="IANA time zone of the cron and the window")
    sc.add_argument("--queue")
    sc.add_argument("--max-concurrent", type=int,
                    help="runs of this schedule that may be in progress at once (default 1)")
    sc.set_defaults(func=cmd_schedule)

    s = sub.add_parser("status", help="queue depths by state, workers, schedules")
    s.set_defaults(func=cmd_status)

    r = sub.add_parser("requeue", help="queue finished jobs again")
    r.add_argument("ids", nargs="*", type=int)
    r.add_argument("--all-failed", action="store_true")
    r.add_argument("--queue")
    r.set_defaults(func=cmd_requeue)

    c = sub.add_parser("cancel", help="cancel jobs that have not started")
    c.add_argument("ids", nargs="+", type=int)
    c.set_defaults(func=cmd_cancel)

    p = sub.add_parser("prune", help="delete expired jobs now")
    p.add_argument("--older-than", help="also delete succeeded and failed jobs that finished "
                   "longer ago than this ('7d'), as delete-old-jobs does")
    p.set_defaults(func=cmd_prune)

    dj = sub.add_parser("delete-old-jobs",
                        help="delete succeeded and failed jobs that finished over a day ago "
                             "(django-db-queue); cancelled ones expire with result_ttl")
    dj.add_argument("--older-than", default="1d", help="age to delete from ('7d'; default 1d)")
    dj.set_defaults(func=cmd_delete_old_jobs)

    cj = sub.add_parser("create-job", help="create a multi-step job (django-db-queue); import "
                        "its definition with -I or --app")
    cj.add_argument("name", help="a name given to pq.define_job or pq.define_jobs")
    cj.add_argument("--queue", help="default: the definition's queue, else the default queue")
    cj.add_argument("--workspace", help='the initial workspace, a JSON object: \'{"key": "value"}\'')
    cj.add_argument("--priority", type=int,
                    help="django-db-queue's priority: 0 is the default, higher runs sooner")
    cj.set_defaults(func=cmd_create_job)

    qd = sub.add_parser("queue-depth", help="waiting (queued) jobs per queue (django-db-queue)")
    qd.add_argument("queues", nargs="*",
                    help="queues to show, 0 when none wait (default: every queue with waiting jobs)")
    qd.set_defaults(func=cmd_queue_depth)

    m = sub.add_parser("migrate", help="create or upgrade the sqla_pq tables")
    m.add_argument("--revision", default="heads")
    m.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    m.set_defaults(func=cmd_migrate)

    b = sub.add_parser("benchmark", help="enqueue N jobs while workers consume them (pqbenchmark)")
    b.add_argument("n", nargs="?", type=int, default=10_000, help="jobs (default 10,000)")
    b.add_argument("-w", "--workers", type=int, default=1, help="worker processes")
    b.add_argument("--sleep", type=float, default=0, help="each job sleeps this many ms")
    b.add_argument("--isolation", choices=["fork", "thread"], default="thread")
    b.add_argument("-c", "--concurrency", type=int, help="per worker (default 8 thread, 1 fork)")
    b.add_argument("--backend", choices=["sqla_pq", "rq"], default="sqla_pq")
    b.add_argument("--bulk", action="store_true", help="enqueue with one enqueue_many call")
    b.set_defaults(func=cmd_benchmark)

    d = sub.add_parser("demo", help="run the demo (embedded PostgreSQL without DATABASE_URL)")
    d.add_argument("--data-dir", help="where the embedded PostgreSQL keeps its data")
    d.set_defaults(func=cmd_demo)

    ds = sub.add_parser("dashboard", help="serve the web dashboard (on 127.0.0.1 by default)")
    ds.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ds.add_argument("--port", type=int, default=8321, help="port (default 8321)")
    access = ds.add_mutually_exclusive_group()
    access.add_argument("--auth", metavar="USER:PASSWORD",
                        help="HTTP Basic authentication (default: SQLA_PQ_DASHBOARD_AUTH)")
    access.add_argument("--no-auth", action="store_true",
                        help="no authentication: only on a loopback address")
    ds.set_defaults(func=cmd_dashboard)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = args.verbose or 0
    _setup_logging(args.verbose, args.command)
    collecting = gc.isenabled()
    if args.command == "worker":
        gc.disable()  # until _freeze_startup_objects: imports make garbage-free objects only
    try:
        return int(args.func(args) or 0)
    except PQError as exc:
        print(f"sqla-pq: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if collecting:
            gc.enable()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
