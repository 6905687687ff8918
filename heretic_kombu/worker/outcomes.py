"""Outcome decisions: how an attempt ended, and what the worker writes for it.

A pool reports each attempt's end as a JSON-able dict (it crosses the pipe to a prefork
child); :meth:`Ending.from_report` reads it once into a frozen, typed :class:`Ending`.
The functions below turn an ending into the :class:`~heretic_kombu.store.AttemptResult`
the store writes (row status, ``attempt_logs`` line, error, next eta...). They are pure:
no store, no broker, no clock (the moment is passed in), so the worker only applies
what they decide, and each decision can be tested alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, NamedTuple

from .. import failure, serialization
from .. import retry as retry_policy
from ..exceptions import WorkerLostError
from ..execution import Outcome
from ..status import Status
from ..store import AttemptResult, Job, log_line


@dataclasses.dataclass(frozen=True, slots=True)
class Ending:
    """How one attempt ended, as its pool reported it."""

    status: Outcome
    runtime: float = 0.0  # seconds the attempt ran (0.0 when the pool could not tell)
    result: str | None = None  # SUCCEEDED: the return value as JSON text (None: ignored)
    exc: dict[str, Any] | None = None  # the error, as failure.describe() tells it
    error: str | None = None  # the error's one-line summary
    traceback: str | None = None
    # RETRY: when (countdown seconds or a moment), and what task.retry() changed.
    when: float | dt.datetime | None = None
    max_retries: int | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    # REJECTED: whether Reject(requeue=True), and its reason.
    requeue: bool = False
    reason: str | None = None

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Ending:
        """Read a pool's outcome dict (see :func:`heretic_kombu.execution.execute`)."""
        when = report.get("when")
        return cls(
            status=Outcome(report["status"]),
            runtime=report.get("runtime") or 0.0,
            result=report.get("result"),
            exc=report.get("exc"),
            error=report.get("error"),
            traceback=report.get("traceback"),
            # An eta crosses the pipe as ISO text.
            when=dt.datetime.fromisoformat(when) if isinstance(when, str) else when,
            max_retries=report.get("max_retries"),
            args=report.get("args"),
            kwargs=report.get("kwargs"),
            requeue=bool(report.get("requeue")),
            reason=report.get("reason"),
        )

    @property
    def meta(self) -> serialization.RawJSON | None:
        """The error's description as the row's ``result`` (None if there was none)."""
        return serialization.dumps(self.exc) if self.exc else None


def attempt_result(job: Job, ending: Ending, *, now: dt.datetime, worker: str) -> AttemptResult:
    """What to record for an attempt that ended on its own (succeeded, raised, asked
    for a retry, or was lost with its process): Reject and Ignore are settled apart
    (:func:`rejection`, :func:`ignored_result`)."""

    def line(text: str) -> str:
        return log_line(now, job.attempts, worker, text)

    status = ending.status
    if status == Outcome.SUCCEEDED:
        value = ending.result
        return AttemptResult(
            Status.SUCCEEDED,
            line(f"succeeded in {ending.runtime:.3f}s"),
            result=serialization.RawJSON(value) if value else None,
        )
    if status == Outcome.LOST:
        if job.attempts < job.max_attempts:
            return AttemptResult(
                Status.RETRYING,
                line(f"lost: {ending.error}; retry now"),
                error=f"WorkerLostError: {ending.error}",
                eta=now,
                result=serialization.dumps(failure.describe(WorkerLostError(ending.error))),
            )
        return lost_result(str(ending.error), line(f"lost: {ending.error}"))
    meta = ending.meta
    if status == Outcome.RETRY:
        eta = retry_policy.next_run_at(now, ending.when)
        new_max = ending.max_retries
        payload = None
        if ending.args is not None or ending.kwargs is not None:
            payload = serialization.dumps(
                {
                    "args": ending.args if ending.args is not None else job.args,
                    "kwargs": ending.kwargs if ending.kwargs is not None else job.kwargs,
                }
            )
        return AttemptResult(
            Status.RETRYING,
            line(f"failed: {ending.error}; retry at {eta:%Y-%m-%dT%H:%M:%S.%fZ}"),
            result=meta,
            error=ending.error,
            traceback=ending.traceback,
            eta=eta,
            max_attempts=retry_policy.max_attempts_for(new_max) if new_max is not None else None,
            payload=payload,
        )
    assert status == Outcome.FAILED, status
    return AttemptResult(
        Status.FAILED,
        line(f"failed: {ending.error}"),
        result=meta,
        error=ending.error,
        traceback=ending.traceback,
    )


def lost_result(error: str, line: str | None = None) -> AttemptResult:
    """A job failed for good because its last allowed attempt was lost."""
    exc = WorkerLostError(error)
    return AttemptResult(
        Status.FAILED,
        line or f"lost: {error}",
        error=failure.summary(exc),
        result=serialization.dumps(failure.describe(exc)),
    )


class LostAttempt(NamedTuple):
    """What to write for an attempt lost with the worker that ran it (the reconciler,
    or a message redelivered while its row says ``started``)."""

    line: str  # its attempt_logs line
    give_up: AttemptResult | None  # the job fails for good (last attempt), else None


def lost_attempt(row: Job, why: str, *, now: dt.datetime) -> LostAttempt:
    """Decide for ``row``'s lost attempt: due again, or failed if it was the last."""
    line = log_line(now, row.attempts, row.worker or "?", f"lost: {why}")
    if row.attempts >= row.max_attempts:
        return LostAttempt(
            line, lost_result(f"worker {row.worker} lost the last allowed attempt: {why}")
        )
    return LostAttempt(line, None)


def ignored_result(job: Job, *, now: dt.datetime, worker: str) -> AttemptResult:
    """The task raised Ignore: the job ends ``ignored``, with no result."""
    return AttemptResult(
        Status.IGNORED, log_line(now, job.attempts, worker, "ignored (the task raised Ignore)")
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """What a Reject decides: requeue the job, or fail it and dead-letter its message."""

    result: AttemptResult  # what to record
    requeued: bool
    reason: str  # the Reject's reason
    dead_letter_reason: str | None  # the message's dead-letter reason (None if requeued)


def rejection(job: Job, ending: Ending, *, now: dt.datetime, worker: str) -> Rejection:
    """The task raised Reject: requeue the job (while it has attempts left), or fail it
    and dead-letter its message, as Celery's Reject(requeue=False) does."""
    reason = ending.reason or "rejected"
    meta = ending.meta

    def line(text: str) -> str:
        return log_line(now, job.attempts, worker, text)

    if ending.requeue and job.attempts < job.max_attempts:
        requeued = AttemptResult(
            Status.RETRYING,
            line(f"rejected: {reason}; requeued"),
            result=meta,
            error=ending.error,
            eta=now,
        )
        return Rejection(requeued, True, reason, None)
    why = "rejected"
    if ending.requeue:
        why = f"rejected with requeue, but all {job.max_attempts} attempt(s) are used"
    failed = AttemptResult(
        Status.FAILED,
        line(f"{why}: {reason}; message dead-lettered"),
        result=meta,
        error=ending.error,
        traceback=ending.traceback,
    )
    return Rejection(failed, False, reason, f"task {job.task_name} {why}: {reason}")
