"""Schedules: Celery's crontab and schedule, parsed strictly and answering "when next?"."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import heretic_kombu
from heretic_kombu.schedules import crontab, maybe_schedule, schedule, solar

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    """An aware UTC datetime from ``YYYY-MM-DD HH:MM[:SS]``."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- the import line ----------------------------------------------------------------


def test_celery_import_line_works_with_heretic_names() -> None:
    from heretic_kombu.schedules import crontab as from_module

    assert from_module is heretic_kombu.crontab is crontab
    assert heretic_kombu.schedule is schedule


# -- parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "spec", "expected"),
    [
        ("minute", "*/15", {0, 15, 30, 45}),
        ("minute", "0-59/20", {0, 20, 40}),
        ("minute", "5/15", {5, 20, 35, 50}),
        ("minute", "1,2, 3", {1, 2, 3}),
        ("minute", 7, {7}),
        ("minute", {0, 30}, {0, 30}),
        ("minute", range(0, 60, 30), {0, 30}),
        ("hour", "1-5", {1, 2, 3, 4, 5}),
        ("hour", "22-2", {22, 23, 0, 1, 2}),
        ("hour", "*", set(range(24))),
        ("day_of_week", "mon-fri", {1, 2, 3, 4, 5}),
        ("day_of_week", "sat,sun", {6, 0}),
        ("day_of_week", "SUN", {0}),
        ("day_of_week", "fri-mon", {5, 6, 0, 1}),
        ("day_of_week", 7, {0}),
        ("day_of_week", "*", set(range(7))),
        ("day_of_month", "1,15", {1, 15}),
        ("day_of_month", "*/10", {1, 11, 21, 31}),
        ("month_of_year", "jan,jul", {1, 7}),
        ("month_of_year", "*/3", {1, 4, 7, 10}),
    ],
)
def test_fields_parse_like_celery(field: str, spec: object, expected: set[int]) -> None:
    assert getattr(crontab(**{field: spec}), field) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"minute": "60"}, "minute: 60 is out of range 0-59"),
        ({"minute": 60}, "minute: 60 is out of range 0-59"),
        ({"hour": "24"}, "hour: 24 is out of range 0-23"),
        ({"hour": "-1"}, "hour: cannot parse"),
        ({"minute": "*/0"}, "minute: step must be at least 1"),
        ({"minute": "abc"}, "minute: 'abc' in 'abc' is not a number or a known name"),
        ({"minute": "5-"}, "minute: cannot parse '5-'"),
        ({"minute": ""}, "minute: cannot parse ''"),
        ({"minute": "1,,2"}, "minute: cannot parse ''"),
        ({"minute": None}, "minute: None is not a string, integer or set of integers"),
        ({"minute": 1.5}, "minute: 1.5 is not a string"),
        ({"minute": True}, "minute: True is not a valid value"),
        ({"minute": {1, "a"}}, "minute: 'a' in"),
        ({"minute": set()}, "minute: [] matches nothing"),
        ({"day_of_week": "funday"}, "day_of_week: 'funday'"),
        ({"day_of_month": "0"}, "day_of_month: 0 is out of range 1-31"),
        ({"month_of_year": "13"}, "month_of_year: 13 is out of range 1-12"),
        ({"month_of_year": "mon"}, "month_of_year: 'mon'"),
        ({"day_of_month": 30, "month_of_year": 2}, "never occurs"),
        ({"day_of_month": "31", "month_of_year": "4,6,9,11"}, "never occurs"),
        ({"tz": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'"),
    ],
)
def test_bad_crontab_input_raises_a_clear_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="crontab") as caught:
        crontab(**kwargs)
    assert message in str(caught.value)


def test_description_is_canonical_and_equal_specs_are_equal() -> None:
    assert crontab(minute="*/15").describe() == crontab(minute="*/15").describe()
    assert crontab(minute=[30, 0]) == crontab(minute={0, 30})
    assert crontab(minute="*/15") != crontab(minute="*/10")
    assert "minute='*/15'" in repr(crontab(minute="*/15"))
    gen = crontab(minute=(m for m in (0, 30)))  # a generator is read once, kept as a list
    assert gen.minute == {0, 30} and "minute=[0, 30]" in gen.describe()


