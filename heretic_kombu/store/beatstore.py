"""BeatStore: the statements periodic tasks (``heretic beat``) run.

Beat keeps one row per ``beat_schedule`` entry in ``heretic_beat_entries`` and writes
each firing as an ordinary ``heretic_jobs`` row. Deciding and writing a firing happen in
one transaction that holds beat's lock (a PostgreSQL advisory lock; SQLite's write lock,
taken by ``BEGIN IMMEDIATE``, on the embedded default), so with several beats running
each due time is fired by exactly one of them. The job row is inserted with
``ON CONFLICT (task_id) DO NOTHING`` and firings have deterministic task ids, so a
double firing is impossible even without the lock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from .jobstore import JobStore
from .rows import Job, NewJob, job_from_row, job_values, utcnow
from .schema import lock_for_init
from .tables import beat_entries, jobs

# PostgreSQL advisory lock held while a beat decides and writes firings ("hrbt").
_BEAT_LOCK_KEY = 0x68726274


@dataclasses.dataclass(frozen=True)
class EntryState:
    """One row of ``heretic_beat_entries``."""

    name: str
    task_name: str
    schedule: str
    last_run_at: dt.datetime | None
    total_run_count: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class EntrySpec:
    """What the configuration says of an entry: its name, task and schedule text."""

    name: str
    task_name: str
    schedule: str


@dataclasses.dataclass(frozen=True)
class Firing:
    """A firing beat decided on: the entry, the job row to write, and its new ``last_run_at``."""

    entry: str
    job: NewJob
    run_at: dt.datetime


#: Given the entries' current rows and the time, under the lock: what to fire.
Planner = Callable[[dict[str, EntryState], dt.datetime], Sequence[Firing]]


class BeatStore:
    """Beat's state and firings, through the job store's engine."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._ready = False

    def ensure_table(self) -> None:
        """Create ``heretic_beat_entries`` if missing: a database made by a version
        without beat has the job tables at the current schema version but not this one."""
        if self._ready:
            return
        self.store.ensure_schema()
        with self.store.write() as conn:
            lock_for_init(conn)
            beat_entries.create(conn, checkfirst=True)
        self._ready = True

    def sync(self, specs: Iterable[EntrySpec]) -> dict[str, str]:
        """Record the configured entries; return what changed, ``{name: "new" | "changed"}``.

        A new entry gets a row (``created_at`` now, never run). An entry whose task or
        schedule changed keeps its ``last_run_at`` and run count; its next due time is
        computed from the new schedule. Rows of entries no longer configured stay.
        """
        self.ensure_table()
        changes: dict[str, str] = {}
        with self.store.write() as conn:
            self._lock(conn)
            existing = self._states(conn)
            now = utcnow()
            for spec in specs:
                old = existing.get(spec.name)
                if old is None:
                    conn.execute(
                        _upsert(conn)(beat_entries)
                        .values(
                            name=spec.name,
                            task_name=spec.task_name,
                            schedule=spec.schedule,
                            total_run_count=0,
                            created_at=now,
                            updated_at=now,
                        )
                        .on_conflict_do_nothing(index_elements=["name"])
                    )
                    changes[spec.name] = "new"
                elif (old.task_name, old.schedule) != (spec.task_name, spec.schedule):
                    conn.execute(
                        beat_entries.update()
                        .where(beat_entries.c.name == spec.name)
                        .values(task_name=spec.task_name, schedule=spec.schedule, updated_at=now)
                    )
                    changes[spec.name] = "changed"
        return changes

    def fire(self, plan: Planner) -> tuple[list[Job], dict[str, EntryState]]:
        """Decide and write firings in one locked transaction.

        ``plan`` gets the entries' rows as they are once the lock is held, and the time
        then; each firing it returns becomes a job row (unless a row with its task id
        exists already) and moves its entry's ``last_run_at`` and run count. Returns the
        job rows written, for the caller to publish after the commit, and the entries'
        rows as committed.
        """
        self.ensure_table()
        written: list[Job] = []
        with self.store.write() as conn:
            self._lock(conn)
            current = self._states(conn)
            now = utcnow()
            firings = plan(current, now)
            postgres = conn.dialect.name == "postgresql"
            for firing in firings:
                row = conn.execute(
                    _upsert(conn)(jobs)
                    .values(**job_values(firing.job, postgres))
                    .on_conflict_do_nothing(index_elements=["task_id"])
                    .returning(*jobs.c)
                ).first()
                if row is not None:
                    written.append(job_from_row(row))
                conn.execute(
                    beat_entries.update()
                    .where(beat_entries.c.name == firing.entry)
                    .values(
                        last_run_at=firing.run_at,
                        # A task id already present means this due time was fired before.
                        total_run_count=beat_entries.c.total_run_count + (1 if row else 0),
                        updated_at=now,
                    )
                )
            after = self._states(conn) if firings else current
        return written, after

    def entries(self) -> list[EntryState]:
        """Every entry's row, configured or not, by name."""
        self.ensure_table()
        with self.store.read() as conn:
            return sorted(self._states(conn).values(), key=lambda e: e.name)

    @staticmethod
    def _lock(conn: Connection) -> None:
        # SQLite: the transaction began with BEGIN IMMEDIATE, which is the lock.
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_BEAT_LOCK_KEY)))

    @staticmethod
    def _states(conn: Connection) -> dict[str, EntryState]:
        states = {}
        for row in conn.execute(sa.select(beat_entries)):
            data = dict(row._mapping)
            for key in ("last_run_at", "created_at", "updated_at"):
                value = data[key]
                if value is not None and value.tzinfo is None:
                    data[key] = value.replace(tzinfo=dt.timezone.utc)
            states[row.name] = EntryState(**data)
        return states


def _upsert(conn: Connection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
