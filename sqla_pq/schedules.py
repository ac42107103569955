"""Schedules: when a repeating or periodic job fires next, and the API that stores them.

Two seeds meet here.  django-pq's ``Queue.schedule_call(when, func, repeat=, interval=,
between=, weekdays=, until=)`` repeats from a start time; python-pq's ``pq.schedule(func,
run_every= | cron=, key=, max_concurrent=, active=, timezone=)`` registers a periodic task
that calling again updates in place.  Both are rows of ``pq_schedule``; the workers' scheduler
loop turns each due tick into one job (``maintenance/scheduler.py``).

Daylight saving follows cron's rule: a schedule at a fixed local time fires once per local date
(a time in the spring-forward gap fires right after the gap, one in the fall-back overlap at its
first occurrence); hourly and finer cron schedules, and ``run_every`` intervals, follow elapsed
time.  Every computed fire time is checked to be strictly later than the previous one (croniter
has returned earlier times across DST changes).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.relativedelta import relativedelta

from .errors import InvalidTimeSpec
from .timeparse import (
    UTC,
    Interval,
    aware,
    in_window,
    parse_between,
    parse_interval,
    parse_moment,
    parse_weekdays,
)

if TYPE_CHECKING:
    from .enqueue import Queue
    from .models import Schedule
    from .pq import PQ


def _croniter() -> Any:
    """croniter, imported when a cron schedule is first met (not at every worker's start)."""
    from croniter import croniter

    return croniter


RELATIVE_FIELDS = ("years", "months", "weeks", "days", "hours", "minutes", "seconds")
MAX_STEPS = 10_000
FOLD_HORIZON = dt.timedelta(hours=3)
"""How far past the first match an elapsed-time cron looks for an earlier instant (DST)."""


# -- time zones ------------------------------------------------------------------------------------


def parse_timezone(value: Any) -> tuple[dt.tzinfo, str]:
    """A tzinfo and the name it is stored under: IANA names, ZoneInfo, UTC, fixed offsets."""
    if value is None:
        return UTC, "UTC"
    if isinstance(value, ZoneInfo):
        return value, value.key
    if isinstance(value, dt.timezone):
        offset = value.utcoffset(None)
        if not offset:
            return UTC, "UTC"
        return value, _offset_name(offset)
    if isinstance(value, str):
        name = value.strip()
        if name.upper() in ("UTC", "Z", "GMT"):
            return UTC, "UTC"
        if name[:1] in "+-" and ":" in name:
            sign = -1 if name[0] == "-" else 1
            hours, minutes = name[1:].split(":")
            offset = dt.timedelta(hours=int(hours), minutes=int(minutes)) * sign
            return dt.timezone(offset), _offset_name(offset)
        try:
            return ZoneInfo(name), name
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidTimeSpec(f"unknown time zone {value!r}: use an IANA name such as "
                                  "'Europe/Paris'") from None
    key = getattr(value, "key", None) or getattr(value, "zone", None)
    if isinstance(key, str):
        return parse_timezone(key)
    offset = value.utcoffset(dt.datetime(2000, 1, 1))
    if offset is not None and value.utcoffset(dt.datetime(2000, 7, 1)) == offset:
        return dt.timezone(offset), _offset_name(offset)
    raise InvalidTimeSpec(f"time zone {value!r}: pass an IANA name or a ZoneInfo")


def _offset_name(offset: dt.timedelta) -> str:
    total = int(offset.total_seconds()) // 60
    sign = "-" if total < 0 else "+"
    return f"{sign}{abs(total) // 60:02d}:{abs(total) % 60:02d}"


def localize(naive: dt.datetime, tz: dt.tzinfo, *, gap: str = "after") -> dt.datetime | None:
    """The instant a naive local time names.  In a fall-back overlap: the first occurrence.  In a
    spring-forward gap: the instant the clocks jumped, i.e. right after the gap
    (``gap="after"``), or None (``gap="skip"``)."""
    first = naive.replace(tzinfo=tz, fold=0)
    if _exists(first):
        return first
    if gap == "skip":
        return None
    # fold=0 reads the missing time with the offset before the jump, fold=1 with the one after;
    # the jump itself lies between the two readings.
    low = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = first.astimezone(UTC)
    after_offset = high.astimezone(tz).utcoffset()
    while high - low > dt.timedelta(seconds=1):
        mid = low + (high - low) / 2
        if mid.astimezone(tz).utcoffset() == after_offset:
            high = mid
        else:
            low = mid
    return high.replace(microsecond=0).astimezone(tz)


def _offset_changes(moment: dt.datetime, tz: Any) -> bool:
    """Whether ``tz`` changes its UTC offset within FOLD_HORIZON of ``moment``."""
    before = (moment - FOLD_HORIZON).astimezone(tz).utcoffset()
    after = (moment + FOLD_HORIZON).astimezone(tz).utcoffset()
    return before != after


def _offset_changes_between(start: dt.datetime, end: dt.datetime, tz: Any) -> bool:
    """Whether ``tz`` may change its UTC offset between ``start`` and ``end`` (widened by
    FOLD_HORIZON on both sides)."""
    return (start - FOLD_HORIZON).astimezone(tz).utcoffset() != (end + FOLD_HORIZON).astimezone(tz).utcoffset()


def _exists(aware_local: dt.datetime) -> bool:
    """False for wall times in a spring-forward gap."""
    roundtrip = aware_local.astimezone(UTC).astimezone(aware_local.tzinfo)
    return roundtrip.replace(tzinfo=None, fold=0) == aware_local.replace(tzinfo=None, fold=0)


def _ambiguous(naive: dt.datetime, tz: dt.tzinfo) -> bool:
    return naive.replace(tzinfo=tz, fold=0).utcoffset() != naive.replace(tzinfo=tz, fold=1).utcoffset()


# -- the timing rule -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """When a schedule fires.  Stored in the schedule's columns; pure computation here."""

    tz: dt.tzinfo = UTC
    cron: str | None = None
    interval: dt.timedelta | None = None
    relative: relativedelta | None = None
    window: tuple[dt.time, dt.time] | None = None
    weekdays: tuple[int, ...] = ()
    until: dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.cron is not None and not _croniter().is_valid(self.cron):
            raise InvalidTimeSpec(f"invalid cron expression {self.cron!r}")

    @property
    def elapsed(self) -> bool:
        """Hourly-and-finer cron schedules follow elapsed time across DST changes."""
        if self.cron is None:
            return True
        fields = self.cron.split()
        hour = fields[1] if len(fields) >= 5 else "*"
        return hour == "*" or "/" in hour

    def first(self, anchor: dt.datetime) -> dt.datetime | None:
        """The first fire time at or after ``anchor``."""
        if self.cron is not None:
            return self._cron_after(anchor - dt.timedelta(microseconds=1))
        return self._fit(anchor)

    def after(self, previous: dt.datetime, anchor: dt.datetime, runs: int) -> dt.datetime | None:
        """The fire time after ``previous`` (the ``runs``-th tick, counting from 1)."""
        if self.cron is not None:
            nxt = self._cron_after(previous)
        elif self.relative is not None:
            nxt = self._relative(anchor, runs)
            guard = 0
            while nxt is not None and nxt <= previous and guard < MAX_STEPS:
                runs += 1
                guard += 1
                nxt = self._relative(anchor, runs)
        elif self.interval is not None:
            nxt = previous + self.interval
        else:
            return None
        if nxt is None:
            return None
        fitted = self._fit(nxt)
        if fitted is not None and fitted <= previous:  # never earlier than the last tick
            fitted = self._fit(previous + dt.timedelta(seconds=1))
        return fitted

    def next_after(self, previous: dt.datetime, anchor: dt.datetime, runs: int,
                   not_before: dt.datetime) -> tuple[dt.datetime | None, int]:
        """The next fire time strictly after ``not_before`` (skipping missed ticks: after
        downtime a schedule fires one catch-up job, not a storm); returns it and the tick
        count it corresponds to."""
        nxt = self.after(previous, anchor, runs)
        steps = 0
        while nxt is not None and nxt <= not_before and steps < MAX_STEPS:
            runs += 1
            steps += 1
            if self.interval is not None and self.cron is None and self.relative is None:
                # jump over the downtime in one step
                missed = int((not_before - nxt) / self.interval)
                if missed > 1:
                    nxt = nxt + self.interval * missed
                    runs += missed
            elif self.cron is not None:
                # a cron tick does not depend on the count: jump straight past the downtime
                nxt = max(nxt, not_before)
            nxt = self.after(nxt, anchor, runs)
        return nxt, runs

    # -- pieces ---------------------------------------------------------------------------------

    def _relative(self, anchor: dt.datetime, n: int) -> dt.datetime | None:
        """The n-th repeat after the anchor, from the anchor (so month ends do not drift):
        years and months step n times; the smaller units are an offset when a month step is
        present (``months=1, days=-1`` is the last day of each month), and step otherwise."""
        rd = self.relative
        assert rd is not None
        local = anchor.astimezone(self.tz).replace(tzinfo=None)
        if rd.years or rd.months:
            step = relativedelta(years=rd.years * n, months=rd.months * n, weeks=0,
                                 days=rd.days, hours=rd.hours, minutes=rd.minutes,
                                 seconds=rd.seconds)
        else:
            step = relativedelta(days=rd.days * n, hours=rd.hours * n, minutes=rd.minutes * n,
                                 seconds=rd.seconds * n)
        return localize(local + step, self.tz)

    def _cron_after(self, previous: dt.datetime) -> dt.datetime | None:
        """The first cron fire strictly after ``previous``."""
        assert self.cron is not None
        tz = self.tz
        local_prev = previous.astimezone(tz)
        start = local_prev.replace(tzinfo=None) - dt.timedelta(seconds=1)
        if self.elapsed and _offset_changes(previous, tz):
            # Around a fall-back the wall clock repeats: the next instant may belong to an
            # EARLIER wall time (its second occurrence), so start looking that far back.
            start -= FOLD_HORIZON
        it = _croniter()(self.cron, start)
        best: dt.datetime | None = None
        horizon: dt.datetime | None = None
        for _ in range(MAX_STEPS):
            naive: dt.datetime = it.get_next(dt.datetime)
            if horizon is not None and naive > horizon:
                break
            candidates: list[dt.datetime] = []
            if self.elapsed:
                for fold in (0, 1):
                    c = naive.replace(tzinfo=tz, fold=fold)
                    if _exists(c) and all(c.astimezone(UTC) != x.astimezone(UTC) for x in candidates):
                        candidates.append(c)
            else:
                c = localize(naive, tz, gap="after")
                if c is not None:
                    candidates.append(c)
            for c in sorted(candidates, key=lambda x: x.astimezone(UTC)):
                instant = c.astimezone(UTC)
                if instant > previous.astimezone(UTC):
                    fitted = self._fit(instant)
                    if fitted is not None and fitted > previous:
                        if not self.elapsed:
                            return fitted
                        if best is None or fitted < best:
                            best = fitted
                        break
            if best is not None and horizon is None:
                if not _offset_changes_between(previous, best, tz):
                    return best  # no DST change near: the first candidate is the next instant
                # After a fall-back the wall clock repeats: a later wall time's first instant
                # can come before an earlier wall time's second one.  Look as far ahead as the
                # largest DST shift there is (two hours, Antarctica/Troll) and keep the earliest.
                horizon = naive + FOLD_HORIZON
        return best

    def _fit(self, moment: dt.datetime) -> dt.datetime | None:
        """Move ``moment`` forward into the allowed weekdays and daily window; None past
        ``until``."""
        moment = aware(moment)
        if self.window is None and not self.weekdays:
            result = moment
        else:
            result = self._next_allowed(moment)
        if result is not None and self.until is not None and result > self.until:
            return None
        return result.astimezone(UTC) if result is not None else None

    def _allowed(self, local: dt.datetime) -> bool:
        if self.weekdays and local.weekday() not in self.weekdays:
            return False
        return self.window is None or in_window(local.time(), self.window)

    def _next_allowed(self, moment: dt.datetime) -> dt.datetime | None:
        local = moment.astimezone(self.tz)
        if self._allowed(local):
            return moment
        candidates = []
        for k in range(0, 9):
            day = (local + dt.timedelta(days=k)).date()
            starts = [dt.time(0, 0)]
            if self.window is not None:
                starts.append(self.window[0])
            for t in starts:
                c = localize(dt.datetime.combine(day, t), self.tz)
                if c is not None and c > local and self._allowed(c.astimezone(self.tz)):
                    candidates.append(c)
            if candidates:
                return min(candidates)
        return None


# -- from the API's arguments to columns and back --------------------------------------------------


def relative_to_json(rd: relativedelta) -> dict[str, int | float]:
    return {f: getattr(rd, f) for f in RELATIVE_FIELDS if f != "weeks" and getattr(rd, f)}


def timing_of(row: Any) -> Timing:
    """The Timing stored in a pq_schedule row."""
    tz, _ = parse_timezone(row.timezone)
    window = (row.between_start, row.between_end) if row.between_start is not None else None
    return Timing(
        tz=tz,
        cron=row.cron,
        interval=dt.timedelta(seconds=row.interval) if row.interval else None,
        relative=relativedelta(**row.interval_relative) if row.interval_relative else None,
        window=window,
        weekdays=tuple(row.weekdays or ()),
        until=row.until,
    )


@dataclass
class ScheduleRequest:
    """Validated arguments of a schedule, ready to store."""

    task: str
    key: str
    queue: str
    priority: int
    encoded: Any
    job_options: dict[str, Any]
    timing: Timing
    tz_name: str
    anchor: dt.datetime | None
    repeats_left: int | None
    max_concurrent: int | None
    active: bool
    signature: bytes | None = None


def build_timing(
    *,
    cron: str | None = None,
    interval: Interval | None = None,
    between: Any = None,
    weekdays: Any = None,
    until: Any = None,
    timezone: Any = None,
    tz_hint: dt.tzinfo | None = None,
) -> tuple[Timing, str]:
    if cron is not None and interval is not None:
        raise InvalidTimeSpec("give cron or an interval (run_every), not both")
    if cron is not None:
        cron = " ".join(str(cron).split())
        croniter = _croniter()
        if len(cron) > 255 or not croniter.is_valid(cron):
            raise InvalidTimeSpec(f"invalid cron expression {cron[:100]!r}")
        try:  # an expression that can never match ("* * 30 2 *") is refused now, not at a tick
            croniter(cron, dt.datetime(2000, 1, 1)).get_next(dt.datetime)
        except Exception:
            raise InvalidTimeSpec(f"cron expression {cron!r} never matches a date") from None
    tz, tz_name = parse_timezone(timezone if timezone is not None else tz_hint)
    parsed = parse_interval(interval) if interval is not None else None
    window = parse_between(between) if between is not None else None
    days = parse_weekdays(weekdays) if weekdays is not None else ()
    until_at = parse_moment(until, what="until") if until is not None else None
    timing = Timing(
        tz=tz, cron=cron,
        interval=parsed if isinstance(parsed, dt.timedelta) else None,
        relative=parsed if isinstance(parsed, relativedelta) else None,
        window=window, weekdays=days, until=until_at,
    )
    return timing, tz_name


def parse_repeat(repeat: Any) -> tuple[int | None, dt.datetime | None]:
    """django-pq's ``repeat``: a count of repeats after the first run, -1 for ever, or a datetime
    (repeat until then).  Returns (repeats_left, until)."""
    if repeat is None:
        return 0, None
    if isinstance(repeat, dt.datetime):
        return None, aware(repeat)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < -1:
        raise InvalidTimeSpec(f"invalid repeat {repeat!r}: a count, -1 (forever) or a datetime")
    return (None if repeat == -1 else repeat), None


def new_key() -> str:
    return f"call-{secrets.token_hex(6)}"


# -- the API (called by PQ and Queue) -------------------------------------------------------------


def list_schedules(pq: PQ, *, task: str | None = None) -> list[Schedule]:
    from sqlalchemy import select

    from .models import Schedule

    with pq.session() as s:
        stmt = select(Schedule).order_by(Schedule.id)
        if task is not None:
            stmt = stmt.where(Schedule.task == task)
        items = list(s.scalars(stmt))
        s.expunge_all()
    return items


__all__ = [
    "Timing", "build_timing", "list_schedules", "localize", "parse_repeat", "parse_timezone",
    "relative_to_json", "timing_of",
]


# -- storing schedules -------------------------------------------------------------------------------


def store(pq: PQ, request: ScheduleRequest, *, update_existing: bool) -> Schedule:
    """Insert the schedule, or (``update_existing``) update the one with the same task and key
    in place: python-pq's "calling it again updates it" (how pause and resume work).  The next
    tick is kept when the timing did not change."""
    from sqlalchemy import func, select

    from .models import Schedule
    from .serialization import sign

    with pq.session() as session:
        now = session.execute(select(func.now())).scalar_one()
        existing = None
        if update_existing:
            existing = session.scalars(
                select(Schedule).where(Schedule.task == request.task, Schedule.key == request.key)
                .with_for_update()
            ).first()
        t = request.timing
        columns = dict(
            queue=request.queue, priority=request.priority, encoding=request.encoded.encoding,
            args=request.encoded.args_value, kwargs=request.encoded.kwargs_value,
            payload=request.encoded.payload, job_options=request.job_options, cron=t.cron,
            interval=t.interval.total_seconds() if t.interval else None,
            interval_relative=relative_to_json(t.relative) if t.relative else None,
            timezone=request.tz_name,
            between_start=t.window[0] if t.window else None,
            between_end=t.window[1] if t.window else None,
            weekdays=list(t.weekdays) or None, until=t.until,
            active=request.active, max_concurrent=request.max_concurrent,
        )
        if existing is not None:
            timing_changed = timing_of(existing) != t
            for name, value in columns.items():
                setattr(existing, name, value)
            existing.repeats_left = request.repeats_left
            existing.updated_at = now
            if timing_changed or existing.next_run_at is None:
                existing.anchor_at = request.anchor or now
                existing.runs = 0
                existing.next_run_at = t.first(existing.anchor_at)
            schedule = existing
        else:
            anchor = request.anchor or now
            schedule = Schedule(task=request.task, key=request.key, anchor_at=anchor, runs=0,
                                repeats_left=request.repeats_left, next_run_at=t.first(anchor),
                                **columns)
            session.add(schedule)
        session.flush()
        if schedule.payload is not None and pq.settings.secret_keys:
            # signed for the schedule (negative id: never a job's), re-signed per fired job
            schedule.signature = sign(pq.settings.secret_keys, -schedule.id, schedule.task,
                                      schedule.payload)
            session.flush()
        session.expunge(schedule)
    return schedule


def periodic_request(
    pq: PQ,
    func: Any,
    *,
    run_every: Interval | None,
    cron: str | None,
    key: str,
    max_concurrent: int | None,
    active: bool,
    timezone: Any,
    queue: str | None,
    priority: int | None,
    args: Any,
    kwargs: Mapping[str, Any],
    job_options: Mapping[str, Any] | None,
) -> ScheduleRequest:
    if run_every is None and cron is None:
        raise InvalidTimeSpec("a periodic task needs run_every= or cron=")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or max_concurrent < 1):
        raise InvalidTimeSpec(f"max_concurrent must be a positive int or None, not {max_concurrent!r}")
    timing, tz_name = build_timing(cron=cron, interval=run_every, timezone=timezone)
    return _request(pq, pq.queue(queue), func, args, kwargs, key=key, timing=timing,
                    tz_name=tz_name, anchor=None, repeats_left=None,
                    max_concurrent=max_concurrent, active=active, priority=priority,
                    job_options=job_options or {})


