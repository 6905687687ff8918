"""The row types of the job store, and how they map to and from the table's columns.

:class:`Job` is one row of ``heretic_jobs`` as it is read; :class:`NewJob` is what a
producer writes; :class:`Attempt`, :class:`AttemptResult` and :class:`NextSteps` are what
a worker records when an attempt ends. The functions below turn these into column values
and back. A row is always decoded by the names of its columns (SQLAlchemy's
``row._mapping``, a driver cursor's ``description``), never by their position, so that a
statement's column list can change without silently shifting values.

Timestamps are written from Python in UTC (:func:`utcnow`) so both dialects compare them
the same way; whatever comes back naive (SQLite) is read as UTC.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypedDict

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from .. import serialization
from ..status import TERMINAL, Status

#: The ``error`` of a ``started`` row revoked without ``terminate``: a worker that has
#: claimed the job but not started it yet drops it; a running job runs to its end.
REVOKE_REQUESTED = "revoke requested"


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class Job:
    """One row of ``heretic_jobs``."""

    id: int
    task_id: str
    task_name: str
    queue_name: str
    status: str
    payload: dict[str, Any] | None
    attempt_logs: list[str]
    attempts: int
    max_attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    last_attempted_at: dt.datetime | None
    eta: dt.datetime | None
    expires_at: dt.datetime | None
    priority: int | None
    result: Any
    error: str | None
    traceback: str | None
    parent_id: str | None
    root_id: str | None
    group_id: str | None
    worker: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    workflow: dict[str, Any] | None = None

    @property
    def args(self) -> list[Any]:
        return list((self.payload or {}).get("args") or [])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict((self.payload or {}).get("kwargs") or {})


@dataclasses.dataclass(frozen=True)
class NewJob:
    """What a producer writes before the message is published."""

    task_id: str
    task_name: str
    queue_name: str
    payload: serialization.RawJSON  # {"args": [...], "kwargs": {...}}, already encoded
    max_attempts: int
    status: str = Status.PENDING
    eta: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    priority: int | None = None
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    attempts: int = 0
    #: Canvas links, Celery's embed keys: callbacks, errbacks, chain, chord.
    workflow: serialization.RawJSON | None = None
    #: Set only for a row written already finished (a chord body failed by its header),
    #: with ``note``, its one ``attempt_logs`` line saying why it never ran.
    result: serialization.RawJSON | None = None
    error: str | None = None
    note: str | None = None


class ChordCounter(Protocol):
    """A chord's row in ``heretic_chords`` as a producer plans it: how many header jobs
    to wait for, and the body (encoded JSON) to send when they all succeeded."""

    @property
    def group_id(self) -> str: ...

    @property
    def total(self) -> int: ...

    @property
    def body(self) -> serialization.RawJSON: ...


@dataclasses.dataclass(frozen=True)
class AttemptResult:
    """How one attempt ended, as the worker records it."""

    status: str  # succeeded | failed | retrying
    log_line: str
    result: serialization.RawJSON | None = None
    error: str | None = None
    traceback: str | None = None
    eta: dt.datetime | None = None  # next attempt, for retrying
    max_attempts: int | None = None  # a retry may raise the limit (retry(max_retries=...))
    payload: serialization.RawJSON | None = None  # a retry may change the arguments


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One finished attempt to record: which job, which attempt, how it ended, and what
    its workflow sends next."""

    task_id: str
    attempt: int
    outcome: AttemptResult
    then: NextSteps | None = None


@dataclasses.dataclass
class NextSteps:
    """What a finished attempt sends next, written in the transaction that records it.

    ``jobs``/``chords`` are already planned; for a chord header job, ``chord_group``
    names the chord and the two callables plan its body (given the body and the
    header's results) or its failure (given the body), as ``(jobs, chord counters)``.
    """

    jobs: Sequence[NewJob] = ()
    chords: Sequence[ChordCounter] = ()
    chord_group: str | None = None
    chord_succeeded: bool = True
    complete_chord: Callable[[Any, list[Any]], tuple[list[NewJob], list[Any]]] | None = None
    fail_chord: Callable[[Any], tuple[list[NewJob], list[Any]]] | None = None


# -- attempt_logs lines ----------------------------------------------------------------


