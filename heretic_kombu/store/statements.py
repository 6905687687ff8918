"""Every statement the job store prepares ahead of use, by name, in one place.

SQLAlchemy Core statements, raw ``sa.text`` SQL and the strings sent straight to the
driver (``PREPARE``, ``EXECUTE``, ``LISTEN``) alike: built once when the module is
imported, so that the hot paths (a ``.delay()``, a worker's turn, ``.get()``) only bind
their parameters. Statements built per call from a caller's filters stay with the
operation that builds them (:mod:`.jobstore`, :mod:`.history`, :mod:`.beatstore`).

PostgreSQL-only statements are named as such; the others run on both dialects.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from ..status import READY, TERMINAL, WAITING, Status
from .rows import JSON_COLUMNS, ROW_COLUMNS, Job
from .tables import jobs

#: PostgreSQL channel notified with the ids of jobs that ended (wakes ``.get()``).
DONE_CHANNEL = "heretic_done"
#: Driver SQL of :class:`~.listener.DoneListener`'s connection.
LISTEN_DONE = f"LISTEN {DONE_CHANNEL}"

# PostgreSQL advisory lock held by the one scheduler publishing due jobs at a time.
SCHEDULER_LOCK_KEY = 0x68657266
#: Takes the scheduler's lock for the transaction, if no other scheduler holds it.
TRY_SCHEDULER_LOCK = sa.select(sa.func.pg_try_advisory_xact_lock(SCHEDULER_LOCK_KEY))


# -- helpers to write the statements ---------------------------------------------------


def _row_test(condition: Any) -> Any:
    """``condition`` checked on the rows found by task id, never used to find them.

    Until VACUUM, the status index holds a dead entry for every job that ever passed
    through a status; a planner that picks it for ``status = 'pending'`` reads them all
    (measured: 25–80 ms instead of 0.03–1 ms per statement after 200,000 jobs). Written
    ``(...) IS TRUE`` (``status`` is never NULL, so the meaning is the same), the test
    matches no index and the statement goes through ``task_id``'s unique index.
    """
    return condition.is_(sa.true())


def _sql_list(values: Iterable[str]) -> str:
    """``'a', 'b'``: constant strings for an SQL ``IN (...)``."""
    return ", ".join(f"'{value}'" for value in sorted(values))


def current_attempt(task_id: str, attempt: int) -> Any:
    """The row of ``task_id`` while attempt number ``attempt`` is still running: what
    every statement closing an attempt is conditional on (a stale one changes nothing)."""
    return sa.and_(
        jobs.c.task_id == task_id, jobs.c.status == Status.STARTED, jobs.c.attempts == attempt
    )


def append_log(line: str, postgres: bool) -> Any:
    """The value of ``attempt_logs`` with ``line`` appended (text[] on PostgreSQL, a
    JSON list elsewhere)."""
    if postgres:
        return sa.func.array_append(jobs.c.attempt_logs, line)
    return sa.func.json_insert(jobs.c.attempt_logs, "$[#]", line)


# -- sending: new rows, and the broker's confirmation ----------------------------------


def _insert_statement(postgres: bool) -> Any:
    """INSERT of a new row, values bound per row; JSON goes in as text (CAST to jsonb on
    PostgreSQL), so that it is stored the same whichever engine (ours, or the caller's
    for a transactional enqueue) sends it."""
    values: dict[str, Any] = {name: sa.bindparam(name) for name in ROW_COLUMNS}
    for name in JSON_COLUMNS:
        text = sa.bindparam(name, type_=sa.Text)
        values[name] = sa.cast(text, postgresql.JSONB) if postgres else text
    return jobs.insert().values(values)


# Built once per dialect (PostgreSQL or not): a send only binds its values. Only the
# new ids come back (in the order of the rows sent): the rest of each row is what was
# sent, see rows.new_row.
INSERTS = {
    postgres: _insert_statement(postgres).returning(jobs.c.id, sort_by_parameter_order=True)
    for postgres in (True, False)
}

#: Most rows one multi-row INSERT writes (see RowWriter._insert_many in writes.py).
INSERT_BATCH = 1000
#: A driver parameter in rendered SQL: ``%(name)s``.
_PARAMETER = re.compile(r"%\((\w+)\)s")
#: The end of a multi-row INSERT: each new id with its task id, by name (PostgreSQL does
#: not promise ``RETURNING`` in the order of ``VALUES``).
BULK_INSERT_RETURNING = " RETURNING id, CAST(task_id AS text) AS task_id"


def bulk_insert_parts(rendered_insert: str) -> tuple[str, list[str]]:
    """The one-row INSERT's driver SQL (``rendered_insert``, :data:`INSERTS` rendered for
    psycopg2) cut into ``INSERT INTO … (columns)`` and the ``(…)`` of each row's values,
    its parameters numbered ``name__0`` to ``name__999``."""
    head, rest = rendered_insert.split(" VALUES ", 1)
    row = rest[: rest.rindex(" RETURNING ")]
    rows = [_PARAMETER.sub(rf"%(\g<1>__{n})s", row) for n in range(INSERT_BATCH)]
    return head, rows


def _mark_queued(match: Any) -> Any:
    return (
        jobs.update()
        .where(match, _row_test(jobs.c.status == Status.PENDING))
        .values(status=Status.QUEUED, updated_at=sa.bindparam("now"))
    )


#: ``pending`` -> ``queued`` for a list of task ids (``IN``, any database).
MARK_QUEUED = _mark_queued(jobs.c.task_id.in_(sa.bindparam("task_ids", expanding=True)))
#: The same for one array of task ids (PostgreSQL, ``= ANY``).
MARK_QUEUED_ANY = _mark_queued(
    jobs.c.task_id == sa.any_(sa.cast(sa.bindparam("task_ids"), postgresql.ARRAY(sa.Uuid)))
)


# -- claiming --------------------------------------------------------------------------

#: Which of the rows found by task id a worker may claim: ready, or waiting and due, and
#: not expired. Written once, as SQL, for both the claim (:data:`CLAIM`, every database)
#: and a worker's turn on PostgreSQL (:data:`TURN`); ``... IS TRUE`` as in :func:`_row_test`.
_CLAIMABLE = (
    f"(status IN ({_sql_list(READY)})"
    f" OR (status IN ({_sql_list(WAITING)}) AND eta <= :now)) IS TRUE"
    " AND (expires_at IS NULL OR expires_at > :now)"
)

# The claim (invariant 3), built once: the hot path only binds its parameters.
# Runnable: pending/queued, or scheduled/retrying whose eta has passed; never expired.
CLAIM = (
    jobs.update()
    .where(
        jobs.c.task_id.in_(sa.bindparam("task_ids", expanding=True)),
        sa.text(_CLAIMABLE).bindparams(sa.bindparam("now", type_=jobs.c.eta.type)),
    )
    .values(
        status=Status.STARTED,
        attempts=jobs.c.attempts + 1,
        worker=sa.bindparam("worker"),
        started_at=sa.bindparam("now"),
        last_attempted_at=sa.bindparam("now"),
        finished_at=None,
        updated_at=sa.bindparam("now"),
    )
    .returning(*jobs.c)
)


# -- recording attempts ----------------------------------------------------------------

# record_attempts on PostgreSQL: the values of every attempt come as parallel arrays
# (rows.record_params), so the statement's text (and its plan) is the same for any batch
# size. Like RowWriter._record_one (writes.py): ``ignored`` keeps the stored result,
# ``retrying`` sets the eta instead of finished_at, a retry may raise max_attempts or
# replace the payload.
# Each job that ended is announced on heretic_done, delivered with the commit (wakes
# ``.get()``).
_RECORD_UPDATE = """
UPDATE heretic_jobs AS j SET
    status = v.status,
    result = CASE WHEN v.status = 'ignored' THEN j.result ELSE CAST(v.result AS jsonb) END,
    error = v.error,
    traceback = v.traceback,
    attempt_logs = array_append(j.attempt_logs, v.line),
    eta = CASE WHEN v.status = 'retrying' THEN v.eta ELSE j.eta END,
    finished_at = CASE WHEN v.status = 'retrying' THEN j.finished_at ELSE :now END,
    max_attempts = COALESCE(v.max_attempts, j.max_attempts),
    payload = COALESCE(CAST(v.payload AS jsonb), j.payload),
    updated_at = :now
