"""The retry policy as pure functions: when the next attempt runs, and whether it may.

Kept free of I/O so that the worker, eager mode and the tests all apply the same rules,
which are Celery's: ``max_retries=3`` allows up to four runs, ``None`` retries forever,
and ``retry_backoff`` doubles the delay from ``retry_backoff`` seconds (``True`` = 1),
capped at ``retry_backoff_max``, with "full jitter" (a random delay up to that value).
"""

from __future__ import annotations

import datetime as dt
import random

#: max_attempts stored for a task that retries forever (max_retries=None): int4's maximum.
UNLIMITED_ATTEMPTS = 2**31 - 1


def max_attempts_for(max_retries: int | None) -> int:
    """The row's ``max_attempts`` for a task allowed ``max_retries`` retries."""
    if max_retries is None:
        return UNLIMITED_ATTEMPTS
    return min(max(int(max_retries), 0) + 1, UNLIMITED_ATTEMPTS)


def max_retries_for(max_attempts: int) -> int | None:
    """Inverse of :func:`max_attempts_for`."""
    return None if max_attempts >= UNLIMITED_ATTEMPTS else max(max_attempts - 1, 0)


def retries_exhausted(retries: int, max_retries: int | None) -> bool:
    """True when a job that has been retried ``retries`` times may not retry again."""
    return max_retries is not None and retries >= max_retries


def backoff_delay(
    factor: float,
    retries: int,
    maximum: float = 600,
    jitter: bool = True,
    rng: random.Random | None = None,
) -> float:
    """Seconds before the next attempt under exponential backoff (Celery's formula)."""
    delay = min(maximum, factor * (1 << max(retries, 0)))
    if jitter:
        delay = float((rng or random).uniform(0, delay))
    return max(0.0, delay)


def next_run_at(now: dt.datetime, when: float | dt.datetime | None) -> dt.datetime:
    """The moment the next attempt is due: ``when`` seconds after ``now``, or at ``when``."""
    if when is None:
        return now
    if isinstance(when, dt.datetime):
        return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    return now + dt.timedelta(seconds=float(when))
