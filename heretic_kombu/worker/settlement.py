"""Settlement: applying what happened to a job claimed here, once it is decided.

Records the attempts a runtime control ended (terminated by revoke, Reject, Ignore) and
the attempts lost with their worker, dead-letters messages, publishes the follow-ups an
outcome wrote, and reports recorded attempts (logs, ``job_failed``, ``task_revoked``).
What to write is decided by :mod:`.outcomes`; the order of effects is kept here: the
commit first, then the ack or dead letter, then follow-ups and reports.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .. import canvas, failure, serialization
from ..broker import Delivery, Subscription
from ..exceptions import MalformedMessage, StoreError, WorkerLostError
from ..execution import Outcome
from ..status import Status
from ..store import Attempt, AttemptResult, Job, NextSteps, RowError, utcnow
from .gates import Revocations, send_revoked
from .outcomes import Ending, ignored_result, lost_attempt, rejection
from .turns import Ended

if TYPE_CHECKING:
    from ..app import Heretic

logger = logging.getLogger("heretic_kombu.worker")

_T = TypeVar("_T")

#: How many times a message this worker could not run was passed back to its queue.
PASSED_ON_HEADER = "x-heretic-passed-on"


class Settlement:
    """Applies outcomes for the worker named ``name``; ``publish_soon`` asks the
    scheduler to publish due jobs with this loop turn."""

    def __init__(
        self,
        app: Heretic,
        name: str,
        revocations: Revocations,
        publish_soon: Callable[[], None],
    ) -> None:
        self.app = app
        self.name = name
        self._revocations = revocations
        self._publish_soon = publish_soon
        #: The worker's broker subscription, once it has subscribed.
        self._subscription: Subscription | None = None

    def attach(self, subscription: Subscription) -> None:
        """Use ``subscription`` to ack and dead-letter messages."""
        self._subscription = subscription

    def internal_error(self, delivery: Delivery, exc: Exception) -> None:
        # A bug of ours must not crash every worker the message is redelivered to.
        logger.exception("unexpected error handling a message")
        self.dead_letter(delivery, f"internal error: {exc!r}", header_id(delivery))

    def release_lost(self, row: Job, why: str) -> bool:
        """Log the lost attempt of ``row`` and make it due again (or fail it, if it was
        the last allowed one). Returns ``True`` if the job may run again."""
        line, give_up = lost_attempt(row, why, now=utcnow())
        then = self.next_steps(row, give_up) if give_up is not None else None
        followups = store_call(self.app.store.release_lost_attempt, row, line, give_up, then)
        if followups is not None:
            self.deliver(followups)
            logger.warning(
                "Task %s[%s] attempt %d was lost with worker %s: %s",
                row.task_name,
                row.task_id,
                row.attempts,
                row.worker,
                why,
            )
        return give_up is None

    def pass_on(self, delivery: Delivery, reason: str, task_id: str | None) -> None:
        """A message this worker cannot run (its task is not registered here): its job's
        row is left as it is; the message goes back to its queue, for a worker that knows
        the task, at most ``unknown_task_requeues`` times (a header counts them), then
        to the dead-letter queue with ``reason``."""
        headers = dict(delivery.headers or {})
        passed = headers.get(PASSED_ON_HEADER)
        passed = passed if isinstance(passed, int) and not isinstance(passed, bool) else 0
        if passed >= self.app.settings.unknown_task_requeues:
            self.dead_letter(delivery, f"{reason} (passed on {passed} time(s))", task_id)
            return
        headers[PASSED_ON_HEADER] = passed + 1
        assert self._subscription is not None
        if not self._subscription.is_live(delivery):
            return  # its connection is gone: the broker delivers it again
        try:
            self.app.broker.publish_copy(delivery, headers)
        except Exception as exc:  # no copy: the message itself is the one to keep
            self.dead_letter(delivery, f"{reason} (not passed on: {exc!r})", task_id)
            return
        self._subscription.ack(delivery)
        logger.warning(
            "message for task id %s passed back to %s (%d of %d): %s",
            task_id,
            delivery.queue,
            passed + 1,
            self.app.settings.unknown_task_requeues,
            reason,
        )

    def dead_letter(self, delivery: Delivery, reason: str, task_id: str | None) -> None:
        logger.error("message dead-lettered to %s.dead: %s", delivery.queue, reason)
        assert self._subscription is not None
        self._subscription.dead_letter(delivery, reason)
        error = MalformedMessage(reason)
        error.reason, error.queue, error.task_id = reason, delivery.queue, task_id  # type: ignore[attr-defined]
        self.app.emit("job_error", error)

    def after_record(
        self,
        finished: list[Ended],
        results: list[AttemptResult],
        answers: list[list[Job] | None],
    ) -> None:
        for (_, job, _), followups in zip(finished, answers, strict=True):
            if followups is None:
                logger.warning(
                    "Task %s[%s] attempt %d was superseded; its outcome is not recorded",
                    job.task_name,
                    job.task_id,
                    job.attempts,
                )
        # Only now, with the outcomes committed, may the messages go (invariant 2): in
        # one frame on RabbitMQ when their delivery tags allow it.
        self._subscription.ack_many([delivery for delivery, _, _ in finished])  # type: ignore[union-attr]
        for (_, job, ending), result, followups in zip(finished, results, answers, strict=True):
            if followups:
                self.deliver(followups)
            self._report(job, ending, result)

    def _report(self, job: Job, ending: Ending, result: AttemptResult) -> None:
        """Log a recorded attempt, and fire ``job_failed`` for a failed one."""
        if result.status == Status.SUCCEEDED:
            logger.info(
                "Task %s[%s] succeeded in %.3fs", job.task_name, job.task_id, ending.runtime
            )
            return
        exc = (
            failure.rebuild(serialization.loads(result.result))
            if result.result
            else WorkerLostError(result.error)
        )
        level = logging.WARNING if result.status == Status.RETRYING else logging.ERROR
        task = self.app.tasks.get(job.task_name)
        if task is not None and task.throws and isinstance(exc, task.throws):
            level = logging.INFO  # an expected error (Celery's ``throws``): not an error log
        logger.log(
            level, "Task %s[%s] %s", job.task_name, job.task_id, result.log_line.split(": ", 1)[-1]
        )
        self.app.emit("job_failed", exc, store_call(self.app.store.get, job.task_id) or job)
        if result.status == Status.RETRYING and result.eta is not None and result.eta <= utcnow():
            self._publish_soon()  # the immediate retry now, not at the next tick

    def next_steps(self, job: Job, result: AttemptResult) -> NextSteps | None:
        """Plan what the job's workflow sends next (callbacks, chain, chord, errbacks)."""
        if not job.workflow or result.status not in (Status.SUCCEEDED, Status.FAILED):
            return None
        if not any(job.workflow.get(key) for key in canvas.LINKS):
            # Nothing can follow (e.g. a group member: only its group_index): no plan,
            # and the turn stays a single statement (JobStore.record_and_claim).
            return None
        value = serialization.loads(result.result) if result.result else None
        try:
            return canvas.next_steps(self.app, job, result.status, value, result.error)
        except Exception:
            logger.exception("Task %s[%s]: workflow not planned", job.task_name, job.task_id)
            return None

    def deliver(self, rows: list[Job]) -> None:
        """Publish follow-up jobs written with an outcome; one that cannot be published
        now stays ``pending`` for the reconciler."""
        try:
            self.app.deliver_all(rows)
        except Exception as exc:
            logger.warning("follow-up jobs not published now (%r); the reconciler will", exc)

    def control_outcome(self, delivery: Delivery, job: Job, ending: Ending) -> bool:
        """Record an attempt that a runtime control ended: terminated by revoke, or
        ended by the task raising Reject or Ignore. ``False`` for any other outcome."""
        signum = self._revocations.ended(job.task_id)
        if signum is not None:
            # The row already says revoked ("terminated (SIG...)"), with its log line.
            self._subscription.ack(delivery)  # type: ignore[union-attr]
            logger.warning(
                "Task %s[%s] terminated (%s); the job stays revoked",
                job.task_name,
                job.task_id,
                signal.Signals(signum).name,
            )
            self.send_revoked(job, delivery, terminated=True, signum=signum, expired=False)
            return True
        if ending.status == Outcome.IGNORED:
            ignored = ignored_result(job, now=utcnow(), worker=self.name)
            store_call(self.app.store.record_attempt, job.task_id, job.attempts, ignored, None)
            self._subscription.ack(delivery)  # type: ignore[union-attr]
            logger.info("Task %s[%s] ignored", job.task_name, job.task_id)
            return True
        if ending.status == Outcome.REJECTED:
            self._record_rejected(delivery, job, ending)
            return True
        return False

    def _record_rejected(self, delivery: Delivery, job: Job, ending: Ending) -> None:
        """The task raised Reject: record what :func:`.outcomes.rejection` decides, then
        let the message go (dead-lettered if the job failed)."""
        decided = rejection(job, ending, now=utcnow(), worker=self.name)
        if decided.requeued:
            store_call(
                self.app.store.record_attempt, job.task_id, job.attempts, decided.result, None
            )
            self._subscription.ack(delivery)  # type: ignore[union-attr]
            self._publish_soon()  # the scheduler publishes it again with this turn
            logger.info(
                "Task %s[%s] rejected and requeued: %s", job.task_name, job.task_id, decided.reason
            )
            return
        failed = decided.result
        then = self.next_steps(job, failed)
        followups = store_call(
            self.app.store.record_attempt, job.task_id, job.attempts, failed, then
        )
        # Only now, with the outcome committed, may the message go (invariant 2).
        assert decided.dead_letter_reason is not None
        self.dead_letter(delivery, decided.dead_letter_reason, job.task_id)
        if followups:
            self.deliver(followups)
        meta = failed.result
        exc = (
            failure.rebuild(serialization.loads(meta)) if meta else WorkerLostError(decided.reason)
        )
        self.app.emit("job_failed", exc, store_call(self.app.store.get, job.task_id) or job)

    # -- one bad row never holds up the others (issue 15) ----------------------------

    def set_aside(self, task_id: str, reason: str, attempt: int | None = None) -> None:
        """Fail a job whose row this worker cannot write or read, with ``reason``
        (logged once: the failed row is not handled again)."""
        try:
            failed = store_call(self.app.store.set_aside, task_id, reason, attempt)
        except RowError as exc:
            logger.error("job %s cannot be set aside either (%s)", task_id, exc)
            return
        if failed:
            logger.error("job %s set aside (failed): %s", task_id, reason)

    def separately(
        self, finished: list[Ended], results: list[AttemptResult], error: RowError
    ) -> tuple[list[Ended], list[AttemptResult], list[list[Job] | None]]:
        """A turn's record failed on a data or constraint error (one attempt's values
        the table refuses, a follow-up whose row exists already): record each attempt in
        a statement of its own. One that fails again is set aside (its job failed with
        the reason, its message acked); returns the others, their results and answers,
        for :meth:`after_record`."""
        logger.warning("a turn's record failed (%s): recording its attempts one by one", error)
        kept: list[Ended] = []
        kept_results: list[AttemptResult] = []
        answers: list[list[Job] | None] = []
        for ended, result in zip(finished, results, strict=True):
            delivery, job, _ = ended
            then = self.next_steps(job, result)
            try:
                answer = store_call(
                    self.app.store.record_attempts,
                    [Attempt(job.task_id, job.attempts, result, then)],
                )[0]
            except RowError as exc:
                self.set_aside(job.task_id, f"outcome cannot be recorded: {exc}", job.attempts)
                self._subscription.ack(delivery)  # type: ignore[union-attr]
                continue
            kept.append(ended)
            kept_results.append(result)
            answers.append(answer)
        return kept, kept_results, answers

    def claim_separately(
        self, batch: list[tuple[Delivery, Any]], worker: str
    ) -> tuple[list[tuple[Delivery, Any]], dict[str, Job]]:
        """A turn's claim failed on a data or constraint error (e.g. a message whose
        retries make ``attempts`` overflow its column): claim each message alone. One
        that fails again is set aside (its job failed with the reason, its message
        dead-lettered); returns the other messages and what was claimed for them."""
        kept: list[tuple[Delivery, Any]] = []
        claimed: dict[str, Job] = {}
        for delivery, message in batch:
            try:
                claimed.update(store_call(self.app.store.claim_many, [message.id], worker))
            except RowError as exc:
                reason = f"job cannot be claimed: {exc}"
                self.set_aside(message.id, reason)
                self.dead_letter(delivery, reason, message.id)
                continue
            kept.append((delivery, message))
        return kept, claimed

    def send_revoked(
        self, job: Job, delivery: Delivery, *, terminated: bool, signum: int | None, expired: bool
    ) -> None:
        send_revoked(
            self.app,
            job,
            delivery,
            hostname=self.name,
            terminated=terminated,
            signum=signum,
            expired=expired,
        )


