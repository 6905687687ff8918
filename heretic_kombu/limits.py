"""What a value must be for heretic to store it, read it back, publish it and run it.

One rule per kind of value, written once and called where values enter (``.delay()``,
``apply_async()``, canvas, beat, a Celery client's message, a search filter), so that no
value is accepted at the door and then breaks a loop further in (DESIGN §4, invariant 9):

- moments (eta, expires, since/until) lie within what every database and Python itself
  can hold, in UTC: a date that is year 10000 in UTC cannot be read back;
- a number of seconds (countdown, expires in seconds, a duration) is finite and keeps
  the moment it leads to within that range;
- counters fit the table's ``integer`` columns;
- text bound for the table or a header holds no NUL (PostgreSQL's text cannot).

Every refusal is an :class:`~heretic_kombu.exceptions.InvalidValue`, a ``ValueError``
whose message names the value and what it may be.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

from .exceptions import InvalidValue

UTC = dt.timezone.utc
#: The earliest and latest moments accepted. A day's margin inside Python's own range
#: (years 1 to 9999), so that a moment in any time zone is still a datetime in UTC and
#: adding a lease or a backoff to it cannot overflow.
EARLIEST = dt.datetime(1, 1, 2, tzinfo=UTC)
LATEST = dt.datetime(9999, 12, 30, tzinfo=UTC)
#: The table's ``integer`` columns (attempts, max_attempts, priority...).
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def moment(value: dt.datetime, what: str) -> dt.datetime:
    """``value`` as an aware UTC datetime within [EARLIEST, LATEST]; naive means UTC."""
    if not isinstance(value, dt.datetime):
        raise InvalidValue(f"{what} must be a datetime, not {type(value).__name__}")
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    try:
        in_utc = aware.astimezone(UTC)
    except (OverflowError, ValueError):
        in_utc = None
    if in_utc is None or not EARLIEST <= in_utc <= LATEST:
        raise InvalidValue(
            f"{what} {value.isoformat()} is out of range: it must lie between "
            f"{EARLIEST.date()} and {LATEST.date()} in UTC"
        )
    return in_utc


def seconds(value: Any, what: str, *, minimum: float | None = None) -> float:
    """``value`` as a finite number of seconds that keeps ``now + value`` in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValue(f"{what} must be a number of seconds, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidValue(f"{what} ({value!r}) is not a finite number of seconds")
    if minimum is not None and number < minimum:
        raise InvalidValue(f"{what} ({value!r} s) must be at least {minimum:g} seconds")
    span = (LATEST - EARLIEST).total_seconds()
    if abs(number) > span:
        raise InvalidValue(
            f"{what} ({number:g} s) is out of range: a moment it leads to must lie "
            f"between {EARLIEST.date()} and {LATEST.date()}"
        )
    return number


def after(now: dt.datetime, delay: float, what: str) -> dt.datetime:
    """``now`` plus ``delay`` seconds, refused if that leaves the accepted range."""
    checked = seconds(delay, what)
    try:
        return moment(now + dt.timedelta(seconds=checked), what)
    except OverflowError:
        raise InvalidValue(f"{what} ({delay!r} s) is out of range") from None


def before(now: dt.datetime, span: dt.timedelta, what: str) -> dt.datetime:
    """``now`` minus ``span``, refused if that leaves the accepted range."""
    try:
        return moment(now - span, what)
    except OverflowError:
        raise InvalidValue(f"{what} reaches before {EARLIEST.date()}") from None


def integer(value: Any, what: str, *, minimum: int = INT_MIN, maximum: int = INT_MAX) -> int:
    """``value`` as an int within [minimum, maximum] (by default, the table's integer)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{what} must be a whole number, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidValue(f"{what} ({value}) is out of range: it must be {minimum}..{maximum}")
    return value


def text(value: Any, what: str) -> str:
    """``value`` as text the table and message headers can hold (no NUL)."""
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be text, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidValue(f"{what} must not contain a NUL character")
    return value


def no_nul(value: Any, what: str) -> None:
    """Refuse a NUL in any string inside a JSON-like ``value`` (keys included)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            text(item, what)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


__all__ = [
    "EARLIEST",
    "INT_MAX",
    "INT_MIN",
    "LATEST",
    "after",
    "before",
    "integer",
    "moment",
    "no_nul",
    "seconds",
    "text",
]
