"""``app.jobs``: the job history from Python — search, inspect, retry, cancel, purge, prune.

The same operations back ``heretic jobs …`` and the dashboard. Searching takes the
filters of :class:`~heretic_kombu.search.JobQuery` and returns one
:class:`~heretic_kombu.search.Page` at a time (keyset pagination: pass
``page.next_cursor`` as ``after=``), so even a table of millions of rows is read a page
at a time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import canvas, protocol
from .broker.deadletters import DeadLetter, DeadLetters
from .core.protocols import AppLike
from .exceptions import MalformedMessage
from .search import JobQuery, Page, moment, parse_duration
from .status import Status
from .store.history import RETRYABLE, History, Stats

if TYPE_CHECKING:
    from .store import Job


class Jobs:
    """The job history of one app."""

    def __init__(self, app: AppLike) -> None:
        self.app = app

    @property
    def history(self) -> History:
        return History(self.app.store)

    def search(self, **filters: Any) -> Page:
        """One page of jobs, newest first unless ``order_by`` says otherwise.

        Filters: ``status`` (one or several), ``task``, ``queue``, ``payload`` (JSON
        containment, e.g. ``{"kwargs": {"to": "bob"}}``), ``where`` (conditions such as
        ``("kwargs.amount", ">", 100)`` or ``"kwargs.to=bob"``), ``error_contains``,
        ``since``/``until`` (datetimes or durations ago: ``"2h"``), ``root_id``,
        ``group_id``; ``order_by`` (``-created_at``, the default, ``created_at``, ``-id``,
        ``id``),
        ``limit`` and ``after`` (a previous page's ``next_cursor``).
        Raises ``ValueError`` for a bad filter, before any SQL is run.
        """
        return self.history.search(JobQuery.build(**filters))

    def iterate(self, **filters: Any) -> Iterator[Job]:
        """Every matching job, page after page."""
        page = self.search(**filters)
        while True:
            yield from page.rows
            if page.next_cursor is None:
                return
            page = self.search(**{**filters, "after": page.next_cursor})

    def count(self, **filters: Any) -> int:
        """How many jobs match the filters."""
        return self.history.count(JobQuery.build(**filters))

    def get(self, key: str | int) -> Job | None:
        """A job by task id or row id, or ``None``."""
        return self.history.get(key)

    def retry(self, task_id: str) -> bool:
        """Send a failed or revoked job again (same id, one more attempt, logged);
        ``False`` if it cannot be (see :meth:`retry_refusal`)."""
        return self._retry([task_id]) == 1

    def retry_refusal(self, job: Job) -> str | None:
        """Why ``job`` cannot be retried, or ``None`` if it can: it is not failed or
        revoked, or it is a workflow step that never ran and whose parent's result is
        not there to run it with."""
        if job.status not in RETRYABLE:
            return f"it is {job.status}; only failed or revoked jobs can be retried"
        return self._retry_plan(job).refused

    def requeue(self, task_id: str) -> bool:
        """Publish a ``queued`` or ``started`` job again whose message the broker lost
        (logged; a copy still delivered is harmless: the claim decides)."""
        rows = self.history.requeue([task_id])
        self.app.deliver_all(rows)
        return len(rows) == 1

    def _retry_plan(self, job: Job) -> canvas.RetryPlan:
        """What retrying ``job`` takes so that its workflow resumes."""
        if not job.workflow and not canvas.never_ran(job):
            return canvas.RetryPlan()
        parent = self.history.get(job.parent_id) if job.parent_id else None
        group = canvas.retry_chord_group(job)
        chord_state = self.history.chord_body(group) if group else (None, False)
        return canvas.plan_retry(self.app, job, parent, chord_state)

    def retry_matching(self, **filters: Any) -> int:
        """Retry every failed/revoked job matching the filters; returns how many."""
        statuses = filters.pop("status", None) or RETRYABLE
        total = 0
        ids: list[str] = []
        for job in self.iterate(status=statuses, limit=500, **filters):
            if job.status in RETRYABLE:
                ids.append(job.task_id)
            if len(ids) >= 500:
                total += self._retry(ids)
                ids = []
        return total + self._retry(ids)

    def _retry(self, task_ids: list[str]) -> int:
        """Retry ``task_ids``: plain rows in one statement; workflow steps one by one,
        so that their workflow resumes (or not at all, if refused)."""
        plain: list[str] = []
        rows: list[Job] = []
        for task_id in task_ids:
            job = self.history.get(task_id)
            if job is None or job.status not in RETRYABLE:
                continue
            planned = self._retry_plan(job)
            if planned.refused:
                continue
            if planned.plain:
                plain.append(job.task_id)
                continue
            rows += self.history.retry_step(
                job.task_id,
                forget=planned.forget,
                chord_group=planned.chord_group,
                payload=planned.payload,
            )
        rows += self.history.retry(plain)
        self.app.deliver_all(rows)
        return len(rows)

    def cancel(self, task_id: str) -> bool:
        """Revoke a job that has not started (``app.control.revoke``); ``False`` if it
        had already started or finished."""
        return self.app.store.revoke(task_id, False, "", by="operator") == "revoked"

    def purge(self, **filters: Any) -> int:
        """Delete the *finished* jobs matching the filters; returns how many."""
        return self.history.delete(JobQuery.build(**filters))

    def prune(
        self,
        older_than: dt.timedelta | str,
        status: str | list[str] | tuple[str, ...] | None = None,
        batch_size: int = 1000,
    ) -> int:
        """Delete finished jobs created more than ``older_than`` ago (``"30d"``), in
        batches of ``batch_size`` rows per transaction; returns how many."""
        age = parse_duration(older_than) if isinstance(older_than, str) else older_than
        query = JobQuery.build(status=status, until=moment(age))
        return self.history.delete(query, batch_size=batch_size)

    # -- dead letters ------------------------------------------------------------

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """The dead letters of ``queue`` (the default queue if not given), left in place."""
        return DeadLetters(self.app.broker, queue or self.app.settings.default_queue).list(limit)

    def replay_dead(
        self,
        queue: str | None = None,
        *,
        task_ids: Iterable[str] | None = None,
        positions: Iterable[int] | None = None,
    ) -> tuple[int, list[str]]:
        """Send dead letters back to work: all of them, or those with these task ids or
        positions. A message whose job has a row re-runs the row (retried, logged, and
        published from the table); one without a row (from a Celery client) is published
        again as it was. A message that still cannot be decoded stays dead. Returns how
        many were replayed and why the others were not."""
        wanted_ids = set(task_ids or ())
        wanted_positions = set(positions or ())
        refused: list[str] = []

        def select(letter: DeadLetter) -> bool:
            if (wanted_ids or wanted_positions) and not (
                letter.task_id in wanted_ids or letter.position in wanted_positions
            ):
                return False
            try:
                protocol.decode(letter.body, letter.content_type, letter.headers)
            except MalformedMessage as exc:
                refused.append(f"#{letter.position}: {exc} (it would be dead-lettered again)")
                return False
            return True

        def send(letter: DeadLetter) -> None:
            message = protocol.decode(letter.body, letter.content_type, letter.headers)
            row = self.app.store.get(message.id)
            if row is None:
                self.app.broker.publish_encoded(
                    letter.body_text,
                    {k: v for k, v in letter.headers.items() if not k.startswith("x-")},
                    {"correlation_id": message.id},
                    letter.queue,
                )
                return
            if row.status == Status.QUEUED:  # it never ran (e.g. no worker knew its task)
                rows = self.history.requeue([row.task_id], who="dead-letter replay")
            else:
                rows = self.history.retry([row.task_id], who="dead-letter replay")
            self.app.deliver_all(rows)

        dead = DeadLetters(self.app.broker, queue or self.app.settings.default_queue)
        return dead.replay(select, send), refused

    def stats(self, since: dt.datetime | dt.timedelta | str = "1h") -> Stats:
        """Counts per task and status, jobs per minute, run-time p50/p95 per task."""
        start = moment(since)
        assert start is not None
        return self.history.stats(start)