def stamp(moment: dt.datetime) -> str:
    """``moment`` as it opens an ``attempt_logs`` line (UTC, microseconds, ``Z``)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log_line(moment: dt.datetime, attempt: int, worker: str, outcome: str) -> str:
    """One ``attempt_logs`` entry: when, which attempt, which worker, what happened."""
    return f"{stamp(moment)} attempt {attempt} on {worker}: {outcome}"


# -- reading rows ----------------------------------------------------------------------

#: Columns of type uuid: SQLAlchemy hands them over as text, the bare driver as UUID.
_UUID_COLUMNS = ("task_id", "parent_id", "root_id", "group_id")
_TIME_COLUMNS = (
    "created_at",
    "updated_at",
    "last_attempted_at",
    "eta",
    "expires_at",
    "started_at",
    "finished_at",
)


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """A row a read had to skip: one of its values cannot be read back into Python (a
    timestamp past year 9999 in UTC, written by hand or by another program)."""

    id: int
    task_id: str
    status: str
    reason: str


@dataclasses.dataclass
class ReadRows:
    """The rows a many-row read could read, and those it set aside (:class:`Unreadable`)."""

    jobs: list[Job]
    unreadable: list[Unreadable] = dataclasses.field(default_factory=list)

    #: The ids in the query's order, when the rows were read one by one.
    ids: list[int] | None = None

    def cut(self, limit: int) -> bool:
        """Keep the first ``limit`` rows (read or not) in the query's order; whether
        there were more."""
        if len(self.jobs) + len(self.unreadable) <= limit:
            return False
        if self.ids is None:
            del self.jobs[limit:]
            return True
        self.ids = self.ids[:limit]
        kept = set(self.ids)
        self.jobs = [job for job in self.jobs if job.id in kept]
        self.unreadable = [row for row in self.unreadable if row.id in kept]
        return True

    def last_id(self) -> int:
        """The id of the last row kept, read or not, in the query's order."""
        return self.ids[-1] if self.ids else self.jobs[-1].id


def read_jobs(conn: sa.Connection, query: Any, jobs_table: sa.Table) -> ReadRows:
    """Run ``query`` (which selects every column of the job table) and read its rows;
    if one of them cannot be read, read them again one by one, by the ids the same query
    finds, and set the unreadable ones aside, with the reason, instead of failing them
    all. Costs nothing more while every row can be read."""
    try:
        return ReadRows([job_from_row(row) for row in conn.execute(query)])
    except (ValueError, OverflowError):
        pass
    keys = conn.execute(
        query.with_only_columns(jobs_table.c.id, jobs_table.c.task_id, jobs_table.c.status)
    ).all()
    found = ReadRows([], ids=[key.id for key in keys])
    for key in keys:
        try:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == key.id)).first()
            if row is not None:
                found.jobs.append(job_from_row(row))
        except (ValueError, OverflowError) as exc:
            found.unreadable.append(Unreadable(key.id, str(key.task_id), str(key.status), str(exc)))
    return found


def job_from_row(row: sa.Row[Any]) -> Job:
    """A job from a SQLAlchemy row that selected or returned every column of the table."""
    return _job_from(dict(row._mapping))


def named_rows(cursor: Any) -> list[dict[str, Any]]:
    """What is left to fetch on a DBAPI cursor, each row by its columns' names (the
    cursor's ``description``)."""
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def jobs_from_cursor(cursor: Any) -> list[Job]:
    """The rows of a driver cursor that selected or returned every column of the job
    table, as SQLAlchemy's typed statements return them."""
    return [_driver_job(data) for data in named_rows(cursor)]


def readable_rows(cursor: Any) -> tuple[list[dict[str, Any]], int]:
    """:func:`named_rows`, skipping the rows the driver cannot turn into Python values
    (psycopg2 raises for such a row and moves on to the next); returns the rows read and
    how many were skipped."""
    names = [column[0] for column in cursor.description]
    found: list[dict[str, Any]] = []
    skipped = 0
    for _ in range(max(cursor.rowcount, 0)):
        try:
            values = cursor.fetchone()
        except (ValueError, OverflowError):
            skipped += 1
            continue
        if values is None:
            break
        found.append(dict(zip(names, values, strict=True)))
    return found, skipped


def _driver_job(data: dict[str, Any]) -> Job:
    """A job from every column of a row as the driver returned it (uuids as UUID)."""
    for key in _UUID_COLUMNS:
        if data[key] is not None:
            data[key] = str(data[key])
    return _job_from(data)


