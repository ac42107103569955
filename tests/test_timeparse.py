"""One time parser for the whole product: durations, run times, windows, weekdays."""

from __future__ import annotations

import datetime as dt

import pytest
from dateutil.relativedelta import FR, MO, relativedelta

from sqla_pq.errors import InvalidTimeSpec
from sqla_pq.timeparse import (
    in_window,
    parse_between,
    parse_duration,
    parse_interval,
    parse_moment,
    parse_weekdays,
    parse_when,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("5m", 300), ("1h", 3600), ("2d", 172800), ("1w", 604800), ("250ms", 0.25),
     ("1h30m", 5400), ("1.5h", 5400), ("90", 90), (" 2 m ", 120), ("1 hour", 3600), (42, 42),
     (0.5, 0.5), (dt.timedelta(minutes=2), 120)],
)
def test_durations_parse_to_the_same_seconds_everywhere(text, seconds):
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "abc", "5x", "1h foo", "m5", True, None, [], float("nan")])
def test_malformed_durations_raise_naming_the_value(bad):
    with pytest.raises(InvalidTimeSpec) as info:
        parse_duration(bad)
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_run_at_is_absolute_for_datetimes_and_a_delay_otherwise():
    moment = dt.datetime(2030, 1, 1, 9, 0, tzinfo=dt.UTC)
    assert parse_when(moment).at == moment
    assert parse_when("5m").delay == 300
    assert parse_when(dt.timedelta(seconds=3)).delay == 3
    naive = parse_when(dt.datetime(2030, 1, 1, 9, 0)).at
    assert naive.tzinfo is not None and naive.utcoffset() == dt.timedelta(0), "naive means UTC"
    assert parse_when(None).is_now


def test_moments_accept_now_and_iso_8601():
    assert parse_moment("2020-01-01").year == 2020
    assert parse_moment("2020-01-01T9:10").hour == 9
    assert abs((parse_moment("now") - dt.datetime.now(dt.UTC)).total_seconds()) < 5
    with pytest.raises(InvalidTimeSpec):
        parse_moment("next tuesday-ish")


@pytest.mark.parametrize("text", ["2:00/18:30", "2.00-18.30", "2-18:30"])
def test_the_three_between_forms_of_django_pq_agree(text):
    assert parse_between(text) == (dt.time(2, 0), dt.time(18, 30))


def test_a_window_can_cross_midnight():
    window = parse_between("22:00/02:00")
    assert in_window(dt.time(23, 30), window)
    assert in_window(dt.time(1, 0), window)
    assert not in_window(dt.time(12, 0), window)


@pytest.mark.parametrize("bad", ["25:00/26:00", "2:00", "abc", "10:00/10:00", "2:61/3:00"])
def test_bad_windows_raise(bad):
    with pytest.raises(InvalidTimeSpec):
        parse_between(bad)


def test_weekdays_take_dateutil_objects_integers_and_names():
    assert parse_weekdays((MO, FR)) == (0, 4)
    assert parse_weekdays((0, 1, 2)) == (0, 1, 2)
    assert parse_weekdays(["sat", "Sunday"]) == (5, 6)
    for bad in ([7], [-1], ["xx"], [True], []):
        with pytest.raises(InvalidTimeSpec):
            parse_weekdays(bad)


def test_intervals_take_seconds_timedelta_and_relativedelta():
    assert parse_interval(60) == dt.timedelta(seconds=60)
    monthly_last_day = relativedelta(months=1, days=-1)
    assert parse_interval(monthly_last_day) is monthly_last_day
    for bad in (0, -5, relativedelta(days=-1)):
        with pytest.raises(InvalidTimeSpec):
            parse_interval(bad)
