"""Gates on a worker's jobs: rate limits before a claim, time limits at a job's start,
and revocations of the jobs claimed here.

Each gate keeps its own state and decides; the worker's loop asks and acts (claims,
acks, store writes), so the order of effects stays in one place.
"""

from __future__ import annotations

import collections
import logging
import queue
import signal
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .. import control, signals
from ..broker import Delivery
from ..ratelimit import TokenBucket, parse_rate
from ..store import REVOKE_REQUESTED, Job
from ..task import Context
from .pool import Pool

if TYPE_CHECKING:
    from ..app import Heretic

logger = logging.getLogger("heretic_kombu.worker")


class RateLimits:
    """``rate_limit``: a token bucket per task, messages held for a token, and the held
    messages released with their token already taken."""

    def __init__(self, app: Heretic) -> None:
        self._app = app
        self._buckets: dict[str, TokenBucket | None] = {}
        self._held: dict[str, collections.deque[Delivery]] = {}
        self._granted: dict[int, Delivery] = {}

    @property
    def holding(self) -> bool:
        """Whether any message waits for a token."""
        return bool(self._held)

    def _bucket(self, task_name: str) -> TokenBucket | None:
        """The token bucket of a rate-limited task (``rate_limit``), made on first use."""
        if task_name not in self._buckets:
            task = self._app.tasks.get(task_name)
            limit = task.rate_limit if task is not None else None
            if limit is None:
                limit = self._app.settings.default_rate_limit or None
            try:
                rate = parse_rate(limit)
            except ValueError as exc:
                logger.error("Task %s: %s; running it without a rate limit", task_name, exc)
                rate = None
            self._buckets[task_name] = TokenBucket(rate) if rate else None
        return self._buckets[task_name]

    def admit(self, delivery: Delivery) -> bool:
        """``True`` if the delivery may be handled now; else it is held (not claimed,
        not acked) behind its task's earlier held messages until a token is free."""
        granted = self._granted.pop(id(delivery), None)
        if granted is delivery:
            return True
        name = (delivery.headers or {}).get("task")
        if not isinstance(name, str):
            return True  # malformed: the worker dead-letters it
        bucket = self._bucket(name)
        if bucket is None:
            return True
        if not self._held.get(name) and bucket.can_consume():
            return True
        self._held.setdefault(name, collections.deque()).append(delivery)
        return False

    def release(self, free: int) -> list[Delivery]:
        """Take held messages whose task has a token again, no more than ``free`` (a
        token is taken when a job can start), in the order they go to the inbox's front."""
        released: list[Delivery] = []
        for name, held in list(self._held.items()):
            bucket = self._buckets.get(name)
            while held and free > 0 and bucket is not None and bucket.can_consume():
                delivery = held.popleft()
                self._granted[id(delivery)] = delivery
                released.append(delivery)
                free -= 1
            if not held:
                del self._held[name]
        return released

    def wait(self) -> float:
        """Seconds until a held message's task has a token again (1.0 if none is held)."""
        waits = [
            bucket.expected_time()
            for name in self._held
            if (bucket := self._buckets.get(name)) is not None
        ]
        return min(waits, default=1.0)


class TimeLimits:
    """The time limits a job runs under, warning once per task about a hard limit the
    pool cannot enforce."""

    def __init__(self, app: Heretic, pool: Pool) -> None:
        self._app = app
        self._pool = pool
        self._no_limit_warned: set[str] = set()

    def of(self, job: Job) -> tuple[float | None, float | None]:
        """The (hard, soft) time limits of a job: the call's own (``apply_async(
        time_limit=...)``, or a Celery client's ``timelimit`` header), else the task's,
        else the ``time_limit``/``soft_time_limit`` settings (task_time_limit...)."""
        task_name = job.task_name
        task = self._app.tasks.get(task_name)
        settings = self._app.settings
        per_call = (job.workflow or {}).get("timelimit") or [None, None]
        hard = task.time_limit if task is not None and task.time_limit is not None else None
        soft = task.soft_time_limit if task is not None else None
        hard = per_call[0] if per_call[0] is not None else hard
        soft = per_call[1] if per_call[1] is not None else soft
        hard = hard if hard is not None else settings.time_limit
        soft = soft if soft is not None else settings.soft_time_limit
        pool = self._pool
        if hard and not pool.enforces_time_limits and task_name not in self._no_limit_warned:
            self._no_limit_warned.add(task_name)
            logger.warning(
                "Task %s has a hard time limit (%ss) that the %s pool cannot enforce:"
                " hard time limits need the prefork pool",
                task_name,
                hard,
                type(pool).__name__,
            )
        return (float(hard) if hard else None, float(soft) if soft else None)


