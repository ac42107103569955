"""Scheduling: every seed's forms, no double fire, cron with time zones and DST."""

from __future__ import annotations

import datetime as dt
import time
from zoneinfo import ZoneInfo

import pytest
from dateutil.relativedelta import FR, MO, TH, TU, WE, relativedelta

from sqla_pq.errors import InvalidTimeSpec
from sqla_pq.link import Link
from sqla_pq.maintenance.scheduler import Scheduler
from sqla_pq.schedules import Timing, build_timing
from sqla_pq.testing import drain
from tests import tasks
from tests.helpers import WorkerProcess, rows, scalar

UTC = dt.UTC
PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def fires(timing: Timing, start: dt.datetime, n: int) -> list[dt.datetime]:
    out = [timing.first(start)]
    while len(out) < n:
        out.append(timing.after(out[-1], start, len(out)))
    return out


def local(times, tz):
    return [t.astimezone(tz).strftime("%m-%d %H:%M%z") for t in times]


# -- cron and daylight saving (pure computation) -------------------------------------------------


def test_daily_cron_in_paris_fires_once_per_local_date_across_spring_forward():
    t, _ = build_timing(cron="30 2 * * *", timezone="Europe/Paris")
    got = local(fires(t, dt.datetime(2026, 3, 27, 12, tzinfo=UTC), 4), PARIS)
    # 02:30 does not exist on 29 March: it fires right after the gap, at 03:00 CEST
    assert got == ["03-28 02:30+0100", "03-29 03:00+0200", "03-30 02:30+0200", "03-31 02:30+0200"]


def test_daily_cron_in_paris_fires_once_in_the_autumn_overlap():
    t, _ = build_timing(cron="30 2 * * *", timezone="Europe/Paris")
    got = local(fires(t, dt.datetime(2026, 10, 24, 12, tzinfo=UTC), 3), PARIS)
    assert got == ["10-25 02:30+0200", "10-26 02:30+0100", "10-27 02:30+0100"], \
        "the overlap's first occurrence only"


def test_weekly_cron_in_new_york_keeps_local_time_across_both_changes():
    t, _ = build_timing(cron="0 9 * * 1", timezone="America/New_York")
    spring = fires(t, dt.datetime(2026, 3, 1, tzinfo=UTC), 3)
    assert local(spring, NEW_YORK) == ["03-02 09:00-0500", "03-09 09:00-0400", "03-16 09:00-0400"]
    autumn = fires(t, dt.datetime(2026, 10, 25, tzinfo=UTC), 2)
    assert local(autumn, NEW_YORK) == ["10-26 09:00-0400", "11-02 09:00-0500"]


def test_hourly_cron_follows_elapsed_time_23_and_25_hours():
    t, _ = build_timing(cron="0 * * * *", timezone="America/New_York")
    def day(d: dt.date) -> list[dt.datetime]:
        start = dt.datetime.combine(d, dt.time(), NEW_YORK) - dt.timedelta(seconds=1)
        return [x for x in fires(t, start, 30) if x.astimezone(NEW_YORK).date() == d]

    assert len(day(dt.date(2026, 3, 8))) == 23
    assert len(day(dt.date(2026, 11, 1))) == 25
    autumn = day(dt.date(2026, 11, 1))
    assert all(b > a for a, b in zip(autumn, autumn[1:])), "fire times must strictly increase"


def test_hourly_cron_fires_every_real_hour_across_a_two_hour_fall_back():
    """Antarctica/Troll goes from +02 to +00 on 25 October 2026: wall times 01:00-03:00 repeat,
    and the hour after 02:00+02 is 01:00+00, an earlier wall time."""
    t, _ = build_timing(cron="0 * * * *", timezone="Antarctica/Troll")
    times = fires(t, dt.datetime(2026, 10, 24, 19, 59, tzinfo=UTC), 9)
    assert [x.astimezone(UTC).hour for x in times] == [20, 21, 22, 23, 0, 1, 2, 3, 4]