def _job_from(data: dict[str, Any]) -> Job:
    for key in _TIME_COLUMNS:
        data[key] = aware(data[key])
    data["attempt_logs"] = list(data["attempt_logs"] or [])
    return Job(**data)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """``value`` with UTC as its time zone if it came back naive (SQLite)."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


# -- writing rows ----------------------------------------------------------------------

JSON_COLUMNS = ("payload", "workflow", "result")
_NEW_JOB_COLUMNS = tuple(field.name for field in dataclasses.fields(NewJob) if field.name != "note")
#: What a producer writes in a new row; the other columns keep their defaults.
ROW_COLUMNS = (
    *_NEW_JOB_COLUMNS,
    "created_at",
    "updated_at",
    "attempt_logs",
    "finished_at",
)


def row_params(job: NewJob) -> dict[str, Any]:
    """The values of a new row's columns (:data:`ROW_COLUMNS`), JSON as text, the task id
    in its canonical spelling (the one the table gives back, on SQLite too)."""
    now = utcnow()
    values = {name: getattr(job, name) for name in _NEW_JOB_COLUMNS}
    values["task_id"] = str(uuid.UUID(job.task_id))
    for name in JSON_COLUMNS:
        if values[name] is not None:
            values[name] = str(values[name])
    values.update(
        created_at=now,
        updated_at=now,
        attempt_logs=[f"{stamp(now)} not run: {job.note}"] if job.note else [],
        # A row written already finished: e.g. a chord body failed with its header.
        finished_at=now if job.status in TERMINAL else None,
    )
    return values


def new_row(row_id: int, params: dict[str, Any]) -> Job:
    """The row just written with ``params`` (:func:`row_params`) under ``row_id``: only
    the new id comes back from the database, the rest of the row is what was sent."""
    values = dict(params)
    for name in JSON_COLUMNS:
        if values[name] is not None:
            values[name] = serialization.loads(values[name])
    return Job(
        id=row_id,
        last_attempted_at=None,
        traceback=None,
        worker=None,
        started_at=None,
        **values,
    )


def json_text(value: serialization.RawJSON | None, postgres: bool) -> Any:
    """Encoded JSON bound as text (CAST to jsonb on PostgreSQL), so that it is stored the
    same whichever engine (ours, or the caller's for a transactional enqueue) sends it."""
    if value is None:
        return None
    param: Any = sa.bindparam(None, str(value), type_=sa.Text)
    return sa.cast(param, postgresql.JSONB) if postgres else param


def job_values(job: NewJob, postgres: bool) -> dict[str, Any]:
    """The column values of a new row (JSON as text, so any engine stores it alike)."""
    values = row_params(job)
    for name in JSON_COLUMNS:
        values[name] = json_text(values[name], postgres)
    return values


class RecordParams(TypedDict):
    """The parameters of the PostgreSQL record of a batch of attempts: one array per
    column, an entry per attempt, in the order of the attempts."""

    now: dt.datetime
    task_ids: list[str]
    attempts: list[int]
    statuses: list[str]
    results: list[str | None]
    errors: list[str | None]
    tracebacks: list[str | None]
    lines: list[str]
    etas: list[dt.datetime | None]
    max_attempts: list[int | None]
    payloads: list[str | None]


class TurnParams(RecordParams):
    """The parameters of a worker's turn on PostgreSQL: the record, and the claim of
    ``claim_ids`` for ``worker``."""

    claim_ids: list[str]
    worker: str


def record_params(attempts: Sequence[Attempt], now: dt.datetime) -> RecordParams:
    """The values of ``attempts`` as the batch record takes them (see :class:`RecordParams`)."""
    outcomes = [item.outcome for item in attempts]
    return {
        "now": now,
        "task_ids": [item.task_id for item in attempts],
        "attempts": [item.attempt for item in attempts],
        "statuses": [o.status for o in outcomes],
        "results": [None if o.result is None else str(o.result) for o in outcomes],
        "errors": [o.error for o in outcomes],
        "tracebacks": [o.traceback for o in outcomes],
        "lines": [o.log_line for o in outcomes],
        "etas": [o.eta if o.status == Status.RETRYING else None for o in outcomes],
        "max_attempts": [o.max_attempts for o in outcomes],
        "payloads": [None if o.payload is None else str(o.payload) for o in outcomes],
    }


def turn_params(
    attempts: Sequence[Attempt], task_ids: Sequence[str], worker: str, now: dt.datetime
) -> TurnParams:
    """:func:`record_params`, with the claim's task ids and worker."""
    return {**record_params(attempts, now), "claim_ids": list(task_ids), "worker": worker}