# -- crontab: next due time ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "last", "expected"),
    [
        # every quarter hour, across the hour
        (crontab(minute="*/15"), "2024-05-01 12:50", "2024-05-01 13:00"),
        # strictly after the last run: a run on a match goes to the next one
        (crontab(minute="*/15"), "2024-05-01 13:00", "2024-05-01 13:15"),
        (crontab(minute="*/15"), "2024-05-01 13:00:59", "2024-05-01 13:15"),
        (crontab(), "2024-05-01 13:00:30", "2024-05-01 13:01"),
        # across the day
        (crontab(minute=0, hour=0), "2024-05-01 23:59", "2024-05-02 00:00"),
        (crontab(minute=30, hour="9-17"), "2024-05-01 17:30", "2024-05-02 09:30"),
        # across the month, with 30- and 31-day months
        (crontab(minute=0, hour=0, day_of_month=31), "2024-04-15 00:00", "2024-05-31 00:00"),
        (crontab(minute=0, hour=6, day_of_month=1), "2024-01-31 23:59", "2024-02-01 06:00"),
        # across the year
        (crontab(0, 0, day_of_month=1, month_of_year=1), "2024-12-31 23:59", "2025-01-01 00:00"),
        # Feb 29: three years ahead
        (crontab(0, 0, day_of_month=29, month_of_year=2), "2024-03-01 00:00", "2028-02-29 00:00"),
        # weekdays only (2024-05-03 is a Friday)
        (crontab(minute=0, hour=9, day_of_week="mon-fri"), "2024-05-03 09:00", "2024-05-06 09:00"),
        (crontab(minute=0, hour=9, day_of_week="sun"), "2024-05-03 09:00", "2024-05-05 09:00"),
        # day_of_week AND day_of_month, as in Celery: the first Monday of a month
        (
            crontab(minute=0, hour=8, day_of_week="mon", day_of_month="1-7"),
            "2024-05-07 00:00",
            "2024-06-03 08:00",
        ),
    ],
)
def test_crontab_next_due(cron: crontab, last: str, expected: str) -> None:
    assert cron.next_due(at(last), at("2000-01-01 00:00")) == at(expected)


def test_crontab_never_run_counts_from_now() -> None:
    assert crontab(minute="*/15").next_due(None, at("2024-05-01 12:07:12")) == at(
        "2024-05-01 12:15"
    )


def test_crontab_overdue_is_due_once_at_its_first_missed_time() -> None:
    # Last ran three hours ago: due at the first missed time (beat fires it once, now).
    cron = crontab(minute=0)
    assert cron.next_due(at("2024-05-01 09:00"), at("2024-05-01 12:30")) == at("2024-05-01 10:00")


def test_naive_datetimes_are_taken_as_utc() -> None:
    naive = dt.datetime(2024, 5, 1, 12, 50)
    assert crontab(minute=0).next_due(naive, naive) == at("2024-05-01 13:00")


def test_crontab_in_a_timezone_follows_its_wall_clock() -> None:
    paris = crontab(minute=0, hour=7, tz="Europe/Paris")
    assert paris.next_due(at("2024-06-01 00:00"), at("2024-06-01 00:00")) == at("2024-06-01 05:00")
    assert paris.next_due(at("2024-01-10 00:00"), at("2024-01-10 00:00")) == at("2024-01-10 06:00")
    assert crontab(minute=0, hour=7).in_timezone("Europe/Paris") == paris


def test_crontab_skips_a_wall_clock_time_that_dst_removes() -> None:
    # 2024-03-31 02:30 does not exist in Paris (clocks go 02:00 -> 03:00).
    cron = crontab(minute=30, hour=2, tz="Europe/Paris")
    assert cron.next_due(at("2024-03-30 12:00"), at("2024-03-30 12:00")) == at("2024-04-01 00:30")


def test_crontab_fires_a_repeated_dst_hour_once() -> None:
    # 2024-10-27 02:30 happens twice in Paris (00:30 and 01:30 UTC): due at the first only.
    cron = crontab(minute=30, hour=2, tz="Europe/Paris")
    first = cron.next_due(at("2024-10-26 12:00"), at("2024-10-26 12:00"))
    assert first == at("2024-10-27 00:30")
    assert cron.next_due(first, first) == at("2024-10-28 01:30")


