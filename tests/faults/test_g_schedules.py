"""G. Periodic tasks and DST (S28-S31): many schedulers and one tick, catch-up after downtime and
max_concurrent, schedule edits under load, daylight saving."""

from __future__ import annotations

import datetime as dt
import threading
import time
from zoneinfo import ZoneInfo

import pytest

from tests.faults.harness import Scenario, wait_until

pytestmark = pytest.mark.fault

UTC = dt.UTC


def _ticks(sc: Scenario, schedule_id: int) -> list[dt.datetime]:
    return [r[0] for r in sc.rows("SELECT tick_at FROM pq_tick WHERE schedule_id = %(s)s ORDER BY tick_at",
                                  s=schedule_id)]


def _missed(ticks: list[dt.datetime], every: float) -> int:
    gaps = [(b - a).total_seconds() for a, b in zip(ticks, ticks[1:])]
    return sum(max(0, round(g / every) - 1) for g in gaps)


def _tick_job_integrity(sc: Scenario) -> tuple[int, int, int]:
    """(ticks that made a job, distinct jobs they name, scheduled jobs)."""
    made = sc.scalar("SELECT count(*) FROM pq_tick WHERE NOT skipped")
    distinct = sc.scalar("SELECT count(DISTINCT job_id) FROM pq_tick WHERE NOT skipped")
    jobs = sc.scalar("SELECT count(*) FROM pq_job WHERE schedule_id IS NOT NULL")
    return made, distinct, jobs


# -- S28 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S28")
def test_s28_n_schedulers_and_one_being_killed_make_each_tick_one_job(own_scenario: Scenario):
    from tests.faults import tasks

    sc = own_scenario
    run = sc.size(6.0, 30.0)
    log_from = sc.cluster.log_size()
    one = sc.pq.schedule(tasks.noop, run_every=1, key="one", max_concurrent=None)
    two = sc.pq.schedule(tasks.noop, run_every=2, key="two", max_concurrent=None)
    cron = sc.pq.schedule(tasks.noop, cron="* * * * *", key="cron", max_concurrent=None)
    env = sc.env(schedule_interval=0.2)
    workers = [sc.worker("default", "--isolation", "thread", "-c", "2", label=f"w{i}", env=env) for i in range(3)]
    for w in workers:
        w.wait_registered()
    t0 = time.monotonic()
    started = sc.db_now()
    flaps = 0
    while time.monotonic() - t0 < run:  # a 4th scheduler, started and killed every 0.7 s
        flapper = sc.worker("default", "--isolation", "thread", label=f"flap{flaps}", env=env)
        time.sleep(0.7)
        flapper.kill9()
        sc.workers.remove(flapper)
        flaps += 1
    ended = sc.db_now()
    made, distinct, jobs = _tick_job_integrity(sc)
    one_ticks = [t for t in _ticks(sc, one.id) if started <= t <= ended]
    two_ticks = [t for t in _ticks(sc, two.id) if started <= t <= ended]
    cron_ticks = _ticks(sc, cron.id)
    errors = [line for line in sc.cluster.log_text(log_from).splitlines()
              if "ERROR" in line and ("pq_tick" in line or "duplicate key" in line)]
    sc.record(run_s=run, flapping_schedulers=flaps, ticks={"1s": len(one_ticks), "2s": len(two_ticks),
              "cron": len(cron_ticks)}, missed={"1s": _missed(one_ticks, 1), "2s": _missed(two_ticks, 2)},
              unique_violation_errors_in_server_log=len(errors))
    assert made == distinct == jobs, (made, distinct, jobs)
    assert _missed(one_ticks, 1) <= 1 and _missed(two_ticks, 2) <= 1, (one_ticks, two_ticks)
    assert len(cron_ticks) <= run / 60 + 1
    assert errors == [], errors[:3]


