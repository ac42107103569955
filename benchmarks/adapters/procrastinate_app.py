"""The procrastinate App the benchmark's procrastinate workers run
(``procrastinate --app=benchmarks.adapters.procrastinate_app.app worker``).

Its tasks are the shared job functions of ``benchmarks.tasks``, registered as they are: sync
functions, which procrastinate runs in a thread of its worker.  The database comes from
``BENCH_PG_DSN``.
"""

from __future__ import annotations

import os

from procrastinate import App, PsycopgConnector

from benchmarks import tasks

QUEUE = "bench"

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PG_DSN", "")))

noop = app.task(name="bench_noop", queue=QUEUE)(tasks.noop)
sleep = app.task(name="bench_sleep", queue=QUEUE)(tasks.sleep)
stamp = app.task(name="bench_stamp", queue=QUEUE)(tasks.stamp)

BY_KIND = {"noop": noop, "sleep": sleep, "stamp": stamp}
