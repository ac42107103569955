"""The scheduler: due schedule ticks become jobs, once each.

Every worker runs it (no leader): due schedules are read with ``FOR UPDATE SKIP LOCKED`` so
schedulers share them, and each tick is first inserted into ``pq_tick`` whose primary key is
(schedule, tick time), in the same transaction as its job: a tick becomes a job once and only
once however many workers run.  A tick is skipped (recorded, no job) while ``max_concurrent``
jobs of the schedule are queued or running.  After downtime the schedule fires one catch-up job
for the missed ticks and moves on to the next tick in the future.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import queries
from ..link import Link
from .base import Service

if TYPE_CHECKING:
    from ..pq import PQ

log = logging.getLogger("sqla_pq.scheduler")


class Scheduler(Service):
    name = "scheduler"
    exclusive = False  # row locks and the tick's primary key do the coordination

    def __init__(self, pq: PQ, interval: float = 1.0, batch: int = 50) -> None:
        self.pq = pq
        self.interval = interval
        self.batch = batch

    def run_once(self, link: Link) -> dict[str, Any]:
        fired = skipped = 0
        with link.transaction():
            due = link.run(queries.schedule_due(), {"batch": self.batch})
            keys = [c.key for c in queries.schedule_table.columns] + ["db_now"]
            for values in due:
                row = _Row(dict(zip(keys, values)))
                outcome = self._tick(link, row)
                fired += outcome == "fired"
                skipped += outcome == "skipped"
        return {"fired": fired, "skipped": skipped}

    def _tick(self, link: Link, row: Any) -> str:
        tick_at = row.next_run_at
        now = row.db_now
        busy = False
        if row.max_concurrent is not None:
            active = link.run(queries.schedule_active_jobs(), {"schedule": row.id})[0][0]
            busy = active >= row.max_concurrent
        claimed = link.run(queries.tick_insert(), {"schedule": row.id, "tick_at": tick_at,
                                                   "skipped": busy})
        outcome = "taken"
        if claimed:
            if busy:
                outcome = "skipped"
                log.info("schedule %s (%s): tick %s skipped, %s job(s) still active",
                         row.id, row.task, tick_at, row.max_concurrent)
            else:
                job_id = self._fire(link, row)
                link.run(queries.tick_set_job(), {"schedule": row.id, "tick_at": tick_at,
                                                  "job": job_id})
                outcome = "fired"
        runs = row.runs + 1
        left = row.repeats_left
        if left is not None and left <= 0:
            nxt = None
        else:
            from ..schedules import timing_of  # zoneinfo, dateutil: only once a schedule fires

            timing = timing_of(row)
            nxt, runs_after = timing.next_after(tick_at, row.anchor_at or tick_at, runs, not_before=now)
            if left is not None:
                left -= 1
            runs = runs if nxt is None else runs_after
        link.run(queries.schedule_advance(), {
            "schedule": row.id, "tick_at": tick_at, "next_at": nxt, "new_runs": runs,
            "left": left,
        })
        return outcome

    def _fire(self, link: Link, row: Any) -> int:
        from ..enqueue import JobSpec
        from ..serialization import EncodedCall, dumps_json
        from ..tasks import TaskRef

        options = row.job_options or {}
        encoded = EncodedCall(
            row.encoding,
            dumps_json(row.args) if row.args is not None else None,
            dumps_json(row.kwargs) if row.kwargs is not None else None,
            bytes(row.payload) if row.payload is not None else None,
            0,
        )
        spec = JobSpec(
            queue=row.queue, ref=TaskRef(row.task), encoded=encoded,
            priority=row.priority,
            max_retries=options.get("max_retries", 0),
            retry_policy=options.get("retry_policy"),
            timeout=options.get("timeout", self.pq.settings.job_timeout),
            result_ttl=options.get("result_ttl", self.pq.settings.result_ttl),
            serial=bool(options.get("serial", False)),
            schedule_id=row.id,
            max_interruptions=options.get("max_interruptions", self.pq.settings.max_interruptions),
        )
        params = spec.params()
        if row.encoding != "json" and row.payload is not None and self.pq.settings.secret_keys:
            from ..serialization import sign, verify

            # the schedule's payload was signed for the schedule; re-sign it for the job
            verify(self.pq.settings.secret_keys, -row.id, row.task, bytes(row.payload), row.signature)
            job_id = link.run(queries.job_ids_reserve(), {"n": 1})[0][0]
            params["id"] = job_id
            params["signature"] = sign(self.pq.settings.secret_keys, job_id, row.task, bytes(row.payload))
        return int(link.run(*queries.job_insert_for(params))[0][0])


class _Row:
    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
