"""The worker: consume, claim, run, record, ack — in that order, always.

One main thread owns the broker subscription and every database write; pool slots only
run task bodies. For each delivery:

1. decode and validate it; a message that can never be handled is dead-lettered and
   fires ``job_error`` (invariant 5);
2. claim the job with one conditional UPDATE (invariant 3); a duplicate, stale, early
   or expired message finds nothing to claim and is acked;
3. run it in a pool slot;
4. record the outcome and one ``attempt_logs`` line in one commit (invariant 4);
5. ack only after that commit (invariant 2): a crash anywhere before the ack means the
   broker delivers the message again, and the claim decides what happens then.

Delays (countdown, eta, retry backoff) wait in the table; the scheduler, run from the
same loop, publishes due jobs (invariant 7).
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import canvas, failure, protocol, serialization, signals, states
from .. import retry as retry_policy
from ..broker import Delivery, Subscription
from ..exceptions import EncodeError, MalformedMessage, StoreError, WorkerLostError
from ..execution import FAILED, LOST, RETRY, SUCCEEDED
from ..store import AttemptResult, Job, NewJob, NextSteps, log_line, utcnow
from .pool import POOLS, Pool

if TYPE_CHECKING:
    from ..app import Heretic

logger = logging.getLogger("heretic_kombu.worker")


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
    ) -> None:
        settings = app.settings
        self.app = app
        self.queues = queues or [settings.default_queue]
        self.concurrency = concurrency or settings.effective_concurrency
        pool_name = pool or settings.pool
        self.pool: Pool = POOLS[pool_name](app, 1 if pool_name == "solo" else self.concurrency)
        self.prefetch = self.pool.concurrency * (
            prefetch_multiplier or settings.prefetch_multiplier
        )
        self.name = expand_name(name or settings.effective_worker_name)
        self.scheduler_interval = settings.scheduler_interval
        self.heartbeat_interval = settings.heartbeat_interval
        self.lease_timeout = dt.timedelta(seconds=settings.lease_timeout)
        self.pending_timeout = dt.timedelta(seconds=settings.pending_timeout)
        self._next_reconcile = 0.0
        self._heartbeat_stop = threading.Event()
        self._inbox: collections.deque[Delivery] = collections.deque()
        self._done: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self._running: dict[str, tuple[Delivery, Job]] = {}
        self._stopping = False
        self._next_tick = 0.0
        self._subscription: Subscription | None = None

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        """Work until SIGTERM/SIGINT; return the exit status (0 after a warm shutdown)."""
        self._install_signals()
        self.pool.start()  # fork before opening connections the children must not share
        heartbeat = threading.Thread(
            target=self._heartbeat_loop, name="heretic-heartbeat", daemon=True
        )
        try:
            self.app.store.ensure_schema()
            self._subscription = self.app.broker.subscribe(
                self.queues, self._inbox.append, self.prefetch
            )
            logger.info(
                "%s ready: queues %s, %s pool x%d, prefetch %d",
                self.name,
                ",".join(self.queues),
                type(self.pool).__name__,
                self.pool.concurrency,
                self.prefetch,
            )
            heartbeat.start()
            signals.worker_ready.send(sender=self)
            while not self._stopping:
                self._step()
            self._drain_running()
        finally:
            # Also on a failed start: children ignore SIGTERM, so an exiting worker that
            # left them to multiprocessing's atexit hook would wait for them forever.
            self._heartbeat_stop.set()
            if self._subscription is not None:  # it had started
                signals.worker_shutdown.send(sender=self)
            if self._subscription is not None:
                self._subscription.close()
            self.pool.stop(wait=True)
            self.app.close()
        logger.info("%s stopped", self.name)
        return 0

    def _step(self) -> None:
        assert self._subscription is not None
        if self._inbox and self.pool.free_slots() == 0:
            # Work is waiting for a slot: nothing to do until a running job ends, so wait on
            # the pool's completions rather than on the broker.
            self._record_finished(block=0.05)
        else:
            # While jobs run, come back often to record their outcomes; when idle, sleep
            # until the scheduler's next tick unless a message arrives.
            idle = max(0.002, min(1.0, self._next_tick - time.monotonic()))
            self._subscription.drain(0.002 if self._running else idle)
            self._record_finished()
        while self._inbox and self.pool.free_slots() > 0 and not self._stopping:
            delivery = self._inbox.popleft()
            try:
                self._handle(delivery)
            except Exception as exc:
                # A bug of ours must not crash every worker the message is redelivered to.
                logger.exception("unexpected error handling a message")
                self._dead_letter(delivery, f"internal error: {exc!r}", _header_id(delivery))
            self._record_finished()
        self._tick()
        self.pool.maintain()

    def _drain_running(self) -> None:
        """Warm shutdown: stop consuming, let running jobs finish and record them."""
        assert self._subscription is not None
        self._subscription.cancel()
        # Prefetched but unclaimed messages were never started: the broker redelivers
        # them once this connection closes.
        self._inbox.clear()
        if self._running:
            logger.info("waiting for %d running job(s) to finish", len(self._running))
        while self._running:
            self._record_finished(block=0.1)

    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:
            if self._stopping:
                logger.warning("cold shutdown: exiting now; unacked messages will be redelivered")
                self.pool.stop(wait=False)
                os._exit(1)
            logger.info(
                "warm shutdown (%s): finishing running jobs; again to exit at once",
                signal.Signals(signum).name,
            )
            self._stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    # -- one delivery ------------------------------------------------------------

    def _handle(self, delivery: Delivery) -> None:
        try:
            message = protocol.decode(
                delivery.body, delivery.content_type, delivery.headers, delivery.priority
            )
        except MalformedMessage as exc:
            self._dead_letter(delivery, str(exc), _header_id(delivery))
            return
        if message.task not in self.app.tasks:
            reason = f"unknown task {message.task!r}: not registered in this worker"
            self._store_call(self.app.store.fail_unhandleable, message.id, reason)
            self._dead_letter(delivery, reason, message.id)
            return
        if message.job_id is None and not self._adopt(delivery, message):
            return
        job = self._claim(delivery, message)
        if job is None:
            return
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
        task_id = job.task_id
        self.pool.submit(call, lambda outcome: self._done.put((task_id, outcome)))

    def _adopt(self, delivery: Delivery, message: protocol.TaskMessage) -> bool:
        """Write the row of a message sent by a Celery client; ``False`` if done with it."""
        now = utcnow()
        later = message.eta is not None and message.eta > now
        try:
            payload = serialization.dumps({"args": message.args, "kwargs": message.kwargs})
        except EncodeError as exc:  # e.g. NaN or NUL, which Celery's JSON lets through
            self._dead_letter(delivery, f"arguments cannot be stored: {exc}", message.id)
            return False
        row = NewJob(
            task_id=message.id,
            task_name=message.task,
            queue_name=delivery.queue,
            payload=payload,
            max_attempts=retry_policy.max_attempts_for(self.app.tasks[message.task].max_retries),
            status=states.SCHEDULED if later else states.QUEUED,
            eta=message.eta if later else None,
            expires_at=message.expires,
            priority=message.priority,
            parent_id=message.parent_id,
            root_id=message.root_id or message.id,
            group_id=message.group,
            attempts=message.retries,
            workflow=_workflow_of(message),
        )
        self._store_call(self.app.store.insert_if_missing, row)
        if later:
            # The eta waits in the table, not as an unacked message (invariant 7).
            self._subscription.ack(delivery)  # type: ignore[union-attr]
            logger.info("Task %s[%s] scheduled for %s", message.task, message.id, message.eta)
            return False
        return True

    def _claim(self, delivery: Delivery, message: protocol.TaskMessage) -> Job | None:
        store = self.app.store
        job = self._store_call(store.claim, message.id, self.name)
        if job is not None:
            return job
        row = self._store_call(store.get, message.id)
        if row is None:
            self._dead_letter(
                delivery,
                f"job row {message.job_id} for task id {message.id} does not exist",
                message.id,
            )
            return None
        if row.status == states.STARTED and message.id in self._running:
            # Our own job, redelivered after a reconnect: ack the live copy when done.
            self._running[message.id] = (delivery, self._running[message.id][1])
            return None
        if row.status == states.STARTED and delivery.redelivered:
            return self._recover_lost_attempt(delivery, row)
        if self._store_call(store.revoke_expired, message.id):
            logger.info("Task %s[%s] expired before it ran: revoked", row.task_name, row.task_id)
        else:
            logger.info(
                "Task %s[%s]: message dropped, nothing to claim (status %s%s)",
                row.task_name,
                row.task_id,
                row.status,
                f", due {row.eta:%Y-%m-%d %H:%M:%S}" if row.eta else "",
            )
        self._subscription.ack(delivery)  # type: ignore[union-attr]
        return None

    def _recover_lost_attempt(self, delivery: Delivery, row: Job) -> Job | None:
        """The message comes back while its row says ``started``.

        Its worker's connection closed; whether the worker died is told by the lease:
        a worker that still renews it is running the job, so this copy is acked (if
        that worker dies later, the reconciler finds the expired lease).
        """
        if row.updated_at > utcnow() - self.lease_timeout:
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
        released = self._release_lost(row, "the worker died mid-job")
        if released:
            job = self._store_call(self.app.store.claim, row.task_id, self.name)
            if job is not None:
                return job
        self._subscription.ack(delivery)  # type: ignore[union-attr]
        return None

    def _release_lost(self, row: Job, why: str) -> bool:
        """Log the lost attempt of ``row`` and make it due again (or fail it, if it was
        the last allowed one). Returns ``True`` if the job may run again."""
        line = log_line(utcnow(), row.attempts, row.worker or "?", f"lost: {why}")
        give_up = then = None
        if row.attempts >= row.max_attempts:
            give_up = _lost_result(f"worker {row.worker} lost the last allowed attempt: {why}")
            then = self._next_steps(row, give_up)
        followups = self._store_call(self.app.store.release_lost_attempt, row, line, give_up, then)
        if followups is not None:
            self._deliver(followups)
            logger.warning(
                "Task %s[%s] attempt %d was lost with worker %s: %s",
                row.task_name,
                row.task_id,
                row.attempts,
                row.worker,
                why,
            )
        return give_up is None

    def _dead_letter(self, delivery: Delivery, reason: str, task_id: str | None) -> None:
        logger.error("message dead-lettered to %s.dead: %s", delivery.queue, reason)
        assert self._subscription is not None
        self._subscription.dead_letter(delivery, reason)
        error = MalformedMessage(reason)
        error.reason, error.queue, error.task_id = reason, delivery.queue, task_id  # type: ignore[attr-defined]
        self.app.emit("job_error", error)

    # -- outcomes ------------------------------------------------------------------

    def _record_finished(self, block: float | None = None) -> None:
        while True:
            try:
                task_id, outcome = (
                    self._done.get(timeout=block) if block else self._done.get_nowait()
                )
            except queue.Empty:
                return
            block = None
            delivery, job = self._running.pop(task_id)
            self._record(delivery, job, outcome)

    def _record(self, delivery: Delivery, job: Job, outcome: dict[str, Any]) -> None:
        result = self._attempt_result(job, outcome)
        then = self._next_steps(job, result)
        followups = self._store_call(
            self.app.store.record_attempt, job.task_id, job.attempts, result, then
        )
        if followups is None:
            logger.warning(
                "Task %s[%s] attempt %d was superseded; its outcome is not recorded",
                job.task_name,
                job.task_id,
                job.attempts,
            )
        # Only now, with the outcome committed, may the message go (invariant 2).
        self._subscription.ack(delivery)  # type: ignore[union-attr]
        if followups:
            self._deliver(followups)
        runtime = outcome.get("runtime") or 0.0
        if result.status == states.SUCCEEDED:
            logger.info("Task %s[%s] succeeded in %.3fs", job.task_name, job.task_id, runtime)
            return
        exc = (
            failure.rebuild(serialization.loads(result.result))
            if result.result
            else WorkerLostError(result.error)
        )
        level = logging.WARNING if result.status == states.RETRYING else logging.ERROR
        task = self.app.tasks.get(job.task_name)
        if task is not None and task.throws and isinstance(exc, task.throws):
            level = logging.INFO  # an expected error (Celery's ``throws``): not an error log
        logger.log(
            level, "Task %s[%s] %s", job.task_name, job.task_id, result.log_line.split(": ", 1)[-1]
        )
        self.app.emit("job_failed", exc, self._store_call(self.app.store.get, job.task_id) or job)
        if result.status == states.RETRYING and result.eta is not None and result.eta <= utcnow():
            self._next_tick = 0.0  # publish the immediate retry now, not at the next tick

    def _next_steps(self, job: Job, result: AttemptResult) -> NextSteps | None:
        """Plan what the job's workflow sends next (callbacks, chain, chord, errbacks)."""
        if not job.workflow or result.status not in (states.SUCCEEDED, states.FAILED):
            return None
        value = serialization.loads(result.result) if result.result else None
        try:
            return canvas.next_steps(self.app, job, result.status, value, result.error)
        except Exception:
            logger.exception("Task %s[%s]: workflow not planned", job.task_name, job.task_id)
            return None

    def _deliver(self, rows: list[Job]) -> None:
        """Publish follow-up jobs written with an outcome; one that cannot be published
        now stays ``pending`` for the reconciler."""
        try:
            self.app.deliver_all(rows)
        except Exception as exc:
            logger.warning("follow-up jobs not published now (%r); the reconciler will", exc)

    def _attempt_result(self, job: Job, outcome: dict[str, Any]) -> AttemptResult:
        now = utcnow()
        status = outcome["status"]
        runtime = outcome.get("runtime") or 0.0

        def line(text: str) -> str:
            return log_line(now, job.attempts, self.name, text)

        if status == SUCCEEDED:
            value = outcome.get("result")
            return AttemptResult(
                states.SUCCEEDED,
                line(f"succeeded in {runtime:.3f}s"),
                result=serialization.RawJSON(value) if value else None,
            )
        if status == LOST:
            if job.attempts < job.max_attempts:
                return AttemptResult(
                    states.RETRYING,
                    line(f"lost: {outcome['error']}; retry now"),
                    error=f"WorkerLostError: {outcome['error']}",
                    eta=now,
                    result=serialization.dumps(failure.describe(WorkerLostError(outcome["error"]))),
                )
            return _lost_result(outcome["error"], line(f"lost: {outcome['error']}"))
        meta = serialization.dumps(outcome["exc"]) if outcome.get("exc") else None
        if status == RETRY:
            eta = retry_policy.next_run_at(now, _when(outcome.get("when")))
            new_max = outcome.get("max_retries")
            payload = None
            if outcome.get("args") is not None or outcome.get("kwargs") is not None:
                payload = serialization.dumps(
                    {
                        "args": outcome["args"] if outcome.get("args") is not None else job.args,
                        "kwargs": outcome["kwargs"]
                        if outcome.get("kwargs") is not None
                        else job.kwargs,
                    }
                )
            return AttemptResult(
                states.RETRYING,
                line(f"failed: {outcome['error']}; retry at {eta:%Y-%m-%dT%H:%M:%S.%fZ}"),
                result=meta,
                error=outcome["error"],
                traceback=outcome.get("traceback"),
                eta=eta,
                max_attempts=retry_policy.max_attempts_for(new_max)
                if new_max is not None
                else None,
                payload=payload,
            )
        assert status == FAILED, status
        return AttemptResult(
            states.FAILED,
            line(f"failed: {outcome['error']}"),
            result=meta,
            error=outcome["error"],
            traceback=outcome.get("traceback"),
        )

    # -- scheduler -------------------------------------------------------------------

    def _tick(self) -> None:
        if time.monotonic() >= self._next_reconcile:
            self._next_reconcile = time.monotonic() + self.heartbeat_interval
            self._reconcile()
        if time.monotonic() < self._next_tick:
            return
        self._next_tick = time.monotonic() + self.scheduler_interval
        try:
            count = self.app.store.publish_due(self.app.publish_job)
        except Exception as exc:  # broker or database down: try again next tick
            logger.warning("scheduler: publishing due jobs failed (%r)", exc)
            return
        if count:
            logger.info("scheduler: published %d due job(s)", count)

    # -- leases and the reconciler -----------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Renew the lease of every running job, from a thread of its own so that a long
        job in the solo pool (which blocks the main loop) still keeps its lease."""
        while not self._heartbeat_stop.wait(self.heartbeat_interval):
            try:
                self.app.store.heartbeat(list(self._running))
            except Exception as exc:  # the next beat tries again; a lease has slack
                logger.warning("heartbeat failed (%r)", exc)

    def _reconcile(self) -> None:
        """Retry jobs whose worker stopped renewing their lease, and republish rows left
        ``pending`` by a producer whose publish failed or who died after the commit."""
        store = self.app.store
        try:
            now = utcnow()
            for row in store.find_lost(now - self.lease_timeout):
                if row.task_id not in self._running:
                    self._release_lost(row, f"no heartbeat since {row.updated_at:%H:%M:%S}")
                    self._next_tick = 0.0  # publish it with this loop turn's scheduler
            requeued = store.requeue_stale_pending(now - self.pending_timeout)
        except Exception as exc:  # database down: the next turn tries again
            logger.warning("reconciler: %r", exc)
            return
        if requeued:
            logger.warning("reconciler: %d job(s) left pending will be published", requeued)
            self._next_tick = 0.0

    # -- database errors ---------------------------------------------------------

    def _store_call(self, method: Any, *args: Any) -> Any:
        """Call a store method, retrying while the database is unreachable.

        Nothing is acked meanwhile, so a worker cut off from its database holds its
        messages rather than losing what happened to them.
        """
        pause = 0.2
        while True:
            try:
                return method(*args)
            except StoreError as exc:
                logger.error("database unavailable (%s); retrying in %.1fs", exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)


def expand_name(name: str) -> str:
    """Celery's node-name placeholders: ``%h`` host, ``%n`` short host, ``%d`` domain."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    return name.replace("%h", host).replace("%n", short).replace("%d", domain)


def _lost_result(error: str, line: str | None = None) -> AttemptResult:
    exc = WorkerLostError(error)
    return AttemptResult(
        states.FAILED,
        line or f"lost: {error}",
        error=failure.summary(exc),
        result=serialization.dumps(failure.describe(exc)),
    )


def _when(value: Any) -> float | dt.datetime | None:
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return value


def _workflow_of(message: protocol.TaskMessage) -> serialization.RawJSON | None:
    """The canvas links a Celery client put in a message's embed, for the job's row."""
    workflow: dict[str, Any] = {
        key: message.embed.get(key) for key in ("callbacks", "errbacks", "chain", "chord")
    }
    if message.group_index is not None:
        workflow["group_index"] = message.group_index
    if not any(value is not None for value in workflow.values()):
        return None
    return serialization.dumps(workflow)


def _header_id(delivery: Delivery) -> str | None:
    value = (delivery.headers or {}).get("id")
    return value if isinstance(value, str) else None
