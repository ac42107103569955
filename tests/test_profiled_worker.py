"""A thread worker must keep taking turns however slow its main thread is: under a profiler
(``python -m cProfile``) one stopped after its first batch, its jobs claimed and never
recorded, because every job's end marked the interpreter as having an exception to deliver."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests import tasks

PROFILED_WORKER = textwrap.dedent("""
    import runpy, sys
    sys.setprofile(lambda *args: None)  # what cProfile does to the main thread, minus the cost
    sys.argv = ["sqla-pq", "worker", "default", "--burst", "--isolation", "thread", "-c", "4",
                "-q"]
    runpy.run_module("sqla_pq", run_name="__main__")
""")


def test_a_thread_worker_with_a_profiled_main_thread_drains_its_queue(pq, worker_env):
    jobs = pq.enqueue_many([(tasks.add, (i, 1)) for i in range(300)])
    done = subprocess.run([sys.executable, "-c", PROFILED_WORKER], env=worker_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    statuses = [pq.get_job(job_id).status for job_id in jobs.ids]
    assert statuses.count("succeeded") == 300, statuses
