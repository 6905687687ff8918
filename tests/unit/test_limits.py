"""The value rules of heretic_kombu.limits: what can be stored, read back and run."""

from __future__ import annotations

import datetime as dt

import pytest

from heretic_kombu import limits
from heretic_kombu.exceptions import HereticKombuError, InvalidValue

UTC = dt.timezone.utc


def test_moments_in_range_come_back_in_utc() -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    assert limits.moment(dt.datetime(2030, 1, 1, 12, tzinfo=plus_two), "eta") == dt.datetime(
        2030, 1, 1, 10, tzinfo=UTC
    )
    assert limits.moment(dt.datetime(2030, 1, 1), "eta").tzinfo is UTC  # naive is UTC


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(9999, 12, 31, 23, 30, tzinfo=dt.timezone(-dt.timedelta(hours=1))),
        dt.datetime(9999, 12, 31, tzinfo=UTC),
        dt.datetime(1, 1, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        dt.datetime.max,
        dt.datetime.min,
    ],
)
def test_moments_out_of_range_are_refused_with_their_name(value: dt.datetime) -> None:
    with pytest.raises(InvalidValue, match="expires .* is out of range") as info:
        limits.moment(value, "expires")
    assert isinstance(info.value, ValueError) and isinstance(info.value, HereticKombuError)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 10**400, 1e12 * 1e6])
def test_seconds_must_be_finite_and_keep_moments_in_range(value: float) -> None:
    with pytest.raises(InvalidValue, match="countdown"):
        limits.seconds(value, "countdown")


@pytest.mark.parametrize("value", ["10", None, True, [1]])
def test_seconds_must_be_numbers(value: object) -> None:
    with pytest.raises(InvalidValue, match="must be a number of seconds"):
        limits.seconds(value, "countdown")


def test_after_and_before_stay_in_range() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert limits.after(now, 60, "countdown") == now + dt.timedelta(minutes=1)
    assert limits.after(now, -60, "countdown") == now - dt.timedelta(minutes=1)
    with pytest.raises(InvalidValue, match="countdown"):
        limits.after(now, 1e11 * 3, "countdown")  # ~9,500 years ahead
    with pytest.raises(InvalidValue, match="reaches before"):
        limits.before(now, dt.timedelta(days=999_999_999), "since")


def test_integers_fit_the_table() -> None:
    assert limits.integer(2**31 - 1, "retries") == 2**31 - 1
    for value in (2**31, -(2**31) - 1, 10**100):
        with pytest.raises(InvalidValue, match="retries"):
            limits.integer(value, "retries")
    with pytest.raises(InvalidValue, match="whole number"):
        limits.integer(1.5, "retries")
    with pytest.raises(InvalidValue, match="priority"):
        limits.integer(256, "priority", minimum=0, maximum=255)


def test_text_holds_no_nul_anywhere() -> None:
    assert limits.text("tasks.add", "task name") == "tasks.add"
    with pytest.raises(InvalidValue, match="task name must not contain a NUL"):
        limits.text("tasks\x00add", "task name")
    with pytest.raises(InvalidValue, match="text"):
        limits.text(3, "task name")
    limits.no_nul({"a": [1, {"b": "c"}]}, "kwargs")
    for bad in ({"k\x00": 1}, [1, ["x\x00"]], {"a": {"b": ("\x00",)}}):
        with pytest.raises(InvalidValue, match="kwargs"):
            limits.no_nul(bad, "kwargs")
