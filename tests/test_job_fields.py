"""The SPEC's job fields, by their SPEC names, on the objects and in ORM queries."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from sqla_pq.models import Job
from tests import tasks
from tests.helpers import BackgroundWorker, wait_until

SPEC_FIELDS = ("id queue task args kwargs status priority run_at enqueued_at started_at "
               "finished_at attempts max_retries timeout result error traceback worker client_id "
               "flow workspace").split()


def test_every_field_the_spec_names_is_on_a_job(pq):
    job = pq.enqueue(tasks.add, 1, 2)
    missing = [f for f in SPEC_FIELDS if not hasattr(job, f)]
    assert not missing


def test_worker_flow_and_name_read_and_query_as_their_columns(pq):
    with pq.flow(pq.queue(), name="f") as f:
        f.enqueue(tasks.add, 1, 2)
    job = pq.get_job(f.jobs[0].id)
    assert job.flow == job.flow_id == f.id and job.name == job.task == "tests.tasks.add"
    with BackgroundWorker(pq, ["default"], name="fields") as worker:
        wait_until(lambda: pq.get_job(job.id).status == "succeeded", 15, message="the job to run")
    done = pq.get_job(job.id)
    assert done.worker == done.worker_id == worker.id
    with pq.session() as s:
        assert s.scalars(select(Job.id).where(Job.worker == worker.id, Job.flow == f.id,
                                              Job.name == "tests.tasks.add")).all() == [job.id]


def test_python_pq_names_get_task_by_client_id_and_poll_interval(pq):
    from sqla_pq.errors import InvalidOption

    job = pq.enqueue(tasks.add, 1, 2, client_id="order-123")
    assert pq.get_task_by_client_id("order-123").id == job.id
    assert pq.worker(["default"], poll_interval=1.5, install_signals=False).worker_ttl == 1.5
    with pytest.raises(InvalidOption, match="not both"):
        pq.worker(["default"], poll_interval=1.0, worker_ttl=2.0)