def repeating_request(
    pq: PQ,
    queue: Queue,
    when: Any,
    func: Any,
    args: Any,
    kwargs: Mapping[str, Any] | None,
    *,
    repeat: Any = None,
    interval: Interval | None = None,
    between: Any = None,
    weekdays: Any = None,
    until: Any = None,
    timezone: Any = None,
    key: str | None = None,
    max_concurrent: int | None = None,
    **options: Any,
) -> ScheduleRequest:
    start = parse_moment(when, what="when") if not isinstance(when, dt.datetime) else aware(when)
    repeats_left, repeat_until = parse_repeat(repeat)
    if repeat_until is not None and until is None:
        until = repeat_until
    if (repeats_left != 0 or until is not None) and interval is None and not weekdays and between is None:
        raise InvalidTimeSpec("a repeating schedule needs interval= (or weekdays/between)")
    if interval is None and (weekdays or between is not None) and repeats_left != 0:
        interval = dt.timedelta(days=1)
    timing, tz_name = build_timing(interval=interval, between=between, weekdays=weekdays,
                                   until=until, timezone=timezone,
                                   tz_hint=when.tzinfo if isinstance(when, dt.datetime) else None)
    priority = options.pop("priority", None)
    return _request(pq, queue, func, args, kwargs or {}, key=key or new_key(), timing=timing,
                    tz_name=tz_name, anchor=start, repeats_left=repeats_left,
                    max_concurrent=max_concurrent, active=True, priority=priority,
                    job_options=options)


