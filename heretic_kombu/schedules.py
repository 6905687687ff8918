"""Schedules for periodic tasks: Celery's ``crontab`` and ``schedule``, as pure functions.

``from celery.schedules import crontab`` becomes ``from heretic_kombu.schedules import
crontab``; the constructors take Celery's arguments. Each schedule answers one question,
:meth:`next_due`: given when the entry last ran (``None``: never) and the current time,
when is it due next? Beat (``heretic_kombu.beat``) keeps the state and does the firing;
nothing here reads a clock or a database, so the answers are easy to test.

All datetimes are timezone-aware; naive ones are taken as UTC. A crontab is read in the
timezone it was given (``tz=``), which beat sets from the app's Celery ``timezone``
setting, else in UTC. ``solar`` is not implemented: it raises a clear error.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["crontab", "maybe_schedule", "schedstate", "schedule", "solar"]

UTC = dt.timezone.utc
_MINUTE = dt.timedelta(minutes=1)
# Far enough to find Feb 29 on a given weekday (a 28-year cycle, and the 400-year one).
_SEARCH_YEARS = 401
_SEARCH_SPAN = dt.timedelta(days=366 * _SEARCH_YEARS)

_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}


class schedstate(NamedTuple):  # noqa: N801 - Celery's name
    """What Celery's ``is_due`` returns: whether it is due, and seconds until the next check."""

    is_due: bool
    next: float


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


class BaseSchedule:
    """What beat needs of a schedule: the next due time and a stable description."""

    def next_due(self, last_run_at: dt.datetime | None, now: dt.datetime) -> dt.datetime:
        """The next time the entry is due, after a run at ``last_run_at`` (``None``: never).

        The answer may be at or before ``now``: the entry is then overdue and runs once.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """A canonical text of the schedule, stored with the entry to notice changes."""
        raise NotImplementedError

    def is_due(self, last_run_at: dt.datetime | None, now: dt.datetime | None = None) -> schedstate:
        """Celery's ``is_due``: ``(due now?, seconds until it is worth asking again)``."""
        now = _aware(now or dt.datetime.now(UTC))
        due = self.next_due(last_run_at, now)
        if due <= now:
            # Once it has run (now), the next due time is one period later.
            return schedstate(True, max(0.0, (self.next_due(now, now) - now).total_seconds()))
        return schedstate(False, (due - now).total_seconds())

    def remaining_estimate(
        self, last_run_at: dt.datetime | None, now: dt.datetime | None = None
    ) -> dt.timedelta:
        """Celery's ``remaining_estimate``: the time left until the next due time."""
        now = _aware(now or dt.datetime.now(UTC))
        return self.next_due(last_run_at, now) - now

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BaseSchedule):
            return NotImplemented
        return self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash(self.describe())


class schedule(BaseSchedule):  # noqa: N801 - Celery's name
    """Every ``run_every`` (a :class:`~datetime.timedelta` or a number of seconds).

    An entry that never ran is due one period after beat first sees it, as in Celery.
    ``relative=True`` (Celery's rounding to the period's resolution) is not supported;
    ``nowfun`` and ``app`` are accepted for compatibility and unused.
    """

    def __init__(
        self,
        run_every: dt.timedelta | float | int,
        relative: bool = False,
        nowfun: Any = None,
        app: Any = None,
    ) -> None:
        if isinstance(run_every, bool) or not isinstance(run_every, (dt.timedelta, int, float)):
            raise ValueError(
                f"schedule: run_every must be a timedelta or a number of seconds, not {run_every!r}"
            )
        if not isinstance(run_every, dt.timedelta):
            run_every = dt.timedelta(seconds=run_every)
        if run_every <= dt.timedelta(0):
            raise ValueError(f"schedule: run_every must be positive, not {run_every}")
        if relative:
            raise ValueError("schedule: relative=True is not supported by heretic_kombu")
        self.run_every = run_every

    @property
    def seconds(self) -> float:
        return self.run_every.total_seconds()

    def next_due(self, last_run_at: dt.datetime | None, now: dt.datetime) -> dt.datetime:
        return _aware(last_run_at if last_run_at is not None else now) + self.run_every

    def describe(self) -> str:
        return f"every {self.seconds:g} seconds"