FROM unnest(
    CAST(:task_ids AS uuid[]), CAST(:attempts AS integer[]), CAST(:statuses AS text[]),
    CAST(:results AS text[]), CAST(:errors AS text[]), CAST(:tracebacks AS text[]),
    CAST(:lines AS text[]), CAST(:etas AS timestamptz[]), CAST(:max_attempts AS integer[]),
    CAST(:payloads AS text[])
) AS v(task_id, attempt, status, result, error, traceback, line, eta, max_attempts, payload)
WHERE j.task_id = v.task_id AND j.attempts = v.attempt AND (j.status = 'started') IS TRUE
RETURNING j.task_id, j.status
"""

#: Announces a recorded job that ended on heretic_done (delivered with the commit).
_NOTIFY_DONE = (
    f"CASE WHEN status IN ({_sql_list(TERMINAL)})"
    f" THEN pg_notify('{DONE_CHANNEL}', CAST(task_id AS text)) END"
)
#: PostgreSQL: record a batch of attempts; a row (``task_id``) per attempt recorded.
RECORD_BATCH = sa.text(
    f"WITH recorded AS ({_RECORD_UPDATE})\nSELECT task_id, {_NOTIFY_DONE} AS notified FROM recorded"
)


# -- a worker's turn on PostgreSQL: record and claim in one prepared statement ---------

#: The columns :data:`TURN` adds before a claimed row's: the task id of the row (an
#: attempt recorded or a job claimed), and whether it was announced as ended.
TURN_TASK_ID = "turn_task_id"
TURN_NOTIFIED = "turn_notified"


def _turn_columns() -> tuple[str, str]:
    """The columns of a claimed row in :data:`TURN`, named as :class:`Job`'s fields, and
    the typed NULLs standing for them in the rows of recorded attempts (named too: the
    first SELECT of a UNION names its columns). UUIDs come back as text; the driver
    decodes JSON (with the engine's deserializer), arrays and timestamps (aware) as
    SQLAlchemy's execution layer would hand them over."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    values, nulls = [], []
    for field in dataclasses.fields(Job):
        column = jobs.c[field.name]
        if isinstance(column.type, sa.Uuid):
            values.append(f"CAST({column.name} AS text) AS {column.name}")
            nulls.append(f"CAST(NULL AS text) AS {column.name}")
        else:
            values.append(column.name)
            nulls.append(f"CAST(NULL AS {column.type.compile(dialect)}) AS {column.name}")
    return ", ".join(values), ", ".join(nulls)


_CLAIMED_COLUMNS, _RECORDED_NULLS = _turn_columns()
_CLAIMED_RETURNING = ", ".join(column.name for column in jobs.c)

# One turn of a worker on PostgreSQL (RowWriter.turn, writes.py): the record of the attempts that
# ended (_RECORD_UPDATE) and the claim of the messages that arrived (the same test as
# CLAIM, task ids as an array), in one statement. A row per recorded attempt (its task
# id, then NULLs) and a row per claimed job (its task id, then the row as Job's fields).
TURN = sa.text(
    f"""
WITH recorded AS ({_RECORD_UPDATE}),
claimed AS (
UPDATE heretic_jobs SET
    status = '{Status.STARTED}',
    attempts = attempts + 1,
    worker = :worker,
    started_at = :now,
    last_attempted_at = :now,
    finished_at = NULL,
    updated_at = :now
WHERE task_id = ANY(CAST(:claim_ids AS uuid[])) AND {_CLAIMABLE}
RETURNING {_CLAIMED_RETURNING}
)
SELECT CAST(task_id AS text) AS {TURN_TASK_ID}, ({_NOTIFY_DONE}) IS NULL AS {TURN_NOTIFIED},
    {_RECORDED_NULLS} FROM recorded
UNION ALL
SELECT CAST(task_id AS text), CAST(NULL AS boolean), {_CLAIMED_COLUMNS} FROM claimed
"""
)
#: The parameters of TURN, in the order of the prepared statement's $1, $2…, with
#: their declared types. The arrays are declared text[] (psycopg2 sends a list of NULLs,
#: or an empty one, without a type) and TURN casts each to its column's type.
_TURN_PARAMS = {
    "now": "timestamptz",
    **dict.fromkeys(
        (
            *("task_ids", "attempts", "statuses", "results", "errors", "tracebacks"),
            *("lines", "etas", "max_attempts", "payloads", "claim_ids"),
        ),
        "text[]",
    ),
    "worker": "text",
}
_TURN_NAME = "heretic_turn"


def _prepare_turn_sql() -> str:
    """``PREPARE`` of :data:`TURN`, its parameters numbered in the order of
    :data:`_TURN_PARAMS`."""
    numbered = {name: f"${index}" for index, name in enumerate(_TURN_PARAMS, start=1)}
    body = str(TURN.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]
    body = _PARAMETER.sub(lambda match: numbered[match.group(1)], body)
    types = ", ".join(_TURN_PARAMS.values())
    return f"PREPARE {_TURN_NAME} ({types}) AS {body}"


#: Driver SQL: whether this session has prepared :data:`TURN` already (a row if so).
TURN_IS_PREPARED = f"SELECT 1 FROM pg_prepared_statements WHERE name = '{_TURN_NAME}'"
#: Driver SQL: prepare :data:`TURN` for this session.
PREPARE_TURN = _prepare_turn_sql()
#: Driver SQL: run the prepared :data:`TURN` (parameters as in rows.TurnParams).
EXECUTE_TURN = f"EXECUTE {_TURN_NAME} ({', '.join(f'%({name})s' for name in _TURN_PARAMS)})"


# -- reading ---------------------------------------------------------------------------

#: A job's row and its status, by task id (AsyncResult's reads).
GET = sa.select(jobs).where(jobs.c.task_id == sa.bindparam("task_id"))
STATUS = sa.select(jobs.c.status).where(jobs.c.task_id == sa.bindparam("task_id"))