def test_every_fire_time_is_strictly_later_than_the_previous_one():
    for cron in ("*/15 * * * *", "30 2 * * *", "0 0 * * *", "59 1 * * *"):
        for tz in ("Europe/Paris", "America/New_York", "Australia/Lord_Howe"):
            t, _ = build_timing(cron=cron, timezone=tz)
            times = fires(t, dt.datetime(2026, 3, 1, tzinfo=UTC), 200)
            assert all(b > a for a, b in zip(times, times[1:])), (cron, tz)


# -- intervals, windows, weekdays ------------------------------------------------------------------


def test_relativedelta_monthly_and_the_last_day_of_the_month():
    t, _ = build_timing(interval=relativedelta(months=1))
    start = dt.datetime(2026, 1, 31, 12, tzinfo=UTC)
    assert [x.date().isoformat() for x in fires(t, start, 4)] == [
        "2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30"], "month ends must not drift"
    t, _ = build_timing(interval=relativedelta(months=1, days=-1))
    start = dt.datetime(2026, 1, 1, 9, tzinfo=UTC)  # django-pq's example: start on the 1st
    assert [x.date().isoformat() for x in fires(t, start, 5)] == [
        "2026-01-01", "2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30"]


@pytest.mark.parametrize("between", ["2:00/18:30", "2.00-18.30", "2-18:30"])
def test_between_windows_move_runs_into_the_window(between):
    t, _ = build_timing(interval=dt.timedelta(hours=6), between=between)
    times = fires(t, dt.datetime(2026, 5, 4, 0, tzinfo=UTC), 6)
    assert all(dt.time(2) <= x.time() < dt.time(18, 30) for x in times), local(times, UTC)
    assert times[0] == dt.datetime(2026, 5, 4, 2, tzinfo=UTC)


def test_a_window_across_midnight():
    t, _ = build_timing(interval=dt.timedelta(hours=1), between="22:00/02:00")
    times = fires(t, dt.datetime(2026, 5, 4, 12, tzinfo=UTC), 6)
    assert [x.hour for x in times] == [22, 23, 0, 1, 22, 23]


def test_weekdays_as_dateutil_objects_or_integers():
    t1, _ = build_timing(interval=dt.timedelta(days=1), weekdays=(MO, TU, WE, TH, FR))
    t2, _ = build_timing(interval=dt.timedelta(days=1), weekdays=(0, 1, 2, 3, 4))
    start = dt.datetime(2026, 5, 8, 9, tzinfo=UTC)  # a Friday
    a, b = fires(t1, start, 4), fires(t2, start, 4)
    assert a == b and [x.strftime("%a") for x in a] == ["Fri", "Mon", "Tue", "Wed"]


def test_time_zone_aware_windows_use_the_given_zone():
    t, _ = build_timing(interval=dt.timedelta(hours=1), between="9:00/10:00", timezone="Europe/Paris")
    times = fires(t, dt.datetime(2026, 7, 1, 12, tzinfo=UTC), 2)
    assert local(times, PARIS) == ["07-02 09:00+0200", "07-03 09:00+0200"]


@pytest.mark.parametrize("kwargs, named", [
    ({"cron": "61 * * * *"}, "61 * * * *"), ({"cron": "every monday"}, "every monday"),
    ({"interval": 0}, "0"), ({"interval": "5 parsecs"}, "5 parsecs"),
    ({"interval": relativedelta(days=-1)}, "relativedelta(days=-1)"),
    ({"between": "25:00/26:00"}, "25:00/26:00"), ({"weekdays": [9]}, "9"),
    ({"timezone": "Mars/Olympus"}, "Mars/Olympus"),
])
def test_bad_schedules_raise_value_errors_naming_the_value_and_store_nothing(pq, kwargs, named):
    with pytest.raises(ValueError) as info:
        if "cron" in kwargs or "timezone" in kwargs:
            pq.schedule(tasks.nothing, run_every=kwargs.get("interval", 60) if "cron" not in kwargs else None, **kwargs)
        else:
            pq.queue().schedule_call("now", tasks.nothing, repeat=-1, **kwargs)
    assert isinstance(info.value, InvalidTimeSpec)
    assert named in str(info.value)
    assert pq.schedules() == []