class Revocations:
    """Revocations of jobs claimed here: found by the heartbeat thread among the jobs
    running here, acted on by the main loop.

    ``revoke(terminate=True)``: (task id, row error) seen by the heartbeat thread, and
    the signal sent to each job being terminated.
    """

    def __init__(self, app: Heretic, pool: Pool) -> None:
        self._app = app
        self._pool = pool
        self._found: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._terminating: dict[str, int] = {}
        self._cannot_terminate: set[str] = set()

    def look(self, running: list[str]) -> None:
        """On the heartbeat thread: note the jobs of ``running`` revoked meanwhile."""
        # Jobs revoked with terminate=True while running here: the main loop
        # terminates them (a beat is how soon revoke(terminate=True) acts).
        for task_id, error in self._app.store.revoked_among(running).items():
            if control.terminate_signal(error) is None:
                if error == REVOKE_REQUESTED:  # dropped if it has not started
                    self._found.put((task_id, error))
                continue  # revoked some other way: its outcome will not be recorded
            self._found.put((task_id, error))
            if not self._pool.can_terminate and task_id not in self._cannot_terminate:
                self._cannot_terminate.add(task_id)
                logger.warning(
                    "Task %s revoked with terminate=True, but the %s pool cannot"
                    " terminate a running job: it runs to its end (its outcome is"
                    " not recorded: the row says revoked)",
                    task_id,
                    type(self._pool).__name__,
                )

    def apply(
        self,
        running: Mapping[str, tuple[Delivery, Job]],
        drop_unstarted: Callable[[str, int | None], None],
    ) -> None:
        """Act on the revocations found among the jobs claimed here: one that has not
        started yet is dropped (``drop_unstarted``); a running one is terminated if
        revoked with ``terminate=True``, else left to finish."""
        while True:
            try:
                task_id, error = self._found.get_nowait()
            except queue.Empty:
                return
            signum = control.terminate_signal(error)
            if task_id not in running or task_id in self._terminating:
                continue
            if self._pool.take_unstarted(task_id):
                drop_unstarted(task_id, signum)
                continue
            if signum is not None and self._pool.terminate_job(task_id, signum):
                self._terminating[task_id] = signum
                job = running[task_id][1]
                logger.warning(
                    "Task %s[%s] revoked with terminate=True: %s sent to its process",
                    job.task_name,
                    job.task_id,
                    signal.Signals(signum).name,
                )

    def ended(self, task_id: str) -> int | None:
        """A job claimed here has ended: the signal that terminated it, if it was."""
        self._cannot_terminate.discard(task_id)
        return self._terminating.pop(task_id, None)


def send_revoked(
    app: Heretic,
    job: Job,
    delivery: Delivery,
    *,
    hostname: str,
    terminated: bool,
    signum: int | None,
    expired: bool,
) -> None:
    """Celery's ``task_revoked`` signal, sent in the worker as Celery sends it."""
    task = app.tasks.get(job.task_name)
    if task is None:
        return
    request = Context(
        id=job.task_id,
        task=job.task_name,
        args=job.args,
        kwargs=job.kwargs,
        retries=max(job.attempts - 1, 0),
        root_id=job.root_id,
        parent_id=job.parent_id,
        group=job.group_id,
        hostname=hostname,
        delivery_info={"routing_key": delivery.queue, "exchange": delivery.queue},
        called_directly=False,
    )
    signals.task_revoked.send(
        sender=task, request=request, terminated=terminated, signum=signum, expired=expired
    )