#: Set by a worker's warm shutdown: :func:`store_call` stops waiting for the database.
stopping = threading.Event()


def store_call(method: Callable[..., _T], *args: Any) -> _T:
    """Call a store method, retrying while the database is unreachable.

    Nothing is acked meanwhile, so a worker cut off from its database holds its
    messages rather than losing what happened to them. A data or constraint error
    (:class:`~heretic_kombu.store.RowError`: a value out of its column's range, a
    duplicate key, a row that cannot be read back) is not an outage: retrying the same
    statement cannot help, so it is raised for the caller to set that job aside. Once the
    worker is shutting down (:data:`stopping`), an outage is raised too: its messages,
    unacked, are redelivered and the reconciler finds its rows.
    """
    pause = 0.2
    while True:
        try:
            return method(*args)
        except RowError:
            raise
        except StoreError as exc:
            if stopping.is_set():
                logger.error("database unavailable (%s) during shutdown: giving up", exc)
                raise
            logger.error("database unavailable (%s); retrying in %.1fs", exc, pause)
            stopping.wait(pause)
            pause = min(pause * 2, 5.0)


def header_id(delivery: Delivery) -> str | None:
    """The task id a message's headers name, if they name one."""
    value = (delivery.headers or {}).get("id")
    return value if isinstance(value, str) else None