# -- ticks become jobs, once ---------------------------------------------------------------------


def _tick(pq, engine, rounds=1):
    link = Link(engine, "test-scheduler")
    try:
        return [Scheduler(pq).run_once(link) for _ in range(rounds)]
    finally:
        link.close()


def _make_due(engine, schedule_id=None):
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_schedule SET next_run_at = now() - interval '1 millisecond' "
                          "WHERE next_run_at IS NOT NULL" + (" AND id = %(i)s" if schedule_id else ""),
                          {"i": schedule_id})


def test_repeat_3_runs_exactly_four_times(pq, engine):
    s = pq.queue().schedule_call("now", tasks.add, args=(1, 2), repeat=3, interval="1h")
    for _ in range(6):
        _tick(pq, engine)
        drain(pq)
        _make_due(engine, s.id)
    assert scalar(engine, "SELECT count(*) FROM pq_job WHERE schedule_id = %(i)s", i=s.id) == 4
    assert pq.get_schedule(s.id).next_run_at is None


def test_until_is_honoured(pq, engine):
    until = scalar(engine, "SELECT now() + interval '90 minutes'")
    s = pq.queue().schedule_call("now", tasks.add, args=(1, 2), repeat=-1, interval="1h", until=until)
    for _ in range(4):
        _tick(pq, engine)
        drain(pq)
        with engine.begin() as c:  # run the clock forward by moving the schedule's tick
            c.exec_driver_sql("UPDATE pq_schedule SET anchor_at = anchor_at - interval '1 hour', "
                              "until = until - interval '1 hour', next_run_at = now() WHERE "
                              "id = %(i)s AND next_run_at IS NOT NULL", {"i": s.id})
    assert scalar(engine, "SELECT count(*) FROM pq_job WHERE schedule_id = %(i)s", i=s.id) == 2


def test_a_paused_schedule_does_not_fire_and_resumes(pq, engine):
    s = pq.schedule(tasks.nothing, run_every="1h", active=False)
    _make_due(engine)
    assert _tick(pq, engine) == [{"fired": 0, "skipped": 0}]
    again = pq.schedule(tasks.nothing, run_every="1h", active=True)
    assert again.id == s.id, "calling schedule() again updates in place"
    assert _tick(pq, engine) == [{"fired": 1, "skipped": 0}]


def test_max_concurrent_skips_ticks_while_an_instance_is_active(pq, engine):
    s = pq.schedule(tasks.nothing, run_every="1s", max_concurrent=1)
    assert _tick(pq, engine) == [{"fired": 1, "skipped": 0}]
    _make_due(engine)
    assert _tick(pq, engine) == [{"fired": 0, "skipped": 1}], "fired while the first is queued"
    drain(pq)
    _make_due(engine)
    assert _tick(pq, engine) == [{"fired": 1, "skipped": 0}]
    assert scalar(engine, "SELECT count(*) FROM pq_tick WHERE schedule_id = %(i)s AND skipped", i=s.id) == 1


def test_after_downtime_a_schedule_fires_one_catch_up_job_not_a_storm(pq, engine):
    s = pq.schedule(tasks.nothing, run_every="1s", max_concurrent=None)
    with engine.begin() as c:
        c.exec_driver_sql("UPDATE pq_schedule SET next_run_at = now() - interval '1 hour'")
    assert _tick(pq, engine) == [{"fired": 1, "skipped": 0}]
    assert pq.get_schedule(s.id).next_run_at > scalar(engine, "SELECT now()")
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 1


