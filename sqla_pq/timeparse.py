"""The one parser for times in sqla_pq: durations, run times, windows and weekdays.

Every option that takes a time goes through here, so ``"5m"`` means the same thing to
``run_at``, ``retry_in``, ``timeout``, ``schedule_at`` and the command line.  Naive datetimes are
taken as UTC: the database compares everything in its own clock and time zone-aware values.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from dateutil.relativedelta import relativedelta, weekday

from .errors import InvalidTimeSpec

UTC = dt.UTC

Duration = int | float | str | dt.timedelta
"""Seconds, ``"10s"`` / ``"5m"`` / ``"1h30m"`` / ``"2d"`` / ``"250ms"``, or a timedelta."""

When = Duration | dt.datetime
"""A moment: a datetime, or a Duration counted from the database's ``now()``."""

_UNITS = {
    "ms": 0.001,
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)?\s*", re.IGNORECASE)


def parse_duration(value: Duration, *, what: str = "duration") -> dt.timedelta:
    """Turn seconds, a timedelta or a string such as ``"1h30m"`` into a timedelta."""
    if isinstance(value, dt.timedelta):
        return value
    if isinstance(value, bool):
        raise InvalidTimeSpec(f"invalid {what} {value!r}: expected seconds, not a boolean")
    if isinstance(value, (int, float)):
        return _delta(value, value, what)
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            raise InvalidTimeSpec(f"invalid {what} {value!r}: empty")
        sign = 1
        if text[0] in "+-":
            sign = -1 if text[0] == "-" else 1
            text = text[1:]
        total = 0.0
        pos = 0
        while pos < len(text):
            m = _PART.match(text, pos)
            if not m or m.end() == pos:
                break
            number, unit = m.groups()
            if unit is None:
                # a bare number is seconds, but only as the whole string ("90")
                if pos != 0 or m.end() != len(text):
                    break
                unit = "s"
            if unit not in _UNITS:
                raise InvalidTimeSpec(
                    f"invalid {what} {value!r}: unknown unit {unit!r} (use ms, s, m, h, d or w)"
                )
            total += float(number) * _UNITS[unit]
            pos = m.end()
        if pos != len(text):
            raise InvalidTimeSpec(
                f"invalid {what} {value!r}: expected something like '10s', '5m', '1h30m', '2d'"
            )
        return _delta(sign * total, value, what)
    raise InvalidTimeSpec(f"invalid {what} {value!r}: expected seconds, a string or a timedelta")


def _delta(total: float, given: object, what: str) -> dt.timedelta:
    try:
        if total != total:
            raise ValueError("not a number")
        return dt.timedelta(seconds=total)
    except (OverflowError, ValueError):
        raise InvalidTimeSpec(f"invalid {what} {given!r}: out of range") from None


def seconds(value: Duration, *, what: str = "duration") -> float:
    """A Duration as float seconds."""
    return parse_duration(value, what=what).total_seconds()


def aware(moment: dt.datetime) -> dt.datetime:
    """Naive datetimes are UTC; aware ones are kept as they are."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RunAt:
    """A resolved run time: either an absolute moment or a delay from the database's now()."""

    at: dt.datetime | None = None
    delay: float | None = None

    @property
    def is_now(self) -> bool:
        return self.at is None and not self.delay


NOW = RunAt()


def parse_when(value: When | None, *, what: str = "run_at") -> RunAt:
    """Resolve ``run_at`` / ``schedule_at``: a datetime is absolute, anything else is a delay."""
    if value is None:
        return NOW
    if isinstance(value, dt.datetime):
        return RunAt(at=aware(value))
    if isinstance(value, dt.date):
        return RunAt(at=dt.datetime.combine(value, dt.time(), tzinfo=UTC))
    return RunAt(delay=parse_duration(value, what=what).total_seconds())