def _request(pq: PQ, queue: Queue, func: Any, args: Any, kwargs: Mapping[str, Any], *, key: str,
             timing: Timing, tz_name: str, anchor: dt.datetime | None, repeats_left: int | None,
             max_concurrent: int | None, active: bool, priority: int | None,
             job_options: Mapping[str, Any]) -> ScheduleRequest:
    unknown = set(job_options) - {"timeout", "result_ttl", "max_retries", "retry_in",
                                  "max_interruptions"}
    if unknown:
        from .errors import InvalidOption

        raise InvalidOption(f"unknown schedule option(s) {', '.join(sorted(unknown))}")
    spec = queue.build(func, tuple(args or ()), dict(kwargs), priority=priority, **job_options)
    options = {
        "timeout": spec.timeout, "result_ttl": spec.result_ttl, "max_retries": spec.max_retries,
        "retry_policy": spec.retry_policy, "max_interruptions": spec.max_interruptions,
        "serial": spec.serial,
    }
    return ScheduleRequest(
        task=spec.task or "", key=key, queue=queue.name, priority=spec.priority,
        encoded=spec.encoded,
        job_options=options, timing=timing, tz_name=tz_name, anchor=anchor,
        repeats_left=repeats_left, max_concurrent=max_concurrent, active=active,
    )