class crontab(BaseSchedule):  # noqa: N801 - Celery's name
    """Celery's crontab: due at every minute matching all five fields.

    Each field takes ``"*"``, a number, ``"a-b"``, ``"*/n"``, ``"a-b/n"``, ``"a/n"``,
    comma-separated lists of those, an int, or an iterable of ints. ``day_of_week`` counts
    from Sunday = 0 (7 is Sunday too) and takes names (``"mon-fri"``, ``"sun,sat"``);
    ``month_of_year`` takes ``"jan"``…``"dec"``. As in Celery, a day must match both
    ``day_of_week`` and ``day_of_month``. Invalid input raises :class:`ValueError` naming
    the field. ``tz`` (a name or a tzinfo) is the timezone the fields are read in;
    ``nowfun`` and ``app`` are accepted for compatibility and unused.
    """

    def __init__(
        self,
        minute: Any = "*",
        hour: Any = "*",
        day_of_week: Any = "*",
        day_of_month: Any = "*",
        month_of_year: Any = "*",
        *,
        tz: dt.tzinfo | str | None = None,
        nowfun: Any = None,
        app: Any = None,
    ) -> None:
        # Iterables are read once, here (a generator could not be read twice).
        self._spec = {
            name: list(value) if _is_collection(value) else value
            for name, value in (
                ("minute", minute),
                ("hour", hour),
                ("day_of_week", day_of_week),
                ("day_of_month", day_of_month),
                ("month_of_year", month_of_year),
            )
        }
        minute, hour, day_of_week, day_of_month, month_of_year = self._spec.values()
        self.minute = _parse_field("minute", minute, 0, 59)
        self.hour = _parse_field("hour", hour, 0, 23)
        self.day_of_week = frozenset(
            d % 7 for d in _parse_field("day_of_week", day_of_week, 0, 7, _WEEKDAYS)
        )
        self.day_of_month = _parse_field("day_of_month", day_of_month, 1, 31)
        self.month_of_year = _parse_field("month_of_year", month_of_year, 1, 12, _MONTHS)
        if not any(
            day <= _longest_month(month)
            for month in self.month_of_year
            for day in self.day_of_month
        ):
            raise ValueError(
                f"crontab: day_of_month {day_of_month!r} never occurs in month_of_year"
                f" {month_of_year!r}"
            )
        self.tz = _zone(tz)
        self._minutes = sorted(self.minute)
        self._hours = sorted(self.hour)

    def in_timezone(self, tz: dt.tzinfo | str | None) -> crontab:
        """This crontab read in ``tz`` instead."""
        spec = dict(self._spec)
        return crontab(**spec, tz=tz)

    def next_due(self, last_run_at: dt.datetime | None, now: dt.datetime) -> dt.datetime:
        """The first matching minute strictly after ``last_run_at`` (or ``now``)."""
        after = _aware(last_run_at if last_run_at is not None else now)
        zone = self.tz or UTC
        local = after.astimezone(zone).replace(tzinfo=None)
        start = local.replace(second=0, microsecond=0) + _MINUTE
        for candidate in self._matches_from(start):
            moment = candidate.replace(tzinfo=zone)
            utc = moment.astimezone(UTC)
            if utc.astimezone(zone).replace(tzinfo=None) != candidate:
                continue  # a wall-clock time skipped by a DST change: it never happens
            if utc > after:  # in a repeated DST hour, the first occurrence may be past
                return utc
        raise ValueError(f"{self!r} has no due time in the next {_SEARCH_YEARS} years")

    def _matches_from(self, start: dt.datetime) -> Iterator[dt.datetime]:
        """Every matching naive wall-clock minute from ``start`` on, in order."""
        day = start.date()
        last_day = min(dt.date.max - dt.timedelta(days=1), day + _SEARCH_SPAN)
        while day < last_day:
            if day.month not in self.month_of_year:
                # Jump to the first day of the next month.
                day = (day.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
                continue
            weekday = (day.weekday() + 1) % 7  # Python: Monday = 0; cron: Sunday = 0
            if day.day in self.day_of_month and weekday in self.day_of_week:
                first = start.time() if day == start.date() else dt.time(0, 0)
                for hour in self._hours:
                    if hour < first.hour:
                        continue
                    for minute in self._minutes:
                        if hour == first.hour and minute < first.minute:
                            continue
                        yield dt.datetime.combine(day, dt.time(hour, minute))
            day += dt.timedelta(days=1)

    def describe(self) -> str:
        fields = ", ".join(f"{name}={_show(value)}" for name, value in self._spec.items())
        zone = f", tz={self.tz}" if self.tz is not None else ""
        return f"crontab({fields}{zone})"


class solar(BaseSchedule):  # noqa: N801 - Celery's name
    """Celery's sunrise/sunset schedule: not implemented in heretic_kombu."""

    def __init__(self, event: str, lat: float, lon: float, **kwargs: Any) -> None:
        raise NotImplementedError(
            "heretic_kombu does not implement solar schedules; use a crontab at a fixed time"
        )


def maybe_schedule(value: Any) -> BaseSchedule:
    """A beat_schedule ``schedule`` value as a schedule: a number of seconds or a
    timedelta becomes :class:`schedule`, a schedule stays itself.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, BaseSchedule):
        return value
    if isinstance(value, (dt.timedelta, int, float)) and not isinstance(value, bool):
        return schedule(value)
    raise ValueError(
        f"a schedule must be a crontab, a schedule, a timedelta or seconds, not {value!r}"
    )


def _parse_field(
    name: str, value: Any, low: int, high: int, names: dict[str, int] | None = None
) -> frozenset[int]:
    if isinstance(value, bool):
        raise ValueError(f"crontab {name}: {value!r} is not a valid value")
    if isinstance(value, int):
        values = {value}
    elif isinstance(value, str):
        values = _parse_text(name, value, low, high, names or {})
    elif isinstance(value, Iterable):
        values = set()
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"crontab {name}: {item!r} in {value!r} is not an integer")
            values.add(item)
    else:
        raise ValueError(f"crontab {name}: {value!r} is not a string, integer or set of integers")
    bad = sorted(v for v in values if not low <= v <= high)
    if bad:
        raise ValueError(f"crontab {name}: {bad[0]} is out of range {low}-{high}")
    if not values:
        raise ValueError(f"crontab {name}: {value!r} matches nothing")
    return frozenset(values)


_PART = re.compile(r"^(?P<range>\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(?P<step>[0-9]+))?$")


def _parse_text(name: str, text: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    values: set[int] = set()
    for raw in text.lower().split(","):
        part = raw.strip()
        match = _PART.match(part)
        if match is None:
            raise ValueError(f"crontab {name}: cannot parse {part!r} in {text!r}")
        step = int(match["step"]) if match["step"] else 1
        if step < 1:
            raise ValueError(f"crontab {name}: step must be at least 1 in {text!r}")
        span = match["range"]
        if span == "*":
            first, last = low, high
        elif "-" in span:
            left, right = span.split("-")
            first, last = _number(name, left, text, names), _number(name, right, text, names)
        else:
            first = _number(name, span, text, names)
            # "a/n" means from a to the end, every n; a lone "a" means just a.
            last = high if match["step"] else first
        for number in (first, last):
            if not low <= number <= high:
                raise ValueError(f"crontab {name}: {number} is out of range {low}-{high}")
        if last >= first:
            values.update(range(first, last + 1, step))
        else:  # a range that wraps around, as Celery allows ("fri-mon", "22-2")
            wrapped = [*range(first, high + 1), *range(low, last + 1)]
            values.update(wrapped[::step])
    return values


def _number(name: str, token: str, text: str, names: dict[str, int]) -> int:
    if token.isdigit():
        return int(token)
    if token in names:
        return names[token]
    raise ValueError(f"crontab {name}: {token!r} in {text!r} is not a number or a known name")


def _longest_month(month: int) -> int:
    return 29 if month == 2 else calendar.monthrange(2001, month)[1]


def _zone(tz: dt.tzinfo | str | None) -> dt.tzinfo | None:
    if tz is None or isinstance(tz, dt.tzinfo):
        return tz
    if isinstance(tz, str):
        if tz.upper() == "UTC":
            return UTC
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"crontab: unknown timezone {tz!r}") from exc
    raise ValueError(f"crontab: tz must be a timezone name or a tzinfo, not {tz!r}")


def _is_collection(value: Any) -> bool:
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def _show(value: Any) -> str:
    if isinstance(value, (str, int)):
        return repr(value)
    try:
        return repr(sorted(value))
    except TypeError:  # mixed types: refused by the parser anyway
        return repr(value)
