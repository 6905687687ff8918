"""What a value must be for heretic to store it, read it back, publish it and run it.

One rule per kind of value, written once and called where values enter (``.delay()``,
``apply_async()``, canvas, beat, a Celery client's message, a search filter), so that no
value is accepted at the door and then breaks a loop further in (DESIGN §4, invariant 9):

- moments (eta, expires, since/until) lie within what every database and Python itself
  can hold, in UTC: a date that is year 10000 in UTC cannot be read back;
- a number of seconds (countdown, expires in seconds, a duration) is finite and keeps
  the moment it leads to within that range;
- counters fit the table's ``integer`` columns;
- text bound for the table or a header holds no NUL (PostgreSQL's text cannot); a queue
  name or routing key is an AMQP short string (at most 255 bytes of UTF-8);
- a priority is one AMQP octet (0..255), and no more than the queue's
  ``queue_max_priority`` when it is set;
- a message's body is no larger than the broker accepts (``max_message_size``).

:func:`call` applies them to the options of one call (``apply_async``, ``send_task``,
a signature's options, a beat entry's), :func:`message_size` to its encoded arguments;
:mod:`heretic_kombu.protocol` applies the same rules to a received message's headers.

Every refusal is an :class:`~heretic_kombu.exceptions.InvalidValue`, a ``ValueError``
whose message names the value and what it may be.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid
from collections.abc import Iterable, Mapping
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
#: The table's ``bigint`` columns (the row id).
BIGINT_MAX = 2**63 - 1
#: A message's ``retries``: the claim adds one for the attempt it starts, and the sum
#: must still fit ``attempts``.
RETRIES_MAX = INT_MAX - 1
#: AMQP short strings (queue names, exchange names, routing keys): bytes of UTF-8.
SHORT_STRING_MAX = 255
#: AMQP's ``priority`` property is one octet.
PRIORITY_MAX = 255
#: RabbitMQ's default ``max_message_size`` (128 MiB): the default of the setting.
MAX_MESSAGE_SIZE = 134_217_728


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


def moment_text(value: Any, what: str) -> dt.datetime:
    """An ISO 8601 string (as Celery's headers carry eta and expires) or a datetime, as
    :func:`moment` returns it."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise InvalidValue(f"{what} is not an ISO 8601 datetime: {value!r}") from None
    return moment(value, what)


def when(now: dt.datetime, value: Any, what: str) -> dt.datetime:
    """The moment ``value`` names: a datetime (or ISO string), or seconds after ``now``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return after(now, value, what)
    if not isinstance(value, (dt.datetime, str)):
        raise InvalidValue(
            f"{what} must be a datetime or a number of seconds, not {type(value).__name__}"
        )
    return moment_text(value, what)


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


def positive_seconds(value: Any, what: str) -> float:
    """A finite number of seconds above zero (a time limit)."""
    number = seconds(value, what)
    if not number > 0:
        raise InvalidValue(f"{what} ({value!r}) must be positive seconds (a number > 0)")
    return number


def text(value: Any, what: str) -> str:
    """``value`` as text the table and message headers can hold (no NUL)."""
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be text, not {type(value).__name__}")
    if "\x00" in value:
        raise InvalidValue(f"{what} must not contain a NUL character")
    return value


def name(value: Any, what: str) -> str:
    """A name (task, header value): non-empty text without NUL."""
    if not text(value, what):
        raise InvalidValue(f"{what} must not be empty")
    return value  # type: ignore[no-any-return]


def short_string(value: Any, what: str) -> str:
    """A queue name, exchange or routing key: a name of at most 255 bytes of UTF-8."""
    name(value, what)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > SHORT_STRING_MAX:
        raise InvalidValue(
            f"{what} is {size} bytes long: AMQP names hold at most {SHORT_STRING_MAX} bytes"
        )
    return value  # type: ignore[no-any-return]


def task_id(value: Any, what: str = "task id") -> str:
    """A task id as the table's ``uuid`` column holds it: a canonical UUID string."""
    if not isinstance(value, str):
        raise InvalidValue(f"{what} must be a UUID string, not {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidValue(f"{what} must be a UUID string, got {value!r}") from None


def priority(value: Any, what: str = "priority", *, maximum: int | None = None) -> int:
    """A message priority: 0..255 (one AMQP octet), or 0..``maximum`` (the queues'
    ``queue_max_priority``) when it is set."""
    top = PRIORITY_MAX if maximum is None else min(maximum, PRIORITY_MAX)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{what} must be a whole number, not {type(value).__name__}")
    if not 0 <= value <= top:
        where = (
            "AMQP's priority is one octet"
            if maximum is None
            else f"the queues' queue_max_priority is {maximum}"
        )
        raise InvalidValue(f"{what} ({value}) is out of range: it must be 0..{top} ({where})")
    return value


def message_size(parts: Iterable[str | None], maximum: int) -> None:
    """Refuse a message whose body (the encoded ``parts``: arguments, workflow) would be
    larger than ``maximum`` bytes, the broker's limit (``max_message_size``)."""
    texts = [part for part in parts if part]
    chars = sum(len(part) for part in texts)
    if chars * 4 <= maximum:  # UTF-8 takes at most 4 bytes a character: no need to count
        return
    size = chars if chars > maximum else sum(len(p.encode("utf-8", "surrogatepass")) for p in texts)
    if size > maximum:
        raise InvalidValue(
            f"the message would be {size} bytes or more: the broker accepts at most {maximum}"
            " bytes (max_message_size, HERETIC_MAX_MESSAGE_SIZE; RabbitMQ's default is"
            f" {MAX_MESSAGE_SIZE}); store large data elsewhere and pass a reference"
        )


@dataclasses.dataclass(frozen=True)
class Call:
    """The options of one call, checked: when it runs, when it expires, its priority
    and its (hard, soft) time limits."""

    run_at: dt.datetime
    expires_at: dt.datetime | None
    priority: int | None
    time_limits: tuple[float | None, float | None]


#: Option names of a call that name AMQP short strings.
_SHORT_STRINGS = ("queue", "routing_key", "exchange")


def call(options: Mapping[str, Any], *, now: dt.datetime, max_priority: int | None) -> Call:
    """Check the options of one call (``apply_async``, ``send_task``, a signature's or
    a beat entry's options) and return what they resolve to.

    ``eta`` wins over ``countdown`` (as in :meth:`Heretic.build_job`); ``expires`` is
    a datetime or seconds after ``now``. Options that are absent or ``None`` pass.
    """
    eta, countdown = options.get("eta"), options.get("countdown")
    run_at = now
    if countdown is not None:
        run_at = after(now, countdown, "countdown")
    if eta is not None:
        run_at = moment_text(eta, "eta")
    expires = options.get("expires")
    expires_at = when(now, expires, "expires") if expires is not None else None
    chosen = options.get("priority")
    if chosen is not None:
        priority(chosen, maximum=max_priority)
    for key in _SHORT_STRINGS:
        if options.get(key) is not None:
            short_string(options[key], key)
    if options.get("task_id") is not None:
        task_id(options["task_id"])
    if options.get("max_attempts") is not None:
        integer(options["max_attempts"], "max_attempts", minimum=1)
    if options.get("max_retries") is not None:
        integer(options["max_retries"], "max_retries", minimum=0, maximum=INT_MAX - 1)
    hard, soft = options.get("time_limit"), options.get("soft_time_limit")
    return Call(
        run_at=run_at,
        expires_at=expires_at,
        priority=chosen,
        time_limits=(
            positive_seconds(hard, "time_limit") if hard is not None else None,
            positive_seconds(soft, "soft_time_limit") if soft is not None else None,
        ),
    )


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
    "BIGINT_MAX",
    "EARLIEST",
    "INT_MAX",
    "INT_MIN",
    "LATEST",
    "MAX_MESSAGE_SIZE",
    "PRIORITY_MAX",
    "RETRIES_MAX",
    "SHORT_STRING_MAX",
    "Call",
    "after",
    "before",
    "call",
    "integer",
    "message_size",
    "moment",
    "moment_text",
    "name",
    "no_nul",
    "positive_seconds",
    "priority",
    "seconds",
    "short_string",
    "task_id",
    "text",
    "when",
]