def _brute_force_next(cron: crontab, after: dt.datetime) -> dt.datetime:
    moment = after.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    for _ in range(8 * 24 * 60):
        if (
            moment.minute in cron.minute
            and moment.hour in cron.hour
            and moment.day in cron.day_of_month
            and moment.month in cron.month_of_year
            and (moment.weekday() + 1) % 7 in cron.day_of_week
        ):
            return moment
        moment += dt.timedelta(minutes=1)
    raise AssertionError("no match within 8 days")


@settings(max_examples=60, deadline=None)
@given(
    minutes=st.sets(st.integers(0, 59), min_size=1, max_size=4),
    hours=st.sets(st.integers(0, 23), min_size=1, max_size=4),
    weekdays=st.sets(st.integers(0, 6), min_size=1),
    after=st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2099, 12, 1)),
)
def test_crontab_agrees_with_checking_every_minute(
    minutes: set[int], hours: set[int], weekdays: set[int], after: dt.datetime
) -> None:
    cron = crontab(minute=minutes, hour=hours, day_of_week=weekdays)
    start = after.replace(tzinfo=UTC)
    assert cron.next_due(start, start) == _brute_force_next(cron, start)


def test_is_due_and_remaining_estimate_answer_as_celery() -> None:
    cron = crontab(minute=0)
    due, wait = cron.is_due(at("2024-05-01 11:00"), now=at("2024-05-01 12:00:10"))
    assert due and wait == 3590  # after running now, the next is at 13:00
    due, wait = cron.is_due(at("2024-05-01 12:00"), now=at("2024-05-01 12:59"))
    assert not due and wait == 60
    assert cron.remaining_estimate(at("2024-05-01 12:00"), at("2024-05-01 12:59")) == (
        dt.timedelta(minutes=1)
    )


def test_celery_parses_the_same_sets_when_installed() -> None:
    celery_schedules = pytest.importorskip("celery.schedules")
    for spec in ("*/15", "1-5", "0-59/20", "5,10,15", "*"):
        assert crontab(minute=spec).minute == celery_schedules.crontab(minute=spec).minute
    for spec in ("mon-fri", "sat,sun", "*", "1-3"):
        ours = crontab(day_of_week=spec).day_of_week
        assert ours == celery_schedules.crontab(day_of_week=spec).day_of_week


# -- schedule (intervals) -----------------------------------------------------------


def test_schedule_takes_a_timedelta_or_seconds() -> None:
    assert schedule(dt.timedelta(seconds=30)) == schedule(30) == schedule(30.0)
    assert schedule(1.5).run_every == dt.timedelta(seconds=1.5)
    assert schedule(30).describe() == "every 30 seconds"


def test_schedule_next_due_is_one_period_after_the_last_run_or_now() -> None:
    every = schedule(dt.timedelta(minutes=10))
    assert every.next_due(at("2024-05-01 12:00"), at("2024-05-01 12:03")) == at("2024-05-01 12:10")
    assert every.next_due(None, at("2024-05-01 12:03")) == at("2024-05-01 12:13")
    # across midnight and a month end
    assert every.next_due(at("2024-01-31 23:55"), at("2024-01-31 23:56")) == at("2024-02-01 00:05")
    # overdue by many periods: due at the first missed one (beat fires it once)
    assert every.next_due(at("2024-05-01 09:00"), at("2024-05-01 12:03")) == at("2024-05-01 09:10")


@pytest.mark.parametrize("bad", [0, -1, dt.timedelta(0), "10", None, True])
def test_bad_schedule_input_raises_a_clear_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="schedule: run_every must be"):
        schedule(bad)  # type: ignore[arg-type]


def test_relative_schedules_are_refused_rather_than_ignored() -> None:
    with pytest.raises(ValueError, match="relative=True is not supported"):
        schedule(10, relative=True)


def test_beat_schedule_values_become_schedules_as_in_celery() -> None:
    assert maybe_schedule(10) == schedule(10)
    assert maybe_schedule(dt.timedelta(seconds=10)) == schedule(10)
    cron = crontab(minute=1)
    assert maybe_schedule(cron) is cron
    with pytest.raises(ValueError, match="a schedule must be a crontab"):
        maybe_schedule("*/5 * * * *")


def test_solar_says_it_is_not_implemented() -> None:
    with pytest.raises(NotImplementedError, match="solar"):
        solar("sunrise", 48.8, 2.3)
