"""A worker's upkeep: the scheduler's tick, retention, leases and the reconciler.

The tick (scheduler, prune, reconciler) runs from the worker's loop; the heartbeat,
which renews the leases of the jobs claimed here, runs on a thread of its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..exceptions import MessageRefused
from ..store import Job, RowError, utcnow
from .gates import Revocations

if TYPE_CHECKING:
    from ..app import Heretic

logger = logging.getLogger("heretic_kombu.worker")


class Upkeep:
    """Scheduler, prune, reconciler and heartbeat of one worker.

    ``running`` and ``unrecorded`` name the jobs whose lease this worker renews (they
    run here, or have ended with their outcome not committed yet); ``holds`` tells
    whether this worker holds a job's lease; ``release_lost`` makes a lost attempt due
    again (or fails it).
    """

    def __init__(
        self,
        app: Heretic,
        *,
        running: Callable[[], list[str]],
        unrecorded: Callable[[], list[str]],
        holds: Callable[[str], bool],
        release_lost: Callable[[Job, str], bool],
        revocations: Revocations,
        queues: list[str] | None = None,
    ) -> None:
        settings = app.settings
        #: The queues this worker consumes: those whose lost messages it looks for.
        self.queues = list(queues or [])
        self.queued_timeout = dt.timedelta(seconds=settings.queued_timeout)
        self._next_lost_check = time.monotonic() + min(
            settings.queued_timeout / 4, settings.heartbeat_interval
        )
        self._app = app
        self._running = running
        self._unrecorded = unrecorded
        self._holds = holds
        self._release_lost = release_lost
        self._revocations = revocations
        self.scheduler_interval = settings.scheduler_interval
        self.heartbeat_interval = settings.heartbeat_interval
        self.lease_timeout = dt.timedelta(seconds=settings.lease_timeout)
        self.pending_timeout = dt.timedelta(seconds=settings.pending_timeout)
        self._next_prune = time.monotonic() + min(60.0, settings.prune_interval)
        self._next_reconcile = 0.0
        #: When the scheduler next publishes due jobs (monotonic).
        self.next_tick = 0.0
        self._heartbeat_stop = threading.Event()

    def publish_soon(self) -> None:
        """Have the scheduler publish due jobs with this loop turn, not at its next tick."""
        self.next_tick = 0.0

    # -- scheduler -------------------------------------------------------------------

    def tick(self) -> None:
        if time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + self.heartbeat_interval
            self._reconcile()
        if time.monotonic() >= self._next_prune:
            self._prune()
        if self.queued_timeout and time.monotonic() >= self._next_lost_check:
            self._find_lost_messages()
        if time.monotonic() < self.next_tick:
            return
        self.next_tick = time.monotonic() + self.scheduler_interval
        try:
            count, errors, set_aside = self._app.store.publish_due(
                self._app.publish_jobs, refused=_refused
            )
        except Exception as exc:  # broker or database down: try again next tick
            logger.warning("scheduler: publishing due jobs failed (%r)", exc)
            return
        if count:
            logger.info("scheduler: published %d due job(s)", count)
        for task_id, reason in set_aside:  # once each: the row is failed now
            logger.error("scheduler: job %s set aside (failed): %s", task_id, reason)
        if errors:
            logger.warning(
                "scheduler: %d due job(s) not published, tried again next time (%r)",
                len(errors),
                errors[0],
            )

    def _prune(self) -> None:
        """Retention: delete finished jobs older than ``prune_older_than`` (if set), a
        batch per transaction, like ``heretic prune``."""
        settings = self._app.settings
        self._next_prune = time.monotonic() + settings.prune_interval
        if not settings.prune_older_than:
            return
        try:
            deleted = self._app.jobs.prune(
                settings.prune_older_than, status=settings.prune_status_list
            )
        except Exception as exc:  # database down: the next round tries again
            logger.warning("pruning failed (%r)", exc)
            return
        if deleted:
            logger.info(
                "pruned %d %s job(s) older than %s",
                deleted,
                "/".join(settings.prune_status_list),
                settings.prune_older_than,
            )

    def _find_lost_messages(self) -> None:
        """Publish again ``queued`` rows whose message the broker lost (a queue deleted,
        or a broker restarted without its data): rows ``queued`` for longer than
        ``queued_timeout`` in a queue where the broker holds fewer ready messages than
        there are ``queued`` rows; at most ``queued_republish_limit`` per pass."""
        settings = self._app.settings
        # Every quarter of the timeout, no more often than the reconciler.
        self._next_lost_check = time.monotonic() + max(
            self.heartbeat_interval, settings.queued_timeout / 4
        )
        try:
            found = self._app.store.requeue_lost_queued(
                self.queues,
                utcnow() - self.queued_timeout,
                self._app.broker.queue_size,
                settings.queued_republish_limit,
            )
        except Exception as exc:  # broker or database down: the next pass tries again
            logger.warning("reconciler: looking for lost messages failed (%r)", exc)
            return
        for queue, count in found.items():
            if count:
                logger.warning(
                    "reconciler: %d job(s) queued for over %ss in %s, whose messages the"
                    " broker no longer holds, will be published again",
                    count,
                    settings.queued_timeout,
                    queue,
                )
                self.next_tick = 0.0

    # -- leases and the reconciler -----------------------------------------------------

    def heartbeat_thread(self) -> threading.Thread:
        """The heartbeat's thread, not started; :meth:`stop` ends it."""
        return threading.Thread(target=self._heartbeat_loop, name="heretic-heartbeat", daemon=True)

    def stop(self) -> None:
        self._heartbeat_stop.set()

    def _heartbeat_loop(self) -> None:
        """Renew the lease of every running job, from a thread of its own so that a long
        job in the solo pool (which blocks the main loop) still keeps its lease."""
        while not self._heartbeat_stop.wait(self.heartbeat_interval):
            try:
                running = self._running()
                self._app.store.heartbeat(running + self._unrecorded())
                self._revocations.look(running)
            except Exception as exc:  # the next beat tries again; a lease has slack
                logger.warning("heartbeat failed (%r)", exc)

    def _reconcile(self) -> None:
        """Retry jobs whose worker stopped renewing their lease, and republish rows left
        ``pending`` by a producer whose publish failed or who died after the commit.

        One row that cannot be read or written (a value out of its column's range, a
        timestamp past year 9999 in UTC) is set aside, failed with the reason, and the
        others are handled; only a database that cannot be reached ends the pass."""
        store = self._app.store
        try:
            now = utcnow()
            lost = store.find_lost(now - self.lease_timeout)
            for bad in lost.unreadable:
                self._set_aside(bad.task_id, f"row cannot be read: {bad.reason}")
            for row in lost.jobs:
                if self._holds(row.task_id):
                    continue
                try:
                    self._release_lost(row, f"no heartbeat since {row.updated_at:%H:%M:%S}")
                except RowError as exc:
                    self._set_aside(row.task_id, f"lost attempt cannot be recorded: {exc}")
                self.next_tick = 0.0  # publish it with this loop turn's scheduler
            requeued = store.requeue_stale_pending(now - self.pending_timeout)
        except Exception as exc:  # database down: the next turn tries again
            logger.warning("reconciler: %r", exc)
            return
        if requeued:
            logger.warning("reconciler: %d job(s) left pending will be published", requeued)
            self.next_tick = 0.0

    def _set_aside(self, task_id: str, reason: str) -> None:
        """Fail a job the reconciler cannot handle, with ``reason``, logged once (the
        failed row is not found again)."""
        try:
            failed = self._app.store.set_aside(task_id, reason)
        except RowError as exc:
            logger.error("reconciler: job %s cannot be set aside either (%s)", task_id, exc)
            return
        if failed:
            logger.error("reconciler: job %s set aside (failed): %s", task_id, reason)


def _refused(error: BaseException) -> str | None:
    """Why a due job can never be published (its job is then failed), or ``None`` if
    the broker may take it later (it stays due)."""
    return str(error) if isinstance(error, MessageRefused) else None