def test_a_tick_becomes_a_job_once_even_if_two_schedulers_race(pq, engine):
    """The tick's primary key, not a lock, makes it once: replay a tick another scheduler
    already wrote."""
    s = pq.schedule(tasks.nothing, run_every="1h", max_concurrent=None)
    tick_at = pq.get_schedule(s.id).next_run_at
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO pq_tick (schedule_id, tick_at) VALUES (%(s)s, %(t)s)",
                          {"s": s.id, "t": tick_at})
    _tick(pq, engine)
    assert scalar(engine, "SELECT count(*) FROM pq_job") == 0
    assert pq.get_schedule(s.id).next_run_at > tick_at


def test_schedules_are_rows_queryable_with_sql(pq, engine):
    pq.schedule(tasks.add, run_every="5m", key="us", a=1, b=2)
    pq.schedule(tasks.add, cron="0 9 * * 1", key="eu", timezone="Europe/Paris", a=3, b=4)
    got = rows(engine, "SELECT key, cron, interval, timezone, next_run_at IS NOT NULL FROM pq_schedule ORDER BY key")
    assert got == [("eu", "0 9 * * 1", None, "Europe/Paris", True), ("us", None, 300.0, "UTC", True)]
    assert pq.unschedule(tasks.add, key="us") is True
    assert [s.key for s in pq.schedules()] == ["eu"]


def test_one_off_schedule_is_a_delayed_job(pq):
    when = dt.datetime(2030, 1, 1, tzinfo=UTC)
    job = pq.queue().schedule(when, tasks.add, 1, 2)
    assert job.run_at == when and job.args == [1, 2]


def test_the_cli_schedules_like_pqschedule(url_str, pq, capsys):
    from sqla_pq.cli import main

    assert main(["--url", url_str, "schedule", "now", "tests.tasks.add", "1", "2", "--repeat=-1",
                 "--interval=86400", "--mo", "--tu"]) == 0
    assert main(["--url", url_str, "schedule", "2030-01-01T9:10", "tests.tasks.add", "3", "4"]) == 0
    assert main(["--url", url_str, "schedule", "now", "tests.tasks.nothing", "--cron", "0 9 * * 1",
                 "--timezone", "Europe/Paris", "--key", "weekly"]) == 0
    out = capsys.readouterr().out
    assert "schedule 1" in out and "enqueued job" in out and "periodic task" in out
    (daily,) = [s for s in pq.schedules() if s.interval]
    assert daily.weekdays == [0, 1] and daily.repeats_left is None
    assert main(["--url", url_str, "status"]) == 0
    assert "Schedules" in capsys.readouterr().out


@pytest.mark.slow
def test_three_workers_fire_a_one_second_schedule_once_per_tick(pq, engine, worker_env):
    env = dict(worker_env, SQLA_PQ_SCHEDULE_INTERVAL="0.2")
    pq.schedule(tasks.nothing, run_every="1s", max_concurrent=None)
    workers = [WorkerProcess(env, ["default", "--isolation", "thread"]) for _ in range(3)]
    try:
        time.sleep(10)
    finally:
        for w in workers:
            w.stop()
    ticks = rows(engine, "SELECT tick_at, job_id FROM pq_tick ORDER BY tick_at")
    jobs = rows(engine, "SELECT id FROM pq_job WHERE schedule_id IS NOT NULL")
    assert 6 <= len(ticks) <= 12, len(ticks)
    assert all(job_id is not None for _, job_id in ticks), "a tick without its job"
    assert len(jobs) == len(ticks) == len({t for t, _ in ticks}), "a tick fired twice"
    # ticks stay on the schedule's one-second grid; a scheduler late by more than a tick (a
    # loaded machine) fires one catch-up job and skips the rest, as after any downtime
    gaps = [(b[0] - a[0]).total_seconds() for a, b in zip(ticks, ticks[1:])]
    assert all(abs(g - round(g)) < 1e-6 and g >= 1 for g in gaps), gaps
