"""The writes that several job store operations share: new rows, the claim, the record.

Each runs on a connection whose transaction its caller owns (the store's own, or a
user's for a transactional enqueue), so that a job's outcome and what it sends next
commit together: :meth:`RowWriter.insert_rows` writes new rows and chord counters,
:meth:`RowWriter.claim` takes runnable jobs for a worker, :meth:`RowWriter.record`
records finished attempts and writes their follow-ups (callbacks, chain steps, a chord's
body). :meth:`RowWriter.turn` is the worker's record and claim as one prepared statement
on PostgreSQL, its own transaction.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..status import Status
from .engine import Connections
from .rows import (
    Attempt,
    ChordCounter,
    Job,
    NewJob,
    NextSteps,
    job_from_row,
    json_text,
    new_row,
    read_jobs,
    readable_rows,
    record_params,
    row_params,
    turn_params,
    utcnow,
)
from .statements import (
    BULK_INSERT_RETURNING,
    CLAIM,
    EXECUTE_TURN,
    INSERT_BATCH,
    INSERTS,
    PREPARE_TURN,
    RECORD_BATCH,
    TURN_IS_PREPARED,
    TURN_NOTIFIED,
    TURN_TASK_ID,
    append_log,
    bulk_insert_parts,
    current_attempt,
)
from .tables import chords, jobs


class RowWriter:
    """The shared writes of one :class:`~.jobstore.JobStore`, on its connections."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections
        self._bulk_insert: tuple[str, list[str]] | None = None  # see _bulk_insert_sql
        #: Driver connections on which the worker's turn statement is prepared.
        self._turn_prepared: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- new rows ---------------------------------------------------------

    def insert_rows(
        self, conn: Connection, new_jobs: Sequence[NewJob], chord_counters: Sequence[ChordCounter]
    ) -> list[Job]:
        """Write ``new_jobs`` and ``chord_counters`` on ``conn``; return the new rows.

        ``chord_counters`` have ``group_id``, ``total`` and ``body`` (encoded JSON)."""
        # JSON goes in as text, so that it is stored the same whichever engine (ours, or
        # the caller's for a transactional enqueue) sends it.
        postgres = conn.dialect.name == "postgresql"
        for counter in chord_counters:
            conn.execute(
                chords.insert().values(
                    group_id=counter.group_id,
                    remaining=counter.total,
                    total=counter.total,
                    body=json_text(counter.body, postgres),
                    created_at=utcnow(),
                )
            )
        if not new_jobs:
            return []
        params = [row_params(job) for job in new_jobs]
        ids: Sequence[int]
        if conn.dialect.driver == "psycopg2":
            ids = self._insert_many(conn, params)
        else:
            # SQLAlchemy sends multi-row INSERTs (its "insertmanyvalues", up to 1000
            # rows a statement) and returns the ids in order.
            ids = [row.id for row in conn.execute(INSERTS[postgres], params)]
        return [new_row(row_id, values) for row_id, values in zip(ids, params, strict=True)]

    def _insert_many(self, conn: Connection, params: list[dict[str, Any]]) -> list[int]:
        """PostgreSQL through psycopg2 (ours, or the caller's connection): the rows go
        in ``INSERT … VALUES (…), (…)`` statements of up to :data:`INSERT_BATCH` rows,
        sent as driver SQL (the row's SQL rendered once, numbered per row) so that the
        values are bound by the driver, not one by one by SQLAlchemy's statement
        compiler: measured here, 40 instead of 80 µs of Python per row of a
        ``group()``. Each new id comes back with its ``task_id``: PostgreSQL does not
        promise ``RETURNING`` in the order of ``VALUES``."""
        head, rows = self._bulk_insert_sql()
        ids: list[int] = []
        for start in range(0, len(params), INSERT_BATCH):
            batch = params[start : start + INSERT_BATCH]
            values = {
                f"{name}__{number}": value
                for number, one in enumerate(batch)
                for name, value in one.items()
            }
            returned = conn.exec_driver_sql(
                f"{head} VALUES {', '.join(rows[: len(batch)])}{BULK_INSERT_RETURNING}",
                values,
            )
            id_of = {row.task_id: row.id for row in returned}
            ids += [id_of[one["task_id"]] for one in batch]
        return ids

    def _bulk_insert_sql(self) -> tuple[str, list[str]]:
        """The one-row INSERT's driver SQL cut into ``INSERT INTO … (columns)`` and the
        ``(…)`` of each row's values, its parameters numbered ``name__0`` to
        ``name__999``; made once."""
        if self._bulk_insert is None:
            self._bulk_insert = bulk_insert_parts(self._connections.driver_sql(INSERTS[True]))
        return self._bulk_insert

    # -- the claim and the record of attempts --------------------------

    def turn(
        self, attempts: Sequence[Attempt], task_ids: Sequence[str], worker: str
    ) -> tuple[list[list[Job] | None], dict[str, Job]]:
        """PostgreSQL, a turn with no follow-up to write (no workflow step): the record
        and the claim as one statement (:data:`~.statements.TURN`), sent to the driver's cursor in
        autocommit. One statement is its own transaction, committed (durably) before
        the reply comes back: one round trip instead of four (BEGIN, record, claim,
        COMMIT), without SQLAlchemy's execution layer. The two UPDATEs read one snapshot
        and touch disjoint rows (the record only ``started`` rows, the claim only
        runnable ones), so neither can undo or hide the other's change.

        The statement is prepared once per connection (``PREPARE``), so the server
        does not parse and plan it again at every turn: measured, about a third of the
        database's CPU time for a turn of ten jobs."""
        params = turn_params(attempts, task_ids, worker, utcnow())
        with self._connections.driver_cursor() as cursor:
            driver = cursor.connection
            try:
                if driver not in self._turn_prepared:
                    _prepare_turn(cursor)
                    self._turn_prepared.add(driver)
                cursor.execute(EXECUTE_TURN, params)
                # A claimed row that cannot be read (a timestamp past year 9999 in UTC)
                # is left out: its message finds nothing claimed, and the worker sets the
                # job aside (Worker._unclaimed); the other rows go on.
                rows, _ = readable_rows(cursor)
            except BaseException:
                # Whatever failed, look again before the next EXECUTE on it.
                self._turn_prepared.discard(driver)
                raise
        recorded: set[str] = set()
        claimed: dict[str, Job] = {}
        for row in rows:
            task_id = row.pop(TURN_TASK_ID)
            del row[TURN_NOTIFIED]
            if row["id"] is None:  # a recorded attempt: its task id, then NULLs
                recorded.add(task_id)
            else:  # a claimed job: its task id, then every column of Job, by name
                claimed[task_id] = Job(**row)
        return [[] if item.task_id in recorded else None for item in attempts], claimed

    def claim(self, conn: Connection, task_ids: Sequence[str], worker: str) -> dict[str, Job]:
        """Claim the runnable jobs of ``task_ids`` for ``worker`` (:data:`~.statements.CLAIM`);
        the rows claimed, by task id."""
        if not task_ids:
            return {}
        now = utcnow()
        params = {"task_ids": list(task_ids), "worker": worker, "now": now}
        try:
            rows = [job_from_row(row) for row in conn.execute(CLAIM, params)]
        except (ValueError, OverflowError):
            # A claimed row cannot be read back (a timestamp past year 9999 in UTC): the
            # claim stands; read the claimed rows one by one and leave the unreadable
            # out, for the worker to set aside (Worker._unclaimed).
            claimed = sa.select(jobs).where(
                jobs.c.task_id.in_(list(task_ids)),
                jobs.c.status == Status.STARTED,
                jobs.c.worker == worker,
                jobs.c.started_at == now,
            )
            rows = read_jobs(conn, claimed, jobs).jobs
        return {row.task_id: row for row in rows}

    def record(self, conn: Connection, attempts: Sequence[Attempt]) -> list[list[Job] | None]:
        """Record ``attempts`` and write what they send next; per attempt, in order,
        ``None`` if it was no longer current (nothing written), else its follow-up rows."""
        if not attempts:
            return []
        answers: list[list[Job] | None] = []
        if conn.dialect.name == "postgresql":
            recorded = self._record_batch(conn, attempts)  # also notifies heretic_done
            for item in attempts:
                current = item.task_id in recorded
                answers.append(self.follow_up(conn, item.then) if current else None)
        else:
            for item in attempts:
                answers.append(self._record_one(conn, item))
        return answers

    def _record_batch(self, conn: Connection, attempts: Sequence[Attempt]) -> set[str]:
        """PostgreSQL: record every attempt with one UPDATE over arrays of their values
        (one statement for the batch, whatever its size), which also notifies
        ``heretic_done`` of each job that ended; returns the task ids whose attempt was
        current, and so recorded. The same columns as :meth:`_record_one`."""
        rows = conn.execute(RECORD_BATCH, record_params(attempts, utcnow()))
        return {str(row.task_id) for row in rows}

    def _record_one(self, conn: Connection, item: Attempt) -> list[Job] | None:
        outcome, now = item.outcome, utcnow()
        values: dict[str, Any] = {
            "status": outcome.status,
            "updated_at": now,
            "attempt_logs": append_log(outcome.log_line, self._connections.is_postgresql),
            "error": outcome.error,
            "traceback": outcome.traceback,
        }
        if outcome.status != Status.IGNORED:  # Ignore stores nothing: progress stays
            values["result"] = outcome.result
        if outcome.status == Status.RETRYING:
            values["eta"] = outcome.eta
        else:
            values["finished_at"] = now
        if outcome.max_attempts is not None:
            values["max_attempts"] = outcome.max_attempts
        if outcome.payload is not None:
            values["payload"] = outcome.payload
        result = conn.execute(
            jobs.update().where(current_attempt(item.task_id, item.attempt)).values(**values)
        )
        return self.follow_up(conn, item.then) if result.rowcount else None

    def follow_up(self, conn: Connection, then: NextSteps | None) -> list[Job]:
        """Write what a finished job sends next, inside the transaction that finished it."""
        if then is None:
            return []
        new_jobs, counters = list(then.jobs), list(then.chords)
        if then.chord_group is not None:
            more_jobs, more_counters = self._chord_step(conn, then)
            new_jobs += more_jobs
            counters += more_counters
        return self.insert_rows(conn, new_jobs, counters)

    def _chord_step(self, conn: Connection, then: NextSteps) -> tuple[list[NewJob], list[Any]]:
        """Count a chord header job that ended. The job that takes the counter to zero
        plans the body with the header's results; the first failed one sets it to -1
        and fails the body. Row locks (PostgreSQL) or the write lock (SQLite) make
        exactly one job see each transition."""
        group_id = then.chord_group
        if then.chord_succeeded:
            row = conn.execute(
                chords.update()
                .where(chords.c.group_id == group_id, chords.c.remaining > 0)
                .values(remaining=chords.c.remaining - 1)
                .returning(chords.c.remaining, chords.c.body)
            ).first()
            if row is None or row.remaining != 0 or then.complete_chord is None:
                return [], []
            members = conn.execute(
                sa.select(jobs.c.result, jobs.c.workflow).where(
                    jobs.c.group_id == group_id, jobs.c.status == Status.SUCCEEDED
                )
            ).all()
            ordered = sorted(members, key=lambda m: (m.workflow or {}).get("group_index", 0))
            return then.complete_chord(row.body, [m.result for m in ordered])
        row = conn.execute(
            chords.update()
            .where(chords.c.group_id == group_id, chords.c.remaining > 0)
            .values(remaining=-1)
            .returning(chords.c.body)
        ).first()
        if row is None or then.fail_chord is None:
            return [], []
        return then.fail_chord(row.body)


def _prepare_turn(cursor: Any) -> None:
    """Prepare :data:`~.statements.TURN` on the cursor's connection (PostgreSQL), unless
    it already is: a prepared statement lives as long as the session (like the LISTEN
    of :class:`~.listener.DoneListener`, it needs a connection of its own, not one
    shared per transaction by a pooler)."""
    cursor.execute(TURN_IS_PREPARED)
    if cursor.fetchone() is not None:
        return
    cursor.execute(PREPARE_TURN)
