"""When NOTIFY cannot arrive (a pooler, a wrong listen_url), the worker says so and polls."""

from __future__ import annotations

import logging

from sqla_pq import PQ
from tests import tasks
from tests.helpers import BackgroundWorker, wait_until


def test_a_listener_that_never_hears_its_own_echo_warns_and_the_worker_polls(
        Session, empty_db_url, caplog):
    # notifications are per database: a listener on another database hears nothing
    other = empty_db_url.render_as_string(hide_password=False)
    pq = PQ(Session, listen_url=other, worker_ttl=1)
    with caplog.at_level(logging.WARNING, logger="sqla_pq"):
        with BackgroundWorker(pq, ["default"], maintenance=False):
            job = pq.enqueue(tasks.add, 1, 1)
            assert pq.wait(job.id, timeout=10) == 2, "polling did not pick the job up"
            wait_until(lambda: "NOTIFY does not reach this worker" in caplog.text, 20,
                       message="the warning about NOTIFY")
    assert caplog.text.count("NOTIFY does not reach this worker") == 1