# -- S29 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S29")
def test_s29_after_downtime_one_catch_up_per_schedule_and_max_concurrent_skips_ticks(scenario: Scenario):
    from tests.faults import tasks

    sc = scenario
    run, job_s = sc.size(6.0, 10.0), sc.size(2.0, 3.0)
    every_second = sc.pq.schedule(tasks.noop, run_every=1, key="1s", max_concurrent=None)
    every_minute = sc.pq.schedule(tasks.noop, cron="* * * * *", key="1m", max_concurrent=None)
    # the schedules last fired two hours ago (the workers were down since)
    sc.execute("UPDATE pq_schedule SET next_run_at = now() - interval '2 hours', "
               "last_run_at = now() - interval '2 hours 1 second'")
    bounded = sc.pq.schedule(tasks.work, run_every=1, key="bounded", max_concurrent=1,
                             args=(sc.url_str, job_s))
    down_until = sc.db_now()
    w = sc.worker("default", "--isolation", "thread", "-c", "4", label="w", schedule_interval=0.2)
    w.wait_registered()
    started = sc.db_now()
    active_max = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < run:
        active_max = max(active_max, sc.scalar(
            "SELECT count(*) FROM pq_job WHERE schedule_id = %(s)s AND status IN ('queued', 'running')",
            s=bounded.id))
        time.sleep(0.05)
    catch_up = {name: sc.scalar("SELECT count(*) FROM pq_tick WHERE schedule_id = %(s)s AND tick_at < %(t)s",
                                s=s.id, t=down_until - dt.timedelta(minutes=1))
                for name, s in (("1s", every_second), ("1m", every_minute))}
    after = [t for t in _ticks(sc, every_second.id) if t >= started]
    fired = sc.scalar("SELECT count(*) FROM pq_tick WHERE schedule_id = %(s)s AND NOT skipped", s=bounded.id)
    skipped = sc.scalar("SELECT count(*) FROM pq_tick WHERE schedule_id = %(s)s AND skipped", s=bounded.id)
    sc.record(catch_up_jobs=catch_up, normal_ticks_after_start=len(after), bounded_fired=fired,
              bounded_skipped=skipped, bounded_max_active=active_max, run_s=run, job_s=job_s)
    assert all(v <= 1 for v in catch_up.values()), catch_up
    assert len(after) >= run - 2
    assert active_max <= 1
    assert fired <= run / job_s + 1 and skipped >= run - (run / job_s + 1) - 1, (fired, skipped)


# -- S30 ----------------------------------------------------------------------------------------------------


@pytest.mark.scenario("S30")
def test_s30_schedule_edits_under_load_never_double_a_tick_and_a_pause_holds(scenario: Scenario):
    from tests.faults import tasks

    sc = scenario
    run = sc.size(4.0, 20.0)
    env = sc.env(schedule_interval=0.2)
    workers = [sc.worker("default", "--isolation", "thread", "-c", "2", label=f"w{i}", env=env) for i in range(2)]
    for w in workers:
        w.wait_registered()
    edits = {"edits": 0, "errors": []}
    stop = threading.Event()

    def edit() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if i % 25 == 0:
                    sc.pq.unschedule(tasks.noop, key="us")
                sc.pq.schedule(tasks.noop, run_every=1 + i % 2, key="us", max_concurrent=None,
                               active=i % 10 != 0)
                edits["edits"] += 1
            except Exception as exc:  # noqa: BLE001
                edits["errors"].append(repr(exc)[:200])
            time.sleep(0.05)

    t = threading.Thread(target=edit, daemon=True)
    t.start()
    time.sleep(run)  # the load: edits for this long
    stop.set()
    t.join(10)
    paused = sc.pq.schedule(tasks.noop, run_every=1, key="us", max_concurrent=None, active=False)
    paused_at = sc.db_now()
    time.sleep(3.0)  # a paused schedule must stay silent (3 ticks' worth)
    after_pause = sc.scalar("SELECT count(*) FROM pq_tick WHERE schedule_id = %(s)s AND created_at > %(t)s",
                            s=paused.id, t=paused_at)
    resumed = sc.pq.schedule(tasks.noop, run_every=1, key="us", max_concurrent=None, active=True)
    resumed_at = sc.db_now()
    first = wait_until(lambda: sc.scalar("SELECT min(created_at) FROM pq_tick WHERE schedule_id = %(s)s "
                                         "AND created_at > %(t)s", s=resumed.id, t=resumed_at), 5,
                       message="a tick after the resume")
    made, distinct, jobs = _tick_job_integrity(sc)
    sc.record(edits=edits["edits"], edit_errors=len(edits["errors"]), ticks=made,
              ticks_after_pause=after_pause, first_tick_after_resume_s=round((first - resumed_at).total_seconds(), 2))
    assert edits["errors"] == [], edits["errors"][:3]
    assert made == distinct == jobs, (made, distinct, jobs)
    assert after_pause == 0
    assert (first - resumed_at).total_seconds() <= 1.5


# -- S31 ----------------------------------------------------------------------------------------------------

ZONES = ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Europe/Dublin", "Asia/Tehran",
         "America/Santiago", "Pacific/Chatham", "Africa/Casablanca", "America/Havana", "Asia/Gaza",
         "Europe/London", "America/Los_Angeles", "Australia/Sydney", "Pacific/Auckland", "America/Sao_Paulo",
         "Asia/Kolkata", "UTC", "America/St_Johns", "Europe/Moscow", "America/Asuncion",
         "Atlantic/Azores", "America/Godthab", "Europe/Athens", "Asia/Amman", "Asia/Beirut",
         "Europe/Chisinau", "America/Mexico_City", "America/Denver", "Pacific/Norfolk", "Europe/Kyiv",
         "Asia/Damascus", "America/Halifax", "Pacific/Easter", "America/Scoresbysund", "Europe/Lisbon",
         "Asia/Jerusalem", "America/Miquelon", "Africa/Cairo", "America/Chicago", "Europe/Berlin"]
