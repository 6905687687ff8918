"""Celery's ``rate_limit`` task option: parsing ``"10/s"`` and a token bucket per task.

A rate limit is per worker instance, as in Celery: each worker lets at most that many
jobs of the task start per second, minute or hour, and holds the other messages of that
task (unclaimed, unacked) until a token is free. Jobs of other tasks are not slowed.

The bucket has Celery's shape (``TokenBucket(rate, capacity=1)``): it starts full,
holds one token, and refills at ``rate`` tokens per second, so ``"2/s"`` starts a job
at once and then one every half second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

#: Seconds per unit of Celery's rate strings.
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: Any) -> float | None:
    """Tokens per second for a Celery rate limit, or ``None`` for no limit.

    Accepts ``"10/s"``, ``"100/m"``, ``"1000/h"``, ``"0.5/s"``, a bare number or numeric
    string (per second, as Celery reads it), and ``None``/``""``/``0`` for no limit.

    Raises:
        ValueError: anything else (an unknown unit, a negative or non-finite number).
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"rate_limit {value!r}: expected a rate such as '10/s', '100/m', '1000/h'")
    if isinstance(value, (int, float)):
        count, per = float(value), 1.0
    elif isinstance(value, str):
        number, _, unit = value.strip().partition("/")
        unit = unit.strip() or "s"
        if unit not in _UNITS:
            raise ValueError(
                f"rate_limit {value!r}: unknown unit {unit!r}; use /s, /m or /h (e.g. '10/m')"
            )
        try:
            count = float(number)
        except ValueError:
            raise ValueError(
                f"rate_limit {value!r}: {number.strip()!r} is not a number;"
                " expected a rate such as '10/s', '100/m', '1000/h'"
            ) from None
        per = _UNITS[unit]
    else:
        raise ValueError(
            f"rate_limit {value!r}: expected a string such as '10/s' or a number per second"
        )
    if not math.isfinite(count) or count < 0:
        raise ValueError(f"rate_limit {value!r}: the count must be a finite number >= 0")
    if count == 0:
        return None  # Celery: a zero rate means no limit
    return count / per


class TokenBucket:
    """Tokens refill at ``rate`` per second up to ``capacity``; a job takes one to start.

    ``clock`` is injectable for tests; it defaults to :func:`time.monotonic`.
    """

    def __init__(
        self, rate: float, capacity: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity  # starts full, as Celery's bucket does
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = now

    def can_consume(self, tokens: float = 1.0) -> bool:
        """Take ``tokens`` if they are there; ``False`` (and take nothing) otherwise."""
        self._refill()
        if self._tokens + 1e-9 >= tokens:
            self._tokens = max(0.0, self._tokens - tokens)
            return True
        return False

    def expected_time(self, tokens: float = 1.0) -> float:
        """Seconds until ``tokens`` will be available (0 if they are now)."""
        self._refill()
        missing = tokens - self._tokens
        return max(0.0, missing / self.rate)
