"""The retry policy: attempt limits, exponential backoff and when the next run is due."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from heretic_kombu import retry

UTC = dt.timezone.utc
NOW = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)


# -- attempt limits ------------------------------------------------------------


@pytest.mark.parametrize(("max_retries", "max_attempts"), [(0, 1), (1, 2), (3, 4), (10, 11)])
def test_max_retries_allows_one_more_run(max_retries: int, max_attempts: int) -> None:
    assert retry.max_attempts_for(max_retries) == max_attempts
    assert retry.max_retries_for(max_attempts) == max_retries


def test_unlimited_retries_round_trip() -> None:
    attempts = retry.max_attempts_for(None)
    assert attempts == retry.UNLIMITED_ATTEMPTS
    assert attempts <= 2**31 - 1  # fits the int4 column
    assert retry.max_retries_for(attempts) is None


def test_huge_max_retries_is_capped_to_the_column() -> None:
    assert retry.max_attempts_for(10**12) == retry.UNLIMITED_ATTEMPTS


def test_negative_max_retries_still_allows_the_first_run() -> None:
    assert retry.max_attempts_for(-5) == 1


def test_max_retries_for_a_single_attempt_is_zero() -> None:
    assert retry.max_retries_for(1) == 0
    assert retry.max_retries_for(0) == 0


@pytest.mark.parametrize(
    ("retries", "max_retries", "exhausted"),
    [
        (0, 3, False),
        (2, 3, False),
        (3, 3, True),
        (4, 3, True),
        (0, 0, True),
        (0, None, False),
        (10**6, None, False),
    ],
)
def test_retries_exhausted(retries: int, max_retries: int | None, exhausted: bool) -> None:
    assert retry.retries_exhausted(retries, max_retries) is exhausted


# -- backoff --------------------------------------------------------------------


def test_backoff_doubles_from_the_factor_without_jitter() -> None:
    delays = [retry.backoff_delay(1, n, maximum=600, jitter=False) for n in range(6)]
    assert delays == [1, 2, 4, 8, 16, 32]


def test_backoff_uses_the_factor() -> None:
    delays = [retry.backoff_delay(3, n, maximum=600, jitter=False) for n in range(4)]
    assert delays == [3, 6, 12, 24]


def test_backoff_is_capped_at_the_maximum() -> None:
    assert retry.backoff_delay(1, 10, maximum=600, jitter=False) == 600
    assert retry.backoff_delay(1, 5, maximum=20, jitter=False) == 20
    assert retry.backoff_delay(1, 1000, maximum=60, jitter=False) == 60


def test_backoff_default_maximum_is_600_seconds() -> None:
    assert retry.backoff_delay(1, 50, jitter=False) == 600


def test_negative_retries_count_as_the_first_retry() -> None:
    assert retry.backoff_delay(2, -3, jitter=False) == 2


def test_jitter_stays_between_zero_and_the_capped_delay() -> None:
    rng = random.Random(20240601)
    for retries in range(15):
        cap = min(100.0, 2.0 * 2**retries)
        delays = [retry.backoff_delay(2, retries, maximum=100, rng=rng) for _ in range(50)]
        assert all(0 <= d <= cap for d in delays), (retries, cap, delays)
    # Jitter actually spreads the delays ("full jitter"), it does not return the cap.
    spread = {retry.backoff_delay(1, 10, maximum=100, rng=rng) for _ in range(20)}
    assert len(spread) > 1
    assert min(spread) < 100


def test_jitter_with_the_same_seed_is_reproducible() -> None:
    first = [retry.backoff_delay(1, n, rng=random.Random(7)) for n in range(5)]
    second = [retry.backoff_delay(1, n, rng=random.Random(7)) for n in range(5)]
    assert first == second


# -- next run -----------------------------------------------------------------------


def test_next_run_after_seconds() -> None:
    assert retry.next_run_at(NOW, 90) == NOW + dt.timedelta(seconds=90)
    assert retry.next_run_at(NOW, 0.5) == NOW + dt.timedelta(milliseconds=500)
    assert retry.next_run_at(NOW, 0) == NOW


def test_next_run_at_an_aware_datetime_is_that_moment() -> None:
    when = dt.datetime(2031, 1, 1, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    result = retry.next_run_at(NOW, when)
    assert result == when
    assert result.utcoffset() == dt.timedelta(hours=2)


def test_next_run_at_a_naive_datetime_is_taken_as_utc() -> None:
    result = retry.next_run_at(NOW, dt.datetime(2031, 1, 1, 8, 0))
    assert result == dt.datetime(2031, 1, 1, 8, 0, tzinfo=UTC)
    assert result.tzinfo is not None


def test_next_run_without_when_is_now() -> None:
    assert retry.next_run_at(NOW, None) == NOW
