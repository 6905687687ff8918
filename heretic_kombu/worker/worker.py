"""The worker: consume, claim, run, record, ack — in that order, always.

One main thread owns the broker subscription and decides every database write; pool
slots only run task bodies. The turn's statement (step 2 and 4 below) runs on a thread of
its own, one at a time, so that the loop receives the next turn's messages and outcomes
while the database works; what follows the statement (acks, starts) is done by the main
thread once it has returned. For each delivery:

1. decode and validate it; a message that can never be handled is dead-lettered and
   fires ``job_error`` (invariant 5);
2. claim the job with one conditional UPDATE (invariant 3); a duplicate, stale, early
   or expired message finds nothing to claim and is acked;
3. run it in a pool slot;
4. record the outcome and one ``attempt_logs`` line in one commit (invariant 4);
5. ack only after that commit (invariant 2): a crash anywhere before the ack means the
   broker delivers the message again, and the claim decides what happens then.

Steps 2 and 4 are done for batches: every prefetched message that arrived is claimed in
one statement (the pool queues the claimed jobs its slots cannot start yet), and every
attempt that ended since the last commit is recorded in the next one. The database cost
per job therefore falls as the load rises, while a lone job still goes through at once.

Delays (countdown, eta, retry backoff) wait in the table; the scheduler, run from the
same loop, publishes due jobs (invariant 7).

This module owns the :class:`Worker`'s lifecycle and its loop (intake, turns, acks,
starts). It delegates: what to write for an attempt to :mod:`.outcomes` (pure), how to
apply it outside a turn to :mod:`.settlement`, rate limits, time limits and revocations
to :mod:`.gates`, the scheduler, prune, heartbeat and reconciler to :mod:`.upkeep`, and
the turn's statement to :mod:`.turns`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import canvas, protocol, serialization, signals
from .. import retry as retry_policy
from ..broker import Delivery, Subscription
from ..exceptions import EncodeError, MalformedMessage, StoreError
from ..status import Status
from ..store import Attempt, Job, NewJob, RowError, utcnow
from .gates import RateLimits, Revocations, TimeLimits
from .outcomes import Ending, attempt_result
from .pool import POOLS, Pool
from .settlement import Settlement, header_id, stopping, store_call
from .turns import Accepted, Ended, StatementThread, Turn
from .upkeep import Upkeep

if TYPE_CHECKING:
    from ..app import Heretic

logger = logging.getLogger("heretic_kombu.worker")

#: Seconds the loop waits on the broker while jobs run before it looks for outcomes:
#: POLL_MIN after a turn that did something, growing up to POLL_MAX while nothing ends.
POLL_MIN, POLL_MAX = 0.0005, 0.05
#: Average job run times, in seconds, below which a worker reserves its short-job
#: prefetch, and above which it goes back to the configured one.
SHORT_JOB, LONG_JOB = 0.02, 0.05


class Worker:
    """Consumes ``queues`` and runs their jobs with ``concurrency`` slots of ``pool``."""

    def __init__(
        self,
        app: Heretic,
        *,
        queues: list[str] | None = None,
        concurrency: int | None = None,
        pool: str | None = None,
        prefetch_multiplier: int | None = None,
        name: str | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
    ) -> None:
        settings = app.settings
        self.app = app
        self.queues = queues or [settings.default_queue]
        self.concurrency = concurrency or settings.effective_concurrency
        pool_name = pool or settings.pool
        if max_tasks_per_child is None:
            max_tasks_per_child = settings.worker_max_tasks_per_child
        if max_memory_per_child is None:
            max_memory_per_child = settings.worker_max_memory_per_child
        self.pool: Pool = POOLS[pool_name](
            app,
            1 if pool_name == "solo" else self.concurrency,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
        )
        if (max_tasks_per_child or max_memory_per_child) and not self.pool.recycles:
            logger.warning(
                "max_tasks_per_child/max_memory_per_child change nothing with the %s pool:"
                " only prefork processes are recycled (as in Celery)",
                pool_name,
            )
        multiplier = prefetch_multiplier or settings.prefetch_multiplier
        self.prefetch = self.pool.concurrency * multiplier
        #: The prefetch while jobs are short (see _adapt_prefetch), and the one in force.
        self.short_job_prefetch = self.pool.concurrency * max(
            multiplier, settings.short_job_prefetch_multiplier
        )
        self._limit = self.prefetch
        self._runtime = SHORT_JOB  # moving average of job run times, in seconds
        self.name = expand_name(name or settings.effective_worker_name)
        self._inbox: collections.deque[Delivery] = collections.deque()
        self._done: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._running: dict[str, tuple[Delivery, Job]] = {}
        # The turn whose statement is in flight, and what the next one takes: attempts
        # that ended and messages accepted meanwhile.
        self._turn: Turn | None = None
        self._next_finished: list[Ended] = []
        # Jobs that ended and whose outcome is not committed yet (in _next_finished or in
        # the turn in flight): their leases are still renewed, as for running jobs.
        self._unrecorded: set[str] = set()
        self._next_batch: list[Accepted] = []
        self._statements = StatementThread()
        self._stopping = False
        self._interruptible = False  # a signal raises _StopWaiting (start-up waits)
        self._poll = POLL_MIN
        self._active_at = 0.0  # when the loop last recorded or claimed something
        # A job ending writes a byte here, which wakes the loop waiting on the broker.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Held to write to the pipe or close it: a statement or a job ending after the
        # loop stopped must not write to a descriptor number since given to another file.
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        self._subscription: Subscription | None = None
        self._revocations = Revocations(app, self.pool)
        self._rate_limits = RateLimits(app)
        self._time_limits = TimeLimits(app, self.pool)
        self._settle = Settlement(
            app, self.name, self._revocations, lambda: self._upkeep.publish_soon()
        )
        self._upkeep = Upkeep(
            app,
            running=lambda: list(self._running),
            unrecorded=lambda: list(self._unrecorded),
            holds=self._holds,
            release_lost=self._settle.release_lost,
            revocations=self._revocations,
            queues=self.queues,
        )

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        """Work until SIGTERM/SIGINT; return the exit status (0 after a warm shutdown)."""
        stopping.clear()
        self._install_signals()
        self.pool.start()  # fork before opening connections the children must not share
        heartbeat = self._upkeep.heartbeat_thread()
        try:
            try:
                # Start-up waits for the database and the broker for as long as they
                # are down: a signal meanwhile ends the wait (nothing runs yet).
                self._interruptible = True
                if self._stopping:
                    raise _StopWaiting
                self.app.store.ensure_schema()
                self._subscription = self.app.broker.subscribe(
                    self.queues, self._inbox.append, self._limit
                )
            except _StopWaiting:
                logger.info("%s stopped before it was ready", self.name)
                return 0
            finally:
                self._interruptible = False
            self._settle.attach(self._subscription)
            logger.info(
                "%s ready: queues %s, %s pool x%d, prefetch %d%s",
                self.name,
                ",".join(self.queues),
                type(self.pool).__name__,
                self.pool.concurrency,
                self.prefetch,
                self._recycling(),
            )
            heartbeat.start()
            signals.worker_ready.send(sender=self)
            try:
                while not self._stopping:
                    self._step()
                self._drain_running()
            except StoreError as exc:
                if not self._stopping:
                    raise
                logger.error(
                    "%s stopped without its database (%r): unrecorded outcomes come back"
                    " by redelivery and the reconciler",
                    self.name,
                    exc,
                )
                return 1
        finally:
            # Also on a failed start: children ignore SIGTERM, so an exiting worker that
            # left them to multiprocessing's atexit hook would wait for them forever.
            self._upkeep.stop()
            self._statements.stop()
            if self._subscription is not None:  # it had started
                signals.worker_shutdown.send(sender=self)
            if self._subscription is not None:
                self._subscription.close()
            self.pool.stop(wait=True)
            self.app.close()
            with self._wake_lock:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)
        logger.info("%s stopped", self.name)
        return 0

    def _recycling(self) -> str:
        """How pool processes are recycled, for the ready line ('' if they are not)."""
        pool = self.pool
        if not pool.recycles:
            return ""
        parts = []
        if pool.max_tasks_per_child:
            parts.append(f"after {pool.max_tasks_per_child} tasks")
        if pool.max_memory_per_child:
            parts.append(f"over {pool.max_memory_per_child} KiB")
        return f", processes recycled {' or '.join(parts)}" if parts else ""

    def _room(self) -> int:
        """How many more jobs may be claimed now: a worker holds at most its prefetch
        count of claimed jobs (running, or queued in the pool for a slot), counting
        those being claimed."""
        claiming = len(self._next_batch) + (len(self._turn.batch) if self._turn else 0)
        return self._limit - len(self._running) - claiming

    def _adapt_prefetch(self, finished: list[Ended]) -> None:
        """Reserve more messages while jobs are short, the configured number otherwise.

        Each loop turn costs one commit whatever its size, so short jobs go as fast as
        the batches are big; for long jobs, a big prefetch would only keep jobs waiting
        here that another worker could run. The prefetch follows a moving average of the
        run times: ``short_job_prefetch`` below ``SHORT_JOB`` s, ``prefetch`` above
        ``LONG_JOB`` s.
        """
        for _, _, ending in finished:
            self._runtime += (ending.runtime - self._runtime) * 0.1
        if self._runtime < SHORT_JOB:
            limit = self.short_job_prefetch
        elif self._runtime > LONG_JOB:
            limit = self.prefetch
        else:
            return
        if limit != self._limit and self._subscription is not None:
            self._limit = limit
            self._subscription.set_prefetch(limit)
            logger.info("prefetch %d (jobs take %.1f ms on average)", limit, 1000 * self._runtime)

    def _step(self) -> None:
        """One turn of the loop: receive, then record what ended and claim what arrived
        in one commit, then ack and start; then the scheduler and the controls."""
        assert self._subscription is not None
        if self._room() <= 0:
            # Every prefetched message is claimed: the broker sends no more until a job
            # ends and its message is acked, so wait on the pool's completions (or on
            # the turn in flight, whose end starts jobs and acks messages).
            if self._turn is not None:
                concurrent.futures.wait([self._turn.future], timeout=0.05)
                finished = self._take_finished()
            else:
                finished = self._take_finished(block=0.05)
        else:
            # While jobs run, come back soon to record their outcomes (the broker's socket
            # cannot wake us for them); when idle, sleep until the scheduler's next tick
            # unless a message arrives.
            idle = max(
                0.002, min(1.0, self._upkeep.next_tick - time.monotonic(), self._rate_limits.wait())
            )
            if (self._running or self._turn) and not self._subscription.can_wake:
                idle = self._poll
            self._subscription.drain(idle, wake=self._wake_r)
            finished = self._take_finished()
        self._release_held()
        self._next_finished += finished
        self._next_batch += self._accept_inbox()
        self._turn_over()
        now = time.monotonic()
        # Jobs that have run long are checked less often: a tenth of the quiet time
        # (an outcome waits at most ~10% longer than its job ran), within the bounds.
        self._poll = min(POLL_MAX, max(POLL_MIN, (now - self._active_at) / 10))
        self._upkeep.tick()
        self._apply_revocations()
        self.pool.maintain()

    def _accept_inbox(self) -> list[Accepted]:
        """Take every received message there is room for and check it before its claim."""
        assert self._subscription is not None
        batch: list[Accepted] = []
        while self._inbox and self._room() > len(batch) and not self._stopping:
            delivery = self._inbox.popleft()
            if not self._subscription.is_live(delivery):
                # Received on a connection since lost: the broker redelivers it on the
                # new one, where it can be acked (or dead-lettered) after its commit.
                continue
            try:
                accepted = self._accept(delivery)
            except Exception as exc:
                self._settle.internal_error(delivery, exc)
                continue
            if accepted is not None:
                batch.append(accepted)
        return batch

    def _drain_running(self) -> None:
        """Warm shutdown: stop consuming, let running jobs finish and record them."""
        assert self._subscription is not None
        self._subscription.cancel()
        # Prefetched but unclaimed messages were never started: the broker redelivers
        # them once this connection closes.
        self._inbox.clear()
        self._next_batch.clear()
        self._settle_turns()  # what the turn in flight claims goes to the pool...
        self._hand_back(self.pool.take_queued())  # ...which gives back what is not started
        if self._running:
            logger.info("waiting for %d running job(s) to finish", len(self._running))
        while self._running:
            self._next_finished += self._take_finished(block=0.1)
            self._settle_turns()

    def _hand_back(self, calls: list[dict[str, Any]]) -> None:
        """Release jobs claimed but never started (queued in the pool at a warm
        shutdown): their rows go back to ``queued`` with the attempt uncounted, and
        their messages, never acked, are redelivered once this connection closes."""
        if not calls:
            return
        jobs = [self._running.pop(call["id"])[1] for call in calls]
        try:
            self.app.store.release_unstarted([(job.task_id, job.attempts) for job in jobs])
        except Exception as exc:  # the rows stay started: the reconciler's lease check
            logger.warning("claimed jobs not handed back (%r); their leases will expire", exc)
            return
        logger.info("handed back %d claimed job(s) that had not started", len(jobs))

    def _install_signals(self) -> None:
        """SIGTERM or SIGINT: warm shutdown (running jobs finish, then exit 0); a second
        one, or SIGQUIT, cold shutdown (exit 1 at once), as Celery. Whatever the worker
        waits on when the signal comes, the signal ends that wait."""

        def cold(signum: int, frame: Any) -> None:
            logger.warning(
                "cold shutdown (%s): exiting now; unacked messages will be redelivered",
                signal.Signals(signum).name,
            )
            self.pool.stop(wait=False)
            os._exit(1)

        def on_signal(signum: int, frame: Any) -> None:
            if self._stopping:
                cold(signum, frame)
            logger.info(
                "warm shutdown (%s): finishing running jobs; again to exit at once",
                signal.Signals(signum).name,
            )
            self._stopping = True
            # A worker cut off from its database no longer waits for it to come back:
            # what is not recorded comes back by redelivery and the reconciler.
            stopping.set()
            if self._interruptible:  # waiting for the broker or the database to start
                raise _StopWaiting

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGQUIT, cold)

    # -- one delivery ------------------------------------------------------------

    def _accept(self, delivery: Delivery) -> tuple[Delivery, protocol.TaskMessage] | None:
        """Check a delivery before its claim; ``None`` if it was dealt with here (held by
        its rate limit, dead-lettered, or a Celery client's job scheduled for later)."""
        if not self._rate_limits.admit(delivery):
            return None  # rate limited: held, unclaimed, until its task's bucket has a token
        try:
            message = protocol.decode(
                delivery.body, delivery.content_type, delivery.headers, delivery.priority
            )
        except MalformedMessage as exc:
            self._settle.dead_letter(delivery, str(exc), header_id(delivery))
            return None
        if message.task not in self.app.tasks:
            # A message never changes a job it cannot run (invariant 11): the row is left
            # as it is, the message goes to a worker that knows the task, or dead.
            reason = f"unknown task {message.task!r}: not registered in this worker"
            self._settle.pass_on(delivery, reason, message.id)
            return None
        if message.job_id is None and not self._adopt(delivery, message):
            return None
        return delivery, message

    def _start_claimed(self, batch: list[Accepted], claimed: dict[str, Job]) -> None:
        """Start the jobs claimed for a batch of accepted messages; a message with
        nothing to claim goes through :meth:`_unclaimed`."""
        for delivery, message in batch:
            try:
                # pop: a second copy of one job in the same batch finds it claimed.
                job = claimed.pop(message.id, None) or self._unclaimed(delivery, message)
                if job is not None and job.task_name not in self.app.tasks:
                    self._foreign(delivery, message, job)
                elif job is not None:
                    self._start(delivery, job)
            except Exception as exc:
                self._settle.internal_error(delivery, exc)

    def _foreign(self, delivery: Delivery, message: protocol.TaskMessage, job: Job) -> None:
        """A message naming a job whose task this worker does not know (its id is another
        task's job): the claim is undone, attempt uncounted, and the message passed on."""
        store_call(self.app.store.release_unstarted, [(job.task_id, job.attempts)])
        reason = (
            f"message for task {message.task!r} names job {job.task_id} of task"
            f" {job.task_name!r}, not registered in this worker"
        )
        self._settle.pass_on(delivery, reason, message.id)
        self._upkeep.publish_soon()

    def _start(self, delivery: Delivery, job: Job) -> None:
        """Hand a claimed job to a pool slot."""
        logger.info("Task %s[%s] received (attempt %d)", job.task_name, job.task_id, job.attempts)
        self._running[job.task_id] = (delivery, job)
        call = {
            "task": job.task_name,
            "id": job.task_id,
            "args": job.args,
            "kwargs": job.kwargs,
            "retries": job.attempts - 1,
            "max_attempts": job.max_attempts,
            "job_id": job.id,
            "eta": job.eta.isoformat() if job.eta else None,
            "expires": job.expires_at.isoformat() if job.expires_at else None,
            "root_id": job.root_id,
            "parent_id": job.parent_id,
            "group": job.group_id,
            "hostname": self.name,
            "queue": delivery.queue,
        }
        call["time_limit"], call["soft_time_limit"] = self._time_limits.of(job)
        task_id = job.task_id

        def on_done(outcome: dict[str, Any]) -> None:
            self._done.put((task_id, outcome))
            self._wake()

        self.pool.submit(call, on_done)

    def _wake(self, *_: Any) -> None:
        """Wake the loop waiting on the broker (a job ended, a statement returned)."""
        with self._wake_lock, contextlib.suppress(BlockingIOError):  # full: awake anyway
            if not self._wake_closed:
                os.write(self._wake_w, b"\0")

    def _adopt(self, delivery: Delivery, message: protocol.TaskMessage) -> bool:
        """Write the row of a message sent by a Celery client; ``False`` if done with it."""
        now = utcnow()
        later = message.eta is not None and message.eta > now
        try:
            payload = serialization.dumps({"args": message.args, "kwargs": message.kwargs})
        except EncodeError as exc:  # e.g. NaN or NUL, which Celery's JSON lets through
            self._settle.dead_letter(delivery, f"arguments cannot be stored: {exc}", message.id)
            return False
        row = NewJob(
            task_id=message.id,
            task_name=message.task,
            queue_name=delivery.queue,
            payload=payload,
            max_attempts=retry_policy.max_attempts_for(self.app.tasks[message.task].max_retries),
            status=Status.SCHEDULED if later else Status.QUEUED,
            eta=message.eta if later else None,
            expires_at=message.expires,
            priority=message.priority,
            parent_id=message.parent_id,
            root_id=message.root_id or message.id,
            group_id=message.group,
            attempts=message.retries,
            workflow=_workflow_of(message),
        )
        try:
            store_call(self.app.store.insert_if_missing, row)
        except RowError as exc:  # a value the table cannot hold: no row was written
            self._settle.dead_letter(delivery, f"job row cannot be written: {exc}", message.id)
            return False
        if later:
            # The eta waits in the table, not as an unacked message (invariant 7).
            self._subscription.ack(delivery)  # type: ignore[union-attr]
            logger.info("Task %s[%s] scheduled for %s", message.task, message.id, message.eta)
            return False
        return True

    def _unclaimed(self, delivery: Delivery, message: protocol.TaskMessage) -> Job | None:
        """A message whose job could not be claimed: missing row (dead letter), a copy of a
        job running here, a lost attempt to recover, or nothing to do (acked)."""
        store = self.app.store
        try:
            row = store_call(store.get, message.id)
        except RowError as exc:
            # Claimed (or not) but its row cannot be read back (a timestamp past year
            # 9999 in UTC): the job cannot run; set it aside and let the message go.
            reason = f"job row cannot be read: {exc}"
            self._settle.set_aside(message.id, reason)
            self._settle.dead_letter(delivery, reason, message.id)
            return None
        if row is None:
            self._settle.dead_letter(
                delivery,
                f"job row {message.job_id} for task id {message.id} does not exist",
                message.id,
            )
            return None
        held = self._held_delivery(message.id)
        if row.status == Status.STARTED and held is not None:
            if self._subscription.is_live(held):  # type: ignore[union-attr]
                # A duplicate of a job running here: the first copy is acked after
                # the commit; this one can go now, or it would hold a prefetch slot.
                logger.info(
                    "Task %s[%s]: duplicate of a job running here acked",
                    row.task_name,
                    row.task_id,
                )
                self._subscription.ack(delivery)  # type: ignore[union-attr]
            else:
                # Our own job, redelivered after a reconnect: ack this copy when done.
                logger.info(
                    "Task %s[%s] redelivered after a reconnect while running here;"
                    " this copy is acked when it ends",
                    row.task_name,
                    row.task_id,
                )
                self._replace_delivery(message.id, delivery)
            return None
        if row.status == Status.STARTED and delivery.redelivered:
            return self._recover_lost_attempt(delivery, row)
        if store_call(store.revoke_expired, message.id):
            logger.info("Task %s[%s] expired before it ran: revoked", row.task_name, row.task_id)
            self._settle.send_revoked(row, delivery, terminated=False, signum=None, expired=True)
        else:
            logger.info(
                "Task %s[%s]: message dropped, nothing to claim (status %s%s)",
                row.task_name,
                row.task_id,
                row.status,
                f", due {row.eta:%Y-%m-%d %H:%M:%S}" if row.eta else "",
            )
            if row.status == Status.REVOKED:  # Celery: "Discarding revoked task"
                expired = row.error == "expired"
                self._settle.send_revoked(
                    row, delivery, terminated=False, signum=None, expired=expired
                )
        self._subscription.ack(delivery)  # type: ignore[union-attr]
        return None

    def _ended_here(self) -> list[list[Ended]]:
        """The lists of attempts that ended here and wait for their turn's commit."""
        return [self._next_finished, self._turn.finished if self._turn else []]

    def _held_delivery(self, task_id: str) -> Delivery | None:
        """The delivery to ack once ``task_id``'s outcome is committed, if the job runs
        here or has ended with its outcome not committed yet."""
        if task_id in self._running:
            return self._running[task_id][0]
        if task_id in self._unrecorded:
            for finished in self._ended_here():
                for delivery, job, _ in finished:
                    if job.task_id == task_id:
                        return delivery
        return None

    def _replace_delivery(self, task_id: str, delivery: Delivery) -> None:
        """Make ``delivery`` the one acked once the job's outcome is committed, whether
        the job still runs or has ended with its outcome waiting for a turn."""
        if task_id in self._running:
            self._running[task_id] = (delivery, self._running[task_id][1])
            return
        for finished in self._ended_here():
            for index, (_, job, ending) in enumerate(finished):
                if job.task_id == task_id:
                    finished[index] = (delivery, job, ending)

    def _recover_lost_attempt(self, delivery: Delivery, row: Job) -> Job | None:
        """The message comes back while its row says ``started``.

        Its worker's connection closed; whether the worker died is told by the lease:
        a worker that still renews it is running the job, so this copy is acked (if
        that worker dies later, the reconciler finds the expired lease).
        """
        if row.updated_at > utcnow() - self._upkeep.lease_timeout:
            logger.info(
                "Task %s[%s] redelivered but still running on %s (lease renewed %s);"
                " duplicate acked",
                row.task_name,
                row.task_id,
                row.worker,
                f"{row.updated_at:%H:%M:%S}",
            )
            self._subscription.ack(delivery)  # type: ignore[union-attr]
            return None
        released = self._settle.release_lost(row, "the worker died mid-job")
        if released:
            job = store_call(self.app.store.claim, row.task_id, self.name)
            if job is not None:
                return job
        self._subscription.ack(delivery)  # type: ignore[union-attr]
        return None

    # -- outcomes ------------------------------------------------------------------

    def _take_finished(self, block: float | None = None) -> list[Ended]:
        """The attempts that ended since the last call (waiting up to ``block`` s for the
        first), but those a runtime control settled (terminated, Reject, Ignore)."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        finished: list[Ended] = []
        while True:
            try:
                task_id, outcome = (
                    self._done.get(timeout=block) if block else self._done.get_nowait()
                )
            except queue.Empty:
                break
            block = None
            delivery, job = self._running.pop(task_id)
            ending = Ending.from_report(outcome)
            if not self._settle.control_outcome(delivery, job, ending):
                finished.append((delivery, job, ending))
                self._unrecorded.add(task_id)
        return finished

    def _turn_over(self) -> None:
        """End the turn in flight if its statement has returned; then, if none is in
        flight, begin the next with what has come in meanwhile."""
        if self._turn is not None and self._turn.future.done():
            self._end_turn()
        if self._turn is None and (self._next_finished or self._next_batch):
            finished, batch = self._next_finished, self._next_batch
            self._next_finished, self._next_batch = [], []
            self._begin_turn(finished, batch)
            if self._turn is not None and self._turn.future.done():  # it ran here
                self._end_turn()

    def _settle_turns(self) -> None:
        """Run the turns to their end, waiting for each statement (warm shutdown)."""
        while self._turn is not None or self._next_finished or self._next_batch:
            if self._turn is not None:
                concurrent.futures.wait([self._turn.future])
            self._turn_over()

    def _begin_turn(
        self,
        finished: list[Ended],
        batch: list[Accepted],
    ) -> None:
        """Send the statement that records the ended attempts and claims the accepted
        messages, in one commit; :meth:`_end_turn` follows once it has returned."""
        results = [
            attempt_result(job, ending, now=utcnow(), worker=self.name)
            for _, job, ending in finished
        ]
        attempts = [
            Attempt(job.task_id, job.attempts, result, self._settle.next_steps(job, result))
            for (_, job, _), result in zip(finished, results, strict=True)
        ]
        ids = [message.id for _, message in batch]
        call = (store_call, self.app.store.record_and_claim, attempts, ids, self.name)
        if self._running:
            future = self._statements.submit(*call)
            future.add_done_callback(self._wake)
        else:  # no job runs meanwhile: the loop would only wait (a lone job's latency)
            future = StatementThread.call_here(*call)
        self._turn = Turn(finished, batch, results, future)
        self._adapt_prefetch(finished)
        self._active_at = time.monotonic()

    def _end_turn(self) -> None:
        """The turn's statement has committed: ack what it recorded, publish the
        follow-ups, and start what it claimed."""
        assert self._turn is not None
        turn, self._turn = self._turn, None
        finished, results, batch = turn.finished, turn.results, turn.batch
        try:
            answers, claimed = turn.future.result()
        except RowError as exc:
            # A value the table refuses (issue 15, item 1): nothing of the turn was
            # written; each attempt and each claim again alone, the bad one set aside.
            finished, results, answers = self._settle.separately(finished, results, exc)
            batch, claimed = self._settle.claim_separately(batch, self.name)
        except Exception as exc:
            if turn.finished:
                raise  # a bug recording outcomes: stop, and the messages come back
            for delivery, _ in turn.batch:
                self._settle.internal_error(delivery, exc)
            return
        self._settle.after_record(finished, results, answers)
        self._unrecorded.difference_update(job.task_id for _, job, _ in turn.finished)
        if batch:
            self._start_claimed(batch, claimed)

    # -- runtime controls: revoke, Reject/Ignore, time limits, rate limits -------------

    def _release_held(self) -> None:
        """Put held messages whose task has a token again at the front of the inbox,
        no more than there are free slots (a token is taken when a job can start)."""
        if not self._rate_limits.holding:
            return
        for delivery in reversed(self._rate_limits.release(self._room())):
            self._inbox.appendleft(delivery)

    def _apply_revocations(self) -> None:
        """Act on the revocations the heartbeat found among the jobs claimed here."""
        self._revocations.apply(self._running, self._drop_unstarted)

    def _drop_unstarted(self, task_id: str, signum: int | None) -> None:
        """A job revoked while it waited here for a slot never runs: its row says
        revoked (after ``terminate=True`` it already does), and its message is acked."""
        delivery, job = self._running.pop(task_id)
        if signum is None:
            store_call(self.app.store.revoke_unstarted, task_id, job.attempts, self.name)
        self._subscription.ack(delivery)  # type: ignore[union-attr]
        logger.info("Task %s[%s] revoked before it started: dropped", job.task_name, task_id)
        self._settle.send_revoked(job, delivery, terminated=False, signum=None, expired=False)

    # -- database errors ---------------------------------------------------------

    def _holds(self, task_id: str) -> bool:
        """Whether this worker holds ``task_id``'s lease: the job runs here, has ended
        with its outcome not committed yet, or is being claimed by the turn in flight."""
        if task_id in self._running or task_id in self._unrecorded:
            return True
        turn = self._turn
        return turn is not None and any(message.id == task_id for _, message in turn.batch)


class _StopWaiting(BaseException):
    """Raised by the signal handler to end a start-up wait (for the broker or the
    database); a BaseException, so that no retry loop catching Exception swallows it."""


def expand_name(name: str) -> str:
    """Celery's node-name placeholders: ``%h`` host, ``%n`` short host, ``%d`` domain."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    return name.replace("%h", host).replace("%n", short).replace("%d", domain)


def _workflow_of(message: protocol.TaskMessage) -> serialization.RawJSON | None:
    """The canvas links a Celery client put in a message's embed, for the job's row."""
    workflow: dict[str, Any] = {key: message.embed.get(key) for key in canvas.LINKS}
    if message.group_index is not None:
        workflow["group_index"] = message.group_index
    if message.timelimit != (None, None):
        workflow["timelimit"] = list(message.timelimit)
    if not any(value is not None for value in workflow.values()):
        return None
    return serialization.dumps(workflow)
