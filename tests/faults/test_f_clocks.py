"""F. Clocks (S26-S27): workers whose clocks are 10 minutes off either way, and a worker whose
clock jumps back and forth an hour, change nothing: every time that decides is the database's.
Needs libfaketime (Debian package faketime); skipped without it."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from tests.faults.harness import Scenario, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.usefixtures("faketime_available")]


def _tick_gaps(sc: Scenario, since=None) -> list[float]:
    rows = sc.rows("SELECT tick_at FROM pq_tick WHERE (%(t)s IS NULL OR tick_at >= %(t)s) ORDER BY tick_at",
                   t=since)
    return [(b[0] - a[0]).total_seconds() for a, b in zip(rows, rows[1:])]


class _LeaseWatch(threading.Thread):
    """Samples the workers' rows: the largest heartbeat staleness and any expired lease."""

    def __init__(self, sc: Scenario) -> None:
        super().__init__(daemon=True)
        self.sc = sc
        self.stop_event = threading.Event()
        self.max_stale = 0.0
        self.expired = 0

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            try:
                got = self.sc.rows("SELECT extract(epoch FROM clock_timestamp() - heartbeat_at)::float8, "
                                   "expires_at < clock_timestamp() FROM pq_worker")
            except Exception:  # noqa: BLE001
                continue
            for stale, expired in got:
                self.max_stale = max(self.max_stale, stale)
                self.expired += bool(expired)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


@pytest.mark.scenario("S26")
def test_s26_workers_ten_minutes_ahead_and_behind_change_nothing(scenario: Scenario):
    from tests.faults import tasks

    sc = scenario
    window = sc.size(6.0, 20.0)
    ahead = sc.worker("default", "--isolation", "thread", "-c", "2", label="ahead",
                      env=sc.env(faketime="+600s", schedule_interval=0.2))
    behind = sc.worker("default", "--isolation", "thread", "-c", "2", label="behind",
                       env=sc.env(faketime="-600s", schedule_interval=0.2))
    ahead.wait_registered()
    behind.wait_registered()
    watch = _LeaseWatch(sc)
    watch.start()
    started = sc.db_now()
    sc.pq.schedule(tasks.noop, run_every=1, key="skew", max_concurrent=None)
    delayed = sc.pq.enqueue_call(tasks.work, args=(sc.url_str, 0.0), kwargs={"tag": "delayed"},
                                 run_at=dt.timedelta(seconds=5))
    wait_until(lambda: (sc.db_now() - started).total_seconds() >= window, window + 5, interval=0.2,
               message="the observation window")
    watch.stop()
    delay = sc.scalar("SELECT extract(epoch FROM l.started_at - j.enqueued_at)::float8 FROM fault_ledger l "
                      "JOIN pq_job j ON j.id = l.job_id WHERE l.tag = 'delayed'")
    end = sc.db_now()
    ticks = sc.scalar("SELECT count(*) FROM pq_tick WHERE tick_at <= %(e)s", e=end)
    jobs = sc.scalar("SELECT count(*) FROM pq_job WHERE schedule_id IS NOT NULL AND enqueued_at <= %(e)s", e=end)
    rescues = sc.scalar("SELECT count(*) FROM fault_transition WHERE old_status = 'running' AND new_status = 'queued'")
    # a killed skewed worker is rescued within the bound
    (victim_job,) = sc.ledger_ids(1, 3.0, tick=0.2, queue="skewed")
    skewed = sc.worker("skewed", "--isolation", "thread", label="skewed-victim", env=sc.env(faketime="+600s"))
    wait_until(lambda: sc.scalar("SELECT count(*) FROM fault_ledger WHERE job_id = %(j)s", j=victim_job) == 1,
               20, message="the skewed worker to run its job")
    skewed.kill9()
    killed_at = sc.db_now()
    rescued = wait_until(lambda: sc.scalar(
        "SELECT min(at) FROM fault_transition WHERE job_id = %(j)s AND new_status = 'queued' AND at > %(t)s",
        j=victim_job, t=killed_at), 15, interval=0.05, message="the rescue")
    rescue_s = (rescued - killed_at).total_seconds()
    gaps = _tick_gaps(sc)
    sc.record(delayed_start_s=round(delay, 2), window_s=window, ticks=ticks, scheduled_jobs=jobs,
              duplicate_ticks=jobs - ticks, rescues_of_healthy_workers=rescues,
              max_heartbeat_staleness_s=round(watch.max_stale, 2), expired_lease_samples=watch.expired,
              killed_skewed_worker_rescue_s=round(rescue_s, 2), max_tick_gap_s=max(gaps, default=None))
    assert 5.0 <= delay <= 6.5, delay
    assert abs(ticks - window) <= 1.5, (ticks, window)
    assert jobs == ticks
    assert rescues == 0 and watch.expired == 0
    assert rescue_s <= 5.0
    assert delayed.id


@pytest.mark.scenario("S27")
def test_s27_a_worker_clock_jumping_an_hour_back_and_forth_changes_nothing(scenario: Scenario, tmp_path):
    from tests.faults import tasks

    sc = scenario
    run = sc.size(8.0, 60.0)
    stamp = tmp_path / "faketime"
    stamp.write_text("+0\n")
    w = sc.worker("default", "--isolation", "thread", "-c", "2", label="jumpy",
                  env=sc.env(timestamp_file=str(stamp), schedule_interval=0.2))
    w.wait_registered()
    watch = _LeaseWatch(sc)
    watch.start()
    sc.pq.schedule(tasks.noop, run_every=1, key="jumps", max_concurrent=None)
    t0 = time.monotonic()
    delays = []
    for step, offset in ((1, "-3600s"), (2, "+3600s")):
        wait_until(lambda step=step: time.monotonic() - t0 >= step * run / 3, run, interval=0.1,
                   message="the next jump")
        stamp.write_text(offset + "\n")  # the fault: the worker's clock steps an hour
        job = sc.pq.enqueue_call(tasks.work, args=(sc.url_str, 0.0), kwargs={"tag": f"after{step}"},
                                 run_at=dt.timedelta(seconds=2))
        wait_until(lambda job=job: sc.scalar("SELECT count(*) FROM fault_ledger WHERE job_id = %(j)s", j=job.id),
                   15, message=f"the delayed job after jump {step}")
        delays.append(sc.scalar("SELECT extract(epoch FROM l.started_at - j.enqueued_at)::float8 FROM "
                                "fault_ledger l JOIN pq_job j ON j.id = l.job_id WHERE j.id = %(j)s", j=job.id))
    wait_until(lambda: time.monotonic() - t0 >= run, run, interval=0.1, message="the end of the run")
    watch.stop()
    gaps = _tick_gaps(sc)
    ticks = sc.scalar("SELECT count(*) FROM pq_tick")
    jobs = sc.scalar("SELECT count(*) FROM pq_job WHERE schedule_id IS NOT NULL")
    missed = sum(max(0, round(g) - 1) for g in gaps)
    sc.record(run_s=run, ticks=ticks, duplicate_ticks=jobs - ticks, missed_ticks=missed,
              delayed_job_starts_s=[round(d, 2) for d in delays],
              max_heartbeat_staleness_s=round(watch.max_stale, 2), expired_lease_samples=watch.expired)
    assert jobs == ticks and missed <= 1, gaps
    assert all(2.0 <= d <= 3.5 for d in delays), delays
    assert watch.expired == 0 and watch.max_stale <= 1.5, watch.max_stale
    assert w.alive()
