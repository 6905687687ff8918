"""Celery's rate_limit: the "10/s" parser and the per-task token bucket."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from heretic_kombu import Heretic
from heretic_kombu.config import Settings
from heretic_kombu.exceptions import ConfigurationError
from heretic_kombu.ratelimit import TokenBucket, parse_rate


@pytest.mark.parametrize(
    ("value", "per_second"),
    [
        ("10/s", 10.0),
        ("100/m", 100 / 60),
        ("1000/h", 1000 / 3600),
        ("0.5/s", 0.5),
        (" 3 / m ", 3 / 60),
        ("7", 7.0),  # Celery: no unit means per second
        (4, 4.0),
        (2.5, 2.5),
    ],
)
def test_celery_rate_strings_parse_to_tokens_per_second(value, per_second):
    assert math.isclose(parse_rate(value), per_second)


@pytest.mark.parametrize("value", [None, "", 0, "0", "0/m"])
def test_no_rate_or_zero_means_no_limit(value):
    assert parse_rate(value) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10/d", "unknown unit 'd'"),
        ("ten/s", "'ten' is not a number"),
        ("/s", "'' is not a number"),
        ("-1/s", "finite number >= 0"),
        ("inf/s", "finite number >= 0"),
        ("nan", "finite number >= 0"),
        (True, "expected a rate"),
        ([10], "expected a string"),
    ],
)
def test_bad_rates_raise_a_clear_value_error(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_rate(value)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_starts_full_holds_one_token_and_refills_at_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(2.0, clock=clock)  # "2/s"
    assert bucket.can_consume()  # the first job starts at once
    assert not bucket.can_consume()  # capacity 1: no burst
    assert math.isclose(bucket.expected_time(), 0.5)
    clock.now += 0.25
    assert not bucket.can_consume()
    assert math.isclose(bucket.expected_time(), 0.25)
    clock.now += 0.25
    assert bucket.can_consume()
    clock.now += 10  # idle for long: still only one token saved up
    assert bucket.can_consume()
    assert not bucket.can_consume()


def test_bucket_paces_a_backlog_at_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(2.0, clock=clock)
    started = []
    while len(started) < 6:
        if bucket.can_consume():
            started.append(clock.now)
        else:
            clock.now += bucket.expected_time()
    assert math.isclose(started[-1] - started[0], 2.5)


def test_bucket_refuses_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(1, capacity=0)


def test_a_bad_rate_limit_fails_at_decoration_time(make_app: Callable[..., Heretic]):
    app = make_app()
    with pytest.raises(ValueError, match=r"task 'slowly': rate_limit '10/fortnight'"):

        @app.task(name="slowly", rate_limit="10/fortnight")
        def slowly():
            return None

    @app.task(name="fine", rate_limit="10/m")
    def fine():
        return None

    assert app.tasks["fine"].rate_limit == "10/m"


def test_default_rate_limit_setting_uses_celerys_key():
    assert Settings.build({"task_default_rate_limit": "5/m"}, env={}).default_rate_limit == "5/m"
    with pytest.raises(ConfigurationError, match="HERETIC_DEFAULT_RATE_LIMIT"):
        Settings.build({}, env={"HERETIC_DEFAULT_RATE_LIMIT": "5/week"})