CRONS = ["30 2 * * *", "0 2 * * *", "30 1 * * *", "0 * * * *", "*/15 * * * *", "0 9 * * 1",
         "59 1 * * *", "0 3 * * *", "15 2 * * 0", "0 0 * * *", "30 * * * *", "45 23 * * *"]


def _fixed_daily(cron: str) -> tuple[int, int] | None:
    minute, hour, dom, month, dow = cron.split()
    if minute.isdigit() and hour.isdigit() and dom == "*" and month == "*" and dow == "*":
        return int(hour), int(minute)
    return None


def _transitions(tz: ZoneInfo, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """The instants (UTC) where ``tz`` changes its offset between ``start`` and ``end``."""
    found = []
    step = dt.timedelta(hours=6)
    t = start
    while t < end:
        nxt = t + step
        if t.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            low, high = t, nxt
            while high - low > dt.timedelta(minutes=1):
                mid = low + (high - low) / 2
                if mid.astimezone(tz).utcoffset() == t.astimezone(tz).utcoffset():
                    low = mid
                else:
                    high = mid
            found.append(high)
        t = nxt
    return found


@pytest.mark.scenario("S31")
def test_s31_dst_fixed_times_fire_once_per_local_date_and_elapsed_schedules_follow_real_time(scenario: Scenario):
    """A property test: every zone x cron, in a window around each offset change of the period
    and in ordinary windows, against the written DST policy."""
    from sqla_pq.schedules import build_timing

    sc = scenario
    zones = sc.size(ZONES[:6], ZONES)
    crons = sc.size(CRONS[:6], CRONS)
    years = sc.size(1, 3)
    start = dt.datetime(2026, 1, 1, tzinfo=UTC)
    end = dt.datetime(2026 + years, 1, 1, tzinfo=UTC)
    t0 = time.monotonic()
    checked = windows = 0
    day_counts: dict[str, set[int]] = {}
    for zone in zones:
        tz = ZoneInfo(zone)
        changes = _transitions(tz, start, end)
        ordinary = [dt.datetime(2026 + y, 1, 15, tzinfo=UTC) for y in range(years)]
        for cron in crons:
            timing, _ = build_timing(cron=cron, timezone=zone)
            fixed = _fixed_daily(cron)
            half = dt.timedelta(hours=6) if cron.startswith("*/15") else dt.timedelta(days=1)
            if cron == "0 9 * * 1":
                half = dt.timedelta(days=8)
            for center in changes + ordinary:
                windows += 1
                lo, hi = center - half, center + half
                fires = [timing.first(lo)]
                while fires[-1] is not None and fires[-1] < hi:
                    nxt = timing.after(fires[-1], lo, len(fires))
                    assert nxt is None or nxt > fires[-1], (zone, cron, fires[-1], nxt)
                    fires.append(nxt)
                fires = [f for f in fires if f is not None and lo <= f < hi]
                checked += len(fires)
                if fixed:
                    per_date: dict[dt.date, int] = {}
                    for f in fires:
                        local = f.astimezone(tz)
                        naive = local.replace(tzinfo=None)
                        scheduled = None
                        for day in (local.date(), local.date() - dt.timedelta(days=1)):
                            wanted = dt.datetime.combine(day, dt.time(*fixed))
                            if naive == wanted:
                                scheduled = day
                                break
                            exists = wanted.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(
                                tzinfo=None) == wanted
                            if not exists and wanted < naive:  # a spring-forward gap: right after it
                                assert f - dt.timedelta(hours=3) < wanted.replace(tzinfo=tz, fold=1), (zone, cron, local)
                                scheduled = day
                                break
                        assert scheduled is not None, (zone, cron, local)
                        per_date[scheduled] = per_date.get(scheduled, 0) + 1
                    assert max(per_date.values(), default=1) == 1, (zone, cron, per_date)
                    inner = {(lo + dt.timedelta(days=1)).astimezone(tz).date()}
                    assert all(d in per_date for d in inner if lo.astimezone(tz).date() < d
                               < hi.astimezone(tz).date()), (zone, cron, center, per_date)
                if cron == "0 * * * *":
                    for f_a, f_b in zip(fires, fires[1:]):
                        shift = f_b.astimezone(tz).utcoffset() - f_a.astimezone(tz).utcoffset()
                        assert f_b.astimezone(tz).minute == 0, (zone, f_b)
                        if shift in (dt.timedelta(0), dt.timedelta(hours=1), dt.timedelta(hours=-1)):
                            assert f_b - f_a == dt.timedelta(hours=1), (zone, f_a, f_b)
                        else:  # half-hour shifts (Lord Howe): the next local :00
                            assert dt.timedelta(minutes=30) <= f_b - f_a <= dt.timedelta(minutes=90)
                    day = center.astimezone(tz).date()
                    n = sum(1 for f in fires if f.astimezone(tz).date() == day)
                    day_counts.setdefault(zone, set()).add(n)
    elapsed = time.monotonic() - t0
    sc.record(zones=len(zones), crons=len(crons), years=years, windows=windows, fire_times_checked=checked,
              property_test_s=round(elapsed, 2),
              hourly_fires_on_change_days={z: sorted(v) for z, v in day_counts.items()})
    assert {23, 24, 25} <= day_counts["Europe/Paris"] and {23, 25} <= day_counts["America/New_York"]
    # property_test_s is a figure for the report, not a pass/fail bound: timings on shared
    # machines are noisy (the full size took 34 s once on a loaded 2-CPU machine)


@pytest.mark.scenario("S31")
def test_s31_an_hourly_schedule_fires_every_real_hour_across_a_two_hour_fall_back(scenario: Scenario):
    from sqla_pq.schedules import build_timing

    timing, _ = build_timing(cron="0 * * * *", timezone="Antarctica/Troll")
    start = dt.datetime(2026, 10, 24, 20, tzinfo=UTC)
    fires = [timing.first(start)]
    for _ in range(8):
        fires.append(timing.after(fires[-1], start, len(fires)))
    scenario.record(fires_utc=[f.strftime("%H:%M") for f in fires])
    assert [(b - a) for a, b in zip(fires, fires[1:])] == [dt.timedelta(hours=1)] * 8


@pytest.mark.scenario("S31")
def test_s31_the_scheduler_loop_across_the_paris_spring_forward_with_an_injected_database_clock(
        scenario: Scenario):
    """The scheduler runs with now() taken from a table (a function earlier on the search_path
    than pg_catalog), stepped through the night of 29 March 2026 in Paris."""
    from sqla_pq.db import create_engine
    from sqla_pq.link import Link
    from sqla_pq.maintenance.scheduler import Scheduler
    from tests.faults import tasks

    sc = scenario
    sc.execute("""
        CREATE SCHEMA fakeclock;
        CREATE TABLE fakeclock.clock (t timestamptz NOT NULL);
        CREATE FUNCTION fakeclock.now() RETURNS timestamptz LANGUAGE sql STABLE
            AS 'SELECT t FROM fakeclock.clock LIMIT 1';
    """)
    start = dt.datetime(2026, 3, 28, 23, 0, tzinfo=UTC)  # 00:00 CET on the 29th
    sc.execute("INSERT INTO fakeclock.clock VALUES (%(t)s)", t=start)
    daily = sc.pq.schedule(tasks.noop, cron="30 2 * * *", timezone="Europe/Paris", key="daily",
                           max_concurrent=None)
    hourly = sc.pq.schedule(tasks.noop, cron="0 * * * *", timezone="Europe/Paris", key="hourly",
                            max_concurrent=None)
    from sqla_pq.schedules import build_timing

    for s, cron in ((daily, "30 2 * * *"), (hourly, "0 * * * *")):
        first = build_timing(cron=cron, timezone="Europe/Paris")[0].first(start)
        sc.execute("UPDATE pq_schedule SET anchor_at = %(a)s, next_run_at = %(n)s WHERE id = %(i)s",
                   a=start, n=first, i=s.id)
    engine = create_engine(sc.url, connect_args={"options": "-c search_path=fakeclock,pg_catalog,public"})
    link = Link(engine, "scheduler-test")
    scheduler = Scheduler(sc.pq)
    try:
        now = start
        while now <= start + dt.timedelta(hours=6):
            sc.execute("UPDATE fakeclock.clock SET t = %(t)s", t=now)
            scheduler.run_once(link)
            now += dt.timedelta(minutes=5)
    finally:
        link.close()
        engine.dispose()
    paris = ZoneInfo("Europe/Paris")
    daily_ticks = [t.astimezone(paris).strftime("%m-%d %H:%M%z") for t in _ticks(sc, daily.id)]
    hourly_ticks = [t.astimezone(UTC).strftime("%H:%M") for t in _ticks(sc, hourly.id)]
    sc.record(daily_ticks=daily_ticks, hourly_ticks_utc=hourly_ticks)
    assert daily_ticks == ["03-29 03:00+0200"], daily_ticks  # 02:30 does not exist: right after the gap
    assert hourly_ticks == ["23:00", "00:00", "01:00", "02:00", "03:00", "04:00", "05:00"], hourly_ticks
