"""What a job search asks for: filters, order and cursor, checked before any SQL is built.

:class:`JobQuery` is the one description of a search shared by the Python API
(``app.jobs.search``), the CLI (``heretic jobs list``) and the dashboard; the store
turns it into SQL with bound parameters only. Everything a user types is validated
here: a JSON path is ``args``/``kwargs`` followed by keys or indexes, an operator is one
of :data:`OPERATORS`, a duration is ``30s``/``15m``/``2h``/``7d``/``2w``. Anything else
raises :class:`ValueError` with what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from . import limits
from .status import ALL_STATUSES

#: Comparison operators a ``where`` clause may use.
OPERATORS = ("=", "!=", ">", ">=", "<", "<=")
#: Sort orders: a column, newest/largest first with ``-``.
ORDERS = ("-created_at", "created_at", "-id", "id")

_PATH = re.compile(r"^(args|kwargs)(\.[A-Za-z0-9_\-]+)+$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_WHERE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(!=|>=|<=|=|>|<)\s*(.*)$", re.S)
MAX_LIMIT = 10_000
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")


@dataclasses.dataclass(frozen=True)
class Where:
    """One condition on a value inside the payload: ``kwargs.to = "bob@example.com"``."""

    path: tuple[str, ...]  # ("kwargs", "to") or ("args", "0")
    op: str
    value: Any

    @classmethod
    def make(cls, path: str, op: str, value: Any) -> Where:
        if not isinstance(path, str) or not _PATH.match(path):
            raise ValueError(
                f"bad path {path!r}: use args.N or kwargs.key, then .key or .N for nested values"
            )
        if op not in OPERATORS:
            raise ValueError(f"bad operator {op!r}: use one of {' '.join(OPERATORS)}")
        if op not in ("=", "!=") and not isinstance(value, (int, float, str)):
            raise ValueError(f"{op} compares numbers or strings, not {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value}: NaN and infinity cannot be compared, use a finite number")
        limits.no_nul(value, f"the value compared with {path}")
        return cls(tuple(path.split(".")), op, value)

    @classmethod
    def parse(cls, text: str) -> Where:
        """Parse the CLI form ``kwargs.to=bob@example.com`` (the value is JSON if it
        parses as JSON, else the text itself: ``kwargs.n=3`` is a number,
        ``kwargs.n='"3"'`` a string)."""
        match = _WHERE.match(text)
        if not match:
            raise ValueError(f"bad condition {text!r}: expected PATH OP VALUE, e.g. kwargs.to=bob")
        path, op, raw = match.groups()
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        return cls.make(path, op, value)


@dataclasses.dataclass(frozen=True)
class JobQuery:
    """A search of the job table. Every field is optional; all given ones must match."""

    statuses: tuple[str, ...] = ()
    task: str | None = None
    queue: str | None = None
    payload: Mapping[str, Any] | None = None  # JSON containment: {"kwargs": {"to": "bob"}}
    where: tuple[Where, ...] = ()
    error_contains: str | None = None
    since: dt.datetime | None = None  # created at or after
    until: dt.datetime | None = None  # created before
    root_id: str | None = None
    group_id: str | None = None
    order_by: str = "-created_at"  # newest first, the order the indexes serve
    limit: int = 50
    after: str | None = None  # the cursor of the previous page

    def __post_init__(self) -> None:
        unknown = [s for s in self.statuses if s not in ALL_STATUSES]
        if unknown:
            raise ValueError(f"unknown status {unknown[0]!r}: use one of {', '.join(ALL_STATUSES)}")
        if self.order_by not in ORDERS:
            raise ValueError(f"bad order {self.order_by!r}: use one of {', '.join(ORDERS)}")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        if self.payload is not None and not isinstance(self.payload, Mapping):
            raise ValueError("payload must be a JSON object, e.g. {'kwargs': {'to': 'bob'}}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError("since/until must be timezone-aware datetimes")
            if value is not None:
                limits.moment(value, name)
        for name in ("task", "queue", "error_contains", "root_id", "group_id"):
            if getattr(self, name) is not None:
                limits.text(getattr(self, name), name)
        for status in self.statuses:
            limits.text(status, "status")
        if self.payload is not None:
            limits.no_nul(self.payload, "payload")
        for name in ("root_id", "group_id"):
            value = getattr(self, name)
            if value is not None and not _UUID.match(value.strip()):
                raise ValueError(f"{name} {value!r} is not a task id (a UUID)")
        if self.after is not None:
            decode_cursor(self.after)  # refuse a bad cursor before any SQL

    @classmethod
    def build(
        cls,
        *,
        status: str | Iterable[str] | None = None,
        where: Iterable[Where | tuple[str, str, Any] | str] = (),
        since: dt.datetime | dt.timedelta | str | None = None,
        until: dt.datetime | dt.timedelta | str | None = None,
        **fields: Any,
    ) -> JobQuery:
        """The friendly constructor behind ``app.jobs.search(...)``: a status or a list of
        them, conditions as ``Where``, ``(path, op, value)`` or ``"path=value"`` text,
        and ``since``/``until`` as datetimes, durations ago (``timedelta`` or ``"2h"``)."""
        statuses = (status,) if isinstance(status, str) else tuple(status or ())
        conditions = tuple(_condition(c) for c in where)
        return cls(
            statuses=statuses,
            where=conditions,
            since=moment(since),
            until=moment(until),
            **fields,
        )


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of a search, and the cursor of the next one (``None`` on the last)."""

    rows: list[Any]
    next_cursor: str | None
    #: Rows of the page that could not be read back (id, task_id, status, reason):
    #: left out of ``rows``, named here so that a listing can say so.
    skipped: list[Any] = dataclasses.field(default_factory=list)

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def parse_duration(text: str) -> dt.timedelta:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"30d"``, ``"2w"`` as a timedelta."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"bad duration {text!r}: use a number and s, m, h, d or w, e.g. 2h")
    number = limits.seconds(float(match.group(1)) * _UNITS[match.group(2)], f"duration {text!r}")
    return dt.timedelta(seconds=number)


def moment(value: dt.datetime | dt.timedelta | str | None) -> dt.datetime | None:
    """A point in time from a datetime, a duration ago, or ISO 8601 text."""
    if value is None or isinstance(value, dt.datetime):
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            raise ValueError("datetimes must be timezone-aware")
        return value
    now = dt.datetime.now(dt.timezone.utc)
    if isinstance(value, dt.timedelta):
        return limits.before(now, value, f"the time {value} ago")
    if isinstance(value, str) and _DURATION.match(value):
        return limits.before(now, parse_duration(value), f"the time {value.strip()} ago")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"bad time {value!r}: use a duration like 2h or an ISO 8601 date"
        ) from None
    return limits.moment(parsed, "time")


def encode_cursor(sort_value: Any, row_id: int) -> str:
    """An opaque cursor: where the next page starts."""
    if isinstance(sort_value, dt.datetime):
        sort_value = sort_value.isoformat()
    raw = json.dumps([sort_value, row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[Any, int]:
    """The sort value and row id a cursor holds; ``ValueError`` if it is not ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(row_id, int) or isinstance(row_id, bool):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ValueError(
            f"bad cursor {cursor!r}: pass the next_cursor of a previous page"
        ) from None
    return value, row_id


def _condition(value: Where | tuple[str, str, Any] | str) -> Where:
    if isinstance(value, Where):
        return value
    if isinstance(value, str):
        return Where.parse(value)
    if isinstance(value, (tuple, list)) and len(value) == 3:
        return Where.make(*value)
    raise ValueError(f"bad condition {value!r}: use (path, op, value) or 'path=value'")
