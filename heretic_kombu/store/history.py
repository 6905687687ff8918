"""The job history: searching, counting, and the operator's commands (retry, purge, prune).

Kept apart from :mod:`.jobstore` (the lifecycle statements a worker and a producer run)
because these serve people: the CLI, the dashboard and ``app.jobs``. Every value from a
user is a bound parameter; JSON paths come from :class:`~heretic_kombu.search.Where`,
which has already checked them. PostgreSQL and SQLite differences live here, as in
the job store.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from .. import serialization
from ..search import JobQuery, Page, Where, decode_cursor, encode_cursor
from ..status import TERMINAL, Status
from .jobstore import JobStore
from .rows import Job, job_from_row, read_jobs, stamp, utcnow
from .statements import append_log
from .tables import chords, jobs

#: Statuses an operator may send again (``heretic jobs retry``).
RETRYABLE = (Status.FAILED, Status.REVOKED)
#: Statuses whose message an operator may publish again, if the broker lost it
#: (``heretic jobs retry --requeue``).
REQUEUABLE = (Status.QUEUED, Status.STARTED)


@dataclasses.dataclass(frozen=True)
class Stats:
    """What ``heretic jobs stats`` shows."""

    counts: dict[tuple[str, str], int]  # (task, status) -> jobs
    per_minute: list[tuple[dt.datetime, int, int]]  # minute, finished, failed
    runtimes: dict[str, tuple[float, float, int]]  # task -> (p50 s, p95 s, samples)


class History:
    """Search and operator commands over one :class:`JobStore`'s table."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    # -- search ------------------------------------------------------------------

    def search(self, query: JobQuery) -> Page:
        """One page of rows matching ``query``, with the cursor of the next page."""
        self.store.ensure_schema()
        column, _ = _order(query.order_by)
        with self.store.read() as conn:
            # A row that cannot be read back (a timestamp past year 9999 in UTC) is
            # left out of the page and named in its ``skipped``; the others are shown.
            read = read_jobs(conn, self.select(query), jobs)
        cursor = None
        if read.cut(query.limit):
            if column is jobs.c.id:
                cursor = encode_cursor(read.last_id(), read.last_id())
            elif read.jobs:  # an unreadable last row: the last readable one's place
                last = read.jobs[-1]
                cursor = encode_cursor(getattr(last, column.name), last.id)
        return Page(read.jobs, cursor, skipped=list(read.unreadable))

    def select(self, query: JobQuery) -> Any:
        """The statement of one page (one row more than the limit, to know if there is a
        next page); also what ``EXPLAIN`` is asked about in the benchmark."""
        column, descending = _order(query.order_by)
        statement = sa.select(jobs).where(*self._conditions(query))
        if query.after is not None:
            value, row_id = decode_cursor(query.after)
            if column is not jobs.c.id:
                value = _parse_time(value)
            key = sa.tuple_(column, jobs.c.id) if column is not jobs.c.id else jobs.c.id
            bound = (
                sa.tuple_(sa.literal(value), sa.literal(row_id))
                if column is not jobs.c.id
                else row_id
            )
            statement = statement.where(key < bound if descending else key > bound)
        orders = [column.desc() if descending else column.asc()]
        if column is not jobs.c.id:
            orders.append(jobs.c.id.desc() if descending else jobs.c.id.asc())
        return statement.order_by(*orders).limit(query.limit + 1)

    def count(self, query: JobQuery) -> int:
        """How many rows match ``query`` (ignoring its limit and cursor)."""
        self.store.ensure_schema()
        statement = sa.select(sa.func.count()).select_from(jobs).where(*self._conditions(query))
        with self.store.read() as conn:
            return int(conn.execute(statement).scalar_one())

    def _conditions(self, query: JobQuery) -> list[Any]:
        postgres = self.store.is_postgresql
        found: list[Any] = []
        if query.statuses:
            found.append(jobs.c.status.in_(list(query.statuses)))
        if query.task:
            found.append(jobs.c.task_name == query.task)
        if query.queue:
            found.append(jobs.c.queue_name == query.queue)
        if query.root_id:
            found.append(jobs.c.root_id == query.root_id)
        if query.group_id:
            found.append(jobs.c.group_id == query.group_id)
        if query.since is not None:
            found.append(jobs.c.created_at >= query.since)
        if query.until is not None:
            found.append(jobs.c.created_at < query.until)
        if query.error_contains:
            pattern = "%" + _escape_like(query.error_contains) + "%"
            found.append(jobs.c.error.ilike(pattern, escape="\\"))
        if query.payload is not None:
            found.append(_contains(query.payload, postgres))
        for condition in query.where:
            found.append(_where(condition, postgres))
        return found

    def get(self, key: str | int) -> Job | None:
        """A row by task id (UUID) or by row id; ``None`` if there is none."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            return self.store.get_by_id(int(key))
        try:
            uuid.UUID(key)
        except ValueError:  # not a UUID: no such job
            return None
        # A database that cannot be reached, or a row that cannot be read, is an error
        # the caller reports (StoreError), not "no such job".
        return self.store.get(key)

    # -- operator commands ---------------------------------------------------

    def retry(self, task_ids: Sequence[str], who: str = "operator") -> list[Job]:
        """Send failed or revoked jobs again, keeping their id and history.

        Each row goes back to ``pending`` with one more allowed attempt and an
        ``attempt_logs`` line saying who retried it (invariant 8: a terminal state only
        changes by an explicit, logged command). Returns the rows changed, for the caller
        to publish.
        """
        if not task_ids:
            return []
        now = utcnow()
        logged = append_log(f"{stamp(now)} retried by {who}", self.store.is_postgresql)
        with self.store.write() as conn:
            rows = conn.execute(
                jobs.update()
                .where(jobs.c.task_id.in_(list(task_ids)), jobs.c.status.in_(RETRYABLE))
                .values(
                    status=Status.PENDING,
                    max_attempts=jobs.c.attempts + 1,
                    eta=None,
                    expires_at=None,
                    finished_at=None,
                    updated_at=now,
                    attempt_logs=logged,
                )
                .returning(*jobs.c)
            ).all()
        return [job_from_row(row) for row in rows]

    def retry_step(
        self,
        task_id: str,
        *,
        forget: Sequence[str] = (),
        chord_group: str | None = None,
        payload: serialization.RawJSON | None = None,
        who: str = "operator",
    ) -> list[Job]:
        """:meth:`retry` one workflow step so that its workflow resumes, in one commit.

        ``forget``: rows written failed for steps that never ran because this one failed
        (later chain steps, a chord's body), deleted if they still never ran, so the
        step's success writes them afresh rather than a second time. ``chord_group``: the
        chord this job counts toward; a chord failed by it waits again for its header
        jobs that have not succeeded. ``payload``: new arguments (a step that never ran,
        given its parent's result). Returns the row changed, for the caller to publish.
        """
        now = utcnow()
        logged = append_log(f"{stamp(now)} retried by {who}", self.store.is_postgresql)
        values: dict[str, Any] = {
            "status": Status.PENDING,
            "max_attempts": jobs.c.attempts + 1,
            "eta": None,
            "expires_at": None,
            "finished_at": None,
            "updated_at": now,
            "attempt_logs": logged,
        }
        if payload is not None:
            values["payload"] = payload
        with self.store.write() as conn:
            rows = conn.execute(
                jobs.update()
                .where(jobs.c.task_id == task_id, jobs.c.status.in_(RETRYABLE))
                .values(**values)
                .returning(*jobs.c)
            ).all()
            if not rows:
                return []
            never_ran = [other for other in forget if other != task_id]
            if never_ran:
                conn.execute(
                    jobs.delete().where(
                        jobs.c.task_id.in_(never_ran),
                        jobs.c.status == Status.FAILED,
                        jobs.c.attempts == 0,
                    )
                )
            if chord_group is not None:
                succeeded = (
                    sa.select(sa.func.count())
                    .select_from(jobs)
                    .where(jobs.c.group_id == chord_group, jobs.c.status == Status.SUCCEEDED)
                    .scalar_subquery()
                )
                conn.execute(
                    chords.update()
                    .where(chords.c.group_id == chord_group, chords.c.remaining < 0)
                    .values(remaining=chords.c.total - succeeded)
                )
        return [job_from_row(row) for row in rows]

    def chord_body(self, group_id: str) -> Any:
        """The body (a signature as JSON data) of chord ``group_id``, and whether the
        chord failed; ``(None, False)`` if there is no such chord."""
        with self.store.read() as conn:
            row = conn.execute(
                sa.select(chords.c.body, chords.c.remaining).where(chords.c.group_id == group_id)
            ).first()
        if row is None:
            return None, False
        body = row.body
        if isinstance(body, (str, bytes)):
            body = serialization.loads(body)
        return body, row.remaining < 0

    def requeue(self, task_ids: Sequence[str], who: str = "operator") -> list[Job]:
        """Publish again ``queued`` or ``started`` jobs whose message the broker lost.

        Each row goes back to ``pending`` (a started attempt stays counted, and one more
        is allowed), logged in its ``attempt_logs``; a copy of its message still in the
        broker, or its worker still running it, is made harmless by the claim (a
        superseded attempt records nothing). Returns the rows changed, to publish.
        """
        if not task_ids:
            return []
        now = utcnow()
        logged = append_log(
            f"{stamp(now)} retried by {who}: requeued, its message was lost",
            self.store.is_postgresql,
        )
        with self.store.write() as conn:
            rows = conn.execute(
                jobs.update()
                .where(jobs.c.task_id.in_(list(task_ids)), jobs.c.status.in_(REQUEUABLE))
                .values(
                    status=Status.PENDING,
                    max_attempts=sa.case(
                        (jobs.c.max_attempts > jobs.c.attempts, jobs.c.max_attempts),
                        else_=jobs.c.attempts + 1,
                    ),
                    eta=None,
                    worker=None,
                    updated_at=now,
                    attempt_logs=logged,
                )
                .returning(*jobs.c)
            ).all()
        return [job_from_row(row) for row in rows]

    def delete(self, query: JobQuery, batch_size: int = 1000) -> int:
        """Delete finished rows matching ``query``, ``batch_size`` rows per transaction so
        no lock is held for long. Unfinished jobs are never deleted."""
        finished = dataclasses.replace(
            query,
            statuses=tuple(s for s in (query.statuses or TERMINAL) if s in TERMINAL),
            after=None,
        )
        if not finished.statuses:
            return 0
        total = 0
        while True:
            with self.store.write() as conn:
                ids = (
                    sa.select(jobs.c.id)
                    .where(*self._conditions(finished))
                    .order_by(jobs.c.id)
                    .limit(batch_size)
                )
                deleted = conn.execute(jobs.delete().where(jobs.c.id.in_(ids))).rowcount
            total += deleted
            if deleted < batch_size:
                return total

    # -- statistics ------------------------------------------------------------

    def stats(self, since: dt.datetime, sample: int = 20_000) -> Stats:
        """Counts per task and status (all time), finished and failed jobs per minute
        since ``since``, and run-time percentiles per task over the newest ``sample``
        finished jobs since ``since``."""
        self.store.ensure_schema()
        with self.store.read() as conn:
            counts = {
                (task, status): n
                for task, status, n in conn.execute(
                    sa.select(jobs.c.task_name, jobs.c.status, sa.func.count())
                    .group_by(jobs.c.task_name, jobs.c.status)
                    .order_by(jobs.c.task_name, jobs.c.status)
                )
            }
            recent = conn.execute(
                sa.select(jobs.c.task_name, jobs.c.status, jobs.c.started_at, jobs.c.finished_at)
                .where(jobs.c.finished_at >= since)
                .order_by(jobs.c.finished_at.desc())
                .limit(sample)
            ).all()
        per_minute: dict[dt.datetime, list[int]] = {}
        durations: dict[str, list[float]] = {}
        for task, status, started, finished in recent:
            finished = _aware(finished)
            minute = finished.replace(second=0, microsecond=0)
            bucket = per_minute.setdefault(minute, [0, 0])
            bucket[0] += 1
            bucket[1] += status == Status.FAILED
            if started is not None and status in (Status.SUCCEEDED, Status.FAILED):
                durations.setdefault(task, []).append((finished - _aware(started)).total_seconds())
        runtimes = {task: _percentiles(values) for task, values in sorted(durations.items())}
        return Stats(
            counts=counts,
            per_minute=[(m, n, f) for m, (n, f) in sorted(per_minute.items())],
            runtimes=runtimes,
        )

    def queue_counts(self) -> dict[str, dict[str, int]]:
        """Unfinished jobs per queue and status (what is waiting where)."""
        self.store.ensure_schema()
        with self.store.read() as conn:
            rows = conn.execute(
                sa.select(jobs.c.queue_name, jobs.c.status, sa.func.count())
                .where(jobs.c.status.notin_(list(TERMINAL)))
                .group_by(jobs.c.queue_name, jobs.c.status)
            )
            found: dict[str, dict[str, int]] = {}
            for queue, status, n in rows:
                found.setdefault(queue, {})[status] = n
        return found

    def queue_names(self) -> list[str]:
        """Every queue that has a job in the table, sorted (the dashboard's queue list)."""
        self.store.ensure_schema()
        with self.store.read() as conn:
            names = sa.select(jobs.c.queue_name).distinct().order_by(jobs.c.queue_name)
            return [name for (name,) in conn.execute(names)]

    def workers_seen(self, since: dt.datetime) -> list[tuple[str, dt.datetime, int]]:
        """Workers that touched a job since ``since`` (claimed, heartbeated or finished
        it): name, last time seen, and jobs it is running now. There is no worker
        registry: an idle worker is not seen."""
        self.store.ensure_schema()
        running = sa.func.sum(sa.case((jobs.c.status == Status.STARTED, 1), else_=0))
        with self.store.read() as conn:
            rows = conn.execute(
                sa.select(jobs.c.worker, sa.func.max(jobs.c.updated_at), running)
                .where(jobs.c.worker.is_not(None), jobs.c.updated_at >= since)
                .group_by(jobs.c.worker)
                .order_by(jobs.c.worker)
            ).all()
        return [(name, _aware(last), int(busy or 0)) for name, last, busy in rows]

    def runtimes(self, since: dt.datetime, sample: int = 20_000) -> dict[str, list[float]]:
        """Run times in seconds per task of the newest ``sample`` jobs that succeeded or
        failed since ``since`` (the dashboard's run-time histogram)."""
        self.store.ensure_schema()
        with self.store.read() as conn:
            rows = conn.execute(
                sa.select(jobs.c.task_name, jobs.c.started_at, jobs.c.finished_at)
                .where(
                    jobs.c.finished_at >= since,
                    jobs.c.started_at.is_not(None),
                    jobs.c.status.in_([Status.SUCCEEDED, Status.FAILED]),
                )
                .order_by(jobs.c.finished_at.desc())
                .limit(sample)
            ).all()
        found: dict[str, list[float]] = {}
        for task, started, finished in rows:
            seconds = (_aware(finished) - _aware(started)).total_seconds()
            found.setdefault(task, []).append(max(seconds, 0.0))
        return found


def _order(order_by: str) -> tuple[Any, bool]:
    descending = order_by.startswith("-")
    return jobs.c[order_by.lstrip("-")], descending


def _contains(payload: Any, postgres: bool) -> Any:
    """``payload @> :value`` on PostgreSQL (the GIN index answers it); on SQLite, one
    ``json_extract`` equality per leaf of ``payload``."""
    if postgres:
        return jobs.c.payload.op("@>")(
            sa.cast(sa.literal(serialization.dumps(payload), sa.Text), postgresql.JSONB)
        )
    leaves = list(_leaves(payload, ()))
    if not leaves:
        return sa.true()
    return sa.and_(*(_where(Where(path, "=", value), postgres) for path, value in leaves))


def _leaves(value: Any, path: tuple[str, ...]) -> Any:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from _leaves(inner, (*path, str(key)))
    else:
        yield path, value


def _where(condition: Where, postgres: bool) -> Any:
    """One condition on a JSON path, compared with JSON's types (a number with a number,
    a string with a string)."""
    value = condition.value
    if postgres:
        if (
            condition.op == "="
            and condition.path[0] == "kwargs"
            and not any(part.isdigit() for part in condition.path)
            and not isinstance(value, (dict, list))
        ):
            # A containment test: answered by the GIN index on payload.
            nested: Any = value
            for part in reversed(condition.path):
                nested = {part: nested}
            return _contains(nested, postgres)
        target = jobs.c.payload.op("#>")(
            sa.cast(sa.literal(list(condition.path)), postgresql.ARRAY(sa.Text))
        )
        bound = sa.cast(sa.literal(serialization.dumps(value), sa.Text), postgresql.JSONB)
        return _compare(target, condition.op, bound)
    path = "$" + "".join(f"[{p}]" if p.isdigit() else f'."{p}"' for p in condition.path)
    extracted = sa.func.json_extract(jobs.c.payload, path)
    if isinstance(value, bool):
        return _compare(extracted, condition.op, sa.literal(int(value)))
    if value is None:
        kind = sa.func.json_type(jobs.c.payload, path)
        return kind == "null" if condition.op == "=" else kind != "null"
    if isinstance(value, (dict, list)):
        text = sa.func.json(sa.func.json_extract(jobs.c.payload, path))
        return _compare(text, condition.op, sa.func.json(serialization.dumps(value)))
    typed = sa.func.json_type(jobs.c.payload, path)
    kinds = ("text",) if isinstance(value, str) else ("integer", "real")
    return sa.and_(typed.in_(kinds), _compare(extracted, condition.op, sa.literal(value)))


def _compare(left: Any, op: str, right: Any) -> Any:
    return {
        "=": left == right,
        "!=": left != right,
        ">": left > right,
        ">=": left >= right,
        "<": left < right,
        "<=": left <= right,
    }[op]


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _percentiles(values: list[float]) -> tuple[float, float, int]:
    if len(values) == 1:
        return values[0], values[0], 1
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[94], len(values)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _parse_time(value: Any) -> dt.datetime:
    if not isinstance(value, str):
        raise ValueError("bad cursor for this order")
    return _aware(dt.datetime.fromisoformat(value))


__all__ = ["REQUEUABLE", "RETRYABLE", "History", "Stats"]