def parse_moment(value: str | dt.datetime | dt.date, *, what: str = "time") -> dt.datetime:
    """``"now"`` or an ISO 8601 date or datetime (as the seed's ``pqschedule`` accepts)."""
    if isinstance(value, dt.datetime):
        return aware(value)
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, dt.time(), tzinfo=UTC)
    text = value.strip()
    if text.lower() == "now":
        return dt.datetime.now(UTC)
    from dateutil import parser as date_parser  # ~5 ms to import: only when a time is parsed

    try:
        return aware(date_parser.isoparse(text))
    except (ValueError, OverflowError):
        pass
    try:
        return aware(date_parser.parse(text))
    except (ValueError, OverflowError) as exc:
        raise InvalidTimeSpec(
            f"invalid {what} {value!r}: use 'now' or an ISO 8601 date or datetime"
        ) from exc


# -- schedules: intervals, windows, weekdays ----------------------------------------------------

Interval = int | float | str | dt.timedelta | relativedelta


def parse_interval(value: Interval, *, what: str = "interval") -> dt.timedelta | relativedelta:
    """An interval: a Duration (strictly positive) or a relativedelta (monthly and the like)."""
    if isinstance(value, relativedelta):
        probe = dt.datetime(2001, 1, 31, tzinfo=UTC)
        if probe + value <= probe:
            raise InvalidTimeSpec(f"invalid {what} {value!r}: it must move time forward")
        return value
    delta = parse_duration(value, what=what)
    if delta <= dt.timedelta(0):
        raise InvalidTimeSpec(f"invalid {what} {value!r}: it must be positive")
    return delta


_BETWEEN = re.compile(
    r"^\s*(\d{1,2})(?:[:.](\d{2}))?\s*[/\-]\s*(\d{1,2})(?:[:.](\d{2}))?\s*$",
)


def parse_between(value: str | tuple[dt.time, dt.time]) -> tuple[dt.time, dt.time]:
    """A daily window: ``"2:00/18:30"``, ``"2.00-18.30"`` or ``"2-18:30"`` (end exclusive).

    A window whose end is before its start crosses midnight (``"22:00/02:00"``).
    """
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(t, dt.time) for t in value):
        start, end = value
    else:
        m = _BETWEEN.match(str(value))
        if not m:
            raise InvalidTimeSpec(
                f"invalid between window {value!r}: use '2:00/18:30', '2.00-18.30' or '2-18:30'"
            )
        h1, m1, h2, m2 = (int(x) if x else 0 for x in m.groups())
        if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59 or (h1 == 24 and m1) or (h2 == 24 and m2):
            raise InvalidTimeSpec(f"invalid between window {value!r}: hours 0-24, minutes 0-59")
        start = dt.time(h1 % 24, m1)
        end = dt.time(23, 59, 59, 999999) if h2 == 24 else dt.time(h2, m2)
    if start == end:
        raise InvalidTimeSpec(f"invalid between window {value!r}: start and end are equal")
    return start, end


def in_window(moment: dt.time, window: tuple[dt.time, dt.time]) -> bool:
    start, end = window
    if start < end:
        return start <= moment < end
    return moment >= start or moment < end


_WEEKDAY_NAMES = {"mo": 0, "tu": 1, "we": 2, "th": 3, "fr": 4, "sa": 5, "su": 6}


def parse_weekdays(values: object) -> tuple[int, ...]:
    """Weekdays as dateutil weekday objects (``MO``), integers 0-6 (Monday is 0) or names."""
    if values is None:
        return ()
    if isinstance(values, (int, str, weekday)):
        values = (values,)
    try:
        items = list(values)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidTimeSpec(f"invalid weekdays {values!r}") from None
    days: set[int] = set()
    for item in items:
        if isinstance(item, weekday):
            days.add(item.weekday)
        elif isinstance(item, bool):
            raise InvalidTimeSpec(f"invalid weekday {item!r}")
        elif isinstance(item, int) and 0 <= item <= 6:
            days.add(item)
        elif isinstance(item, str) and item.strip().lower()[:2] in _WEEKDAY_NAMES:
            days.add(_WEEKDAY_NAMES[item.strip().lower()[:2]])
        else:
            raise InvalidTimeSpec(
                f"invalid weekday {item!r}: use dateutil's MO..SU, integers 0 (Monday) to 6, "
                "or names"
            )
    if not days:
        raise InvalidTimeSpec(f"invalid weekdays {values!r}: empty")
    return tuple(sorted(days))
