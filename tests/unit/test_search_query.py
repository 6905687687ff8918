"""Search filters are checked before any SQL: paths, operators, durations, cursors."""

from __future__ import annotations

import datetime as dt

import pytest

from heretic_kombu.search import (
    JobQuery,
    Where,
    decode_cursor,
    encode_cursor,
    moment,
    parse_duration,
)


@pytest.mark.parametrize(
    ("text", "path", "op", "value"),
    [
        ("kwargs.to=bob@example.com", ("kwargs", "to"), "=", "bob@example.com"),
        ("args.0>100", ("args", "0"), ">", 100),
        ("kwargs.n<=2.5", ("kwargs", "n"), "<=", 2.5),
        ('kwargs.n="3"', ("kwargs", "n"), "=", "3"),
        ("kwargs.flag!=true", ("kwargs", "flag"), "!=", True),
        ("kwargs.user.id=7", ("kwargs", "user", "id"), "=", 7),
        ("kwargs.x=null", ("kwargs", "x"), "=", None),
    ],
)
def test_where_parses_the_cli_form(text, path, op, value):
    where = Where.parse(text)
    assert (where.path, where.op, where.value) == (path, op, value)


@pytest.mark.parametrize(
    "text",
    [
        "payload.x=1",  # only args/kwargs
        "kwargs=1",  # a key is needed
        "kwargs.to;DROP TABLE heretic_jobs=1",
        "kwargs.a'b=1",
        "kwargs.a LIKE 1",
        "kwargs.a",
        "",
    ],
)
def test_hostile_or_malformed_conditions_are_refused(text):
    with pytest.raises(ValueError):
        Where.parse(text)


def test_ordering_operators_need_a_scalar():
    with pytest.raises(ValueError, match="compares numbers or strings"):
        Where.make("kwargs.tags", ">", ["a"])
    with pytest.raises(ValueError, match="NaN"):
        Where.make("kwargs.x", "=", float("nan"))


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("1.5h", 5400)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["2", "h", "-2h", "2 hours", "2y"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


def test_moments_from_durations_and_dates():
    now = dt.datetime.now(dt.timezone.utc)
    assert abs((now - moment("2h")) - dt.timedelta(hours=2)) < dt.timedelta(seconds=5)
    assert moment("2026-01-02") == dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError, match="bad time"):
        moment("yesterday")
    with pytest.raises(ValueError, match="timezone-aware"):
        moment(dt.datetime(2026, 1, 2))


def test_cursors_round_trip_and_foreign_ones_are_refused():
    assert decode_cursor(encode_cursor(41, 41)) == (41, 41)
    stamp = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    assert decode_cursor(encode_cursor(stamp, 3)) == (stamp.isoformat(), 3)
    for bad in ["nonsense", "W10", "eyJhIjogMX0"]:
        with pytest.raises(ValueError, match="bad cursor"):
            decode_cursor(bad)
    with pytest.raises(ValueError, match="bad cursor"):
        JobQuery(after="garbage")


def test_query_validation():
    with pytest.raises(ValueError, match="unknown status"):
        JobQuery.build(status="done")
    with pytest.raises(ValueError, match="bad order"):
        JobQuery(order_by="task_name; --")
    with pytest.raises(ValueError, match="limit"):
        JobQuery(limit=0)
    query = JobQuery.build(status="failed", where=["kwargs.to=bob", ("args.0", ">", 3)], since="1h")
    assert query.statuses == ("failed",) and len(query.where) == 2 and query.since is not None


@pytest.mark.parametrize(
    "fields",
    [
        {"since": "999999999w"},
        {"since": dt.timedelta(days=999_999_999)},
        {"until": "9999-12-31T23:30-01:00"},
        {"until": dt.datetime(9999, 12, 31, 23, 30, tzinfo=dt.timezone(-dt.timedelta(hours=1)))},
        {"where": ["kwargs.n>1e400"]},
        {"where": [("kwargs.n", "<", float("-inf"))]},
        {"where": [("kwargs.to", "=", "a\x00b")]},
        {"task": "tasks.\x00add"},
        {"queue": "q\x00"},
        {"error_contains": "\x00"},
        {"payload": {"kwargs": {"to\x00": "bob"}}},
        {"root_id": "not-a-task-id"},
        {"group_id": "1; DROP TABLE heretic_jobs"},
    ],
)
def test_hostile_filters_are_refused_before_any_sql(fields):
    with pytest.raises(ValueError):
        JobQuery.build(**fields)
