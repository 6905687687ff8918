"""Running a task: one attempt and how it ended, and eager runs in the caller's process.

:func:`execute` is what a pool slot runs (in a prefork child, a thread, or inline). It
takes and returns plain JSON-able dicts, so nothing but JSON ever crosses the pipe to a
child process. It never raises: every ending (success, retry, failure) becomes an
outcome for the worker to record. Autoretry (``autoretry_for`` + ``retry_backoff``) is
applied here, exactly as Celery wraps a task's ``run``.

Eager runs (``task.apply()``, ``signature.apply()``, ``task_always_eager``) run the same
attempts here, retries included (:func:`run_eagerly`), and follow a canvas's links,
chains, groups and chords in this process (:func:`apply_eagerly`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import logging
import signal as _signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import failure, serialization, signals, states
from . import retry as retry_policy
from .core.context import Context
from .core.protocols import AppLike, RunnableTask
from .exceptions import (
    EncodeError,
    Ignore,
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
)
from .protocol import new_task_id
from .result import EagerResult, GroupResult
from .signatures import Signature, chain, chord, group, signature, upgrade_chain

logger = logging.getLogger("heretic_kombu.worker")


class Outcome(str, enum.Enum):
    """How an attempt ended, as :func:`execute` (or the pool) reports it: the ``status``
    of an outcome dict. An attempt's end is not a row's status (a lost or rejected
    attempt leaves the row in one of several), but where it names one it is spelled as
    :class:`~heretic_kombu.status.Status` spells it. A ``str`` so that it crosses the
    pipe to a child as plain JSON and compares equal to the text read back."""

    SUCCEEDED = "succeeded"
    RETRY = "retrying"
    FAILED = "failed"
    LOST = "lost"  # reported by a pool whose child died during the attempt
    REJECTED = "rejected"  # the task raised Reject: dead-letter, or requeue
    IGNORED = "ignored"  # the task raised Ignore: end the job without an outcome

    def __str__(self) -> str:  # the value, in f-strings too, on every Python version
        return str(self.value)


# The names the outcome statuses had before Outcome; still importable.
SUCCEEDED = Outcome.SUCCEEDED
RETRY = Outcome.RETRY
FAILED = Outcome.FAILED
LOST = Outcome.LOST
REJECTED = Outcome.REJECTED
IGNORED = Outcome.IGNORED


def execute(app: AppLike, call: dict[str, Any]) -> dict[str, Any]:
    """Run one attempt described by ``call``; return its outcome (never raises)."""
    started = time.perf_counter()
    try:
        task = app.tasks[call["task"]]
    except KeyError:
        outcome = _failed(NotRegistered(f"task {call['task']!r} is not registered"), None)
    else:
        request = Context(
            id=call["id"],
            task=call["task"],
            args=call["args"],
            kwargs=call["kwargs"],
            retries=call["retries"],
            max_attempts=call["max_attempts"],
            job_id=call.get("job_id"),
            eta=_parse_time(call.get("eta")),
            expires=_parse_time(call.get("expires")),
            root_id=call.get("root_id"),
            parent_id=call.get("parent_id"),
            group=call.get("group"),
            hostname=call.get("hostname"),
            delivery_info={"routing_key": call.get("queue"), "exchange": call.get("queue")},
            called_directly=False,
            is_eager=False,
            timelimit=(call.get("time_limit"), call.get("soft_time_limit")),
        )
        outcome = run_task(task, request)
    outcome["runtime"] = time.perf_counter() - started
    return outcome


def run_task(task: RunnableTask, request: Context) -> dict[str, Any]:
    """Run ``task`` under ``request``, with Celery's task signals; return the outcome dict."""
    task.push_request(request)
    try:
        signals.task_prerun.send(
            sender=task, task_id=request.id, task=task, args=request.args, kwargs=request.kwargs
        )
        _hook(task.before_start, request.id, request.args, request.kwargs)
        value, outcome = _attempt(task, request)
        if outcome["status"] in (REJECTED, IGNORED):
            _announce_predicate(task, request, outcome)
        else:
            _announce(task, request, value, outcome)
        return outcome
    finally:
        task.pop_request()


def _attempt(task: RunnableTask, request: Context) -> tuple[Any, dict[str, Any]]:
    try:
        try:
            with _soft_time_limit(task, request):
                value = task.run(*request.args, **request.kwargs)
        except (Retry, Reject, Ignore):
            raise  # the task's explicit decision: never turned into an autoretry
        except Exception as exc:
            _autoretry(task, exc)
            raise
        encoded = None if task.ignore_result else serialization.dumps(value)
        return value, {"status": SUCCEEDED, "result": encoded}
    except Retry as retry_signal:
        return None, _retry(retry_signal)
    except Reject as reject:
        return None, _rejected(reject)
    except Ignore as ignore:
        # "exception" only for eager runs in this process; dropped before crossing a pipe.
        return None, {"status": IGNORED, "exception": ignore}
    except EncodeError as exc:
        return None, _failed(EncodeError(f"the task's return value is not JSON: {exc}"), exc)
    except (Exception, SystemExit) as exc:
        return None, _failed(exc, exc)


def _announce(task: RunnableTask, request: Context, value: Any, outcome: dict[str, Any]) -> None:
    """Send task_success / task_retry / task_failure, then task_postrun, as Celery does."""
    status = outcome["status"]
    einfo = _einfo(outcome)
    ids = (request.id, request.args, request.kwargs)
    if status == SUCCEEDED:
        _hook(task.on_success, value, *ids)
        signals.task_success.send(sender=task, result=value)
        state, retval = states.CELERY_SUCCESS, value
    elif status == RETRY:
        _hook(task.on_retry, outcome.get("cause"), *ids, einfo)
        signals.task_retry.send(sender=task, request=request, reason=outcome["error"], einfo=einfo)
        state, retval = states.CELERY_RETRY, None
    else:
        exception = outcome.get("exception")
        _hook(task.on_failure, exception, *ids, einfo)
        signals.task_failure.send(
            sender=task,
            task_id=request.id,
            exception=exception,
            args=request.args,
            kwargs=request.kwargs,
            traceback=outcome.get("traceback"),
            einfo=einfo,
        )
        state, retval = states.CELERY_FAILURE, exception
    if status != RETRY:  # Celery calls after_return only when the task ended
        _hook(task.after_return, state, retval, *ids, einfo)
    signals.task_postrun.send(
        sender=task,
        task_id=request.id,
        task=task,
        args=request.args,
        kwargs=request.kwargs,
        retval=retval,
        state=state,
    )


def _einfo(outcome: dict[str, Any]) -> failure.ExceptionInfo | None:
    """Celery's ``einfo`` of an attempt that raised: the live exception (for a retry, the
    exception that caused it) with the traceback the row keeps."""
    text = outcome.get("traceback")
    exc = outcome.get("cause") if outcome["status"] == RETRY else outcome.get("exception")
    if not isinstance(exc, BaseException):
        exc = outcome.get("exception")
    if text is None or not isinstance(exc, BaseException):
        return None
    return failure.ExceptionInfo(exc, text)


def _announce_predicate(task: RunnableTask, request: Context, outcome: dict[str, Any]) -> None:
    """Signals for an attempt that raised Reject or Ignore, as Celery sends them: a
    Reject without requeue is a failure (``task_failure``); then ``task_postrun`` with
    Celery's state ``REJECTED`` or ``IGNORED``."""
    if outcome["status"] == REJECTED:
        state = states.CELERY_REJECTED
        if not outcome.get("requeue"):
            signals.task_failure.send(
                sender=task,
                task_id=request.id,
                exception=outcome.get("exception"),
                args=request.args,
                kwargs=request.kwargs,
                traceback=outcome.get("traceback"),
                einfo=_einfo(outcome),
            )
    else:
        state = states.CELERY_IGNORED
    signals.task_postrun.send(
        sender=task,
        task_id=request.id,
        task=task,
        args=request.args,
        kwargs=request.kwargs,
        retval=outcome.get("exception"),
        state=state,
    )


def announce_hard_time_limit(app: AppLike, call: dict[str, Any], exc: BaseException) -> None:
    """In the worker, after the pool killed a job at its hard time limit: Celery's
    ``on_failure`` and ``after_return`` hooks and ``task_failure`` (the child that would
    have sent them is gone)."""
    task = app.tasks.get(call.get("task") or "")
    if task is None:
        return
    args, kwargs = call.get("args") or [], call.get("kwargs") or {}
    _hook(task.on_failure, exc, call.get("id"), args, kwargs, None)
    _hook(task.after_return, states.CELERY_FAILURE, exc, call.get("id"), args, kwargs, None)
    signals.task_failure.send(
        sender=task,
        task_id=call.get("id"),
        exception=exc,
        args=args,
        kwargs=kwargs,
        traceback=None,
        einfo=None,
    )


@contextlib.contextmanager
def _soft_time_limit(task: RunnableTask, request: Context) -> Iterator[None]:
    """Raise :class:`SoftTimeLimitExceeded` inside the body after the soft time limit.

    Uses ``SIGALRM``, which only the main thread of a process can receive: a prefork
    child and the solo pool run tasks there; the threads pool cannot, and says so once.
    """
    soft = (request.timelimit or (None, None))[1]
    if not soft:
        yield
        return
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        _signal, "setitimer"
    ):
        _warn_once(
            "soft time limits need the prefork or solo pool: not enforced for"
            f" {task.name} in this pool"
        )
        yield
        return
    armed = [True]

    def expired(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise SoftTimeLimitExceeded(f"soft time limit ({soft:g}s) exceeded")

    previous = _signal.signal(_signal.SIGALRM, expired)
    _signal.setitimer(_signal.ITIMER_REAL, float(soft))
    try:
        yield
    finally:
        armed[0] = False
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, previous if previous is not None else _signal.SIG_DFL)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _hook(method: Any, *args: Any) -> None:
    """Call a task hook; a hook that raises is logged and does not change the outcome."""
    try:
        method(*args)
    except Exception:
        logger.exception("task hook %s failed", getattr(method, "__name__", method))


def run_eagerly(
    task: RunnableTask, args: list[Any], kwargs: dict[str, Any], task_id: str | None = None
) -> EagerResult:
    """Run ``task`` here until it succeeds or fails for good (``task.apply()``)."""
    task_id = task_id or new_task_id()
    max_attempts = retry_policy.max_attempts_for(task.max_retries)
    retries = 0
    while True:
        request = Context(
            id=task_id,
            task=task.name,
            args=args,
            kwargs=kwargs,
            retries=retries,
            max_attempts=max_attempts,
            root_id=task_id,
            called_directly=False,
            is_eager=True,
        )
        outcome = run_task(task, request)
        if outcome["status"] == RETRY:
            retries += 1
            if outcome.get("max_retries") is not None:
                max_attempts = retry_policy.max_attempts_for(outcome["max_retries"])
            args = outcome["args"] if outcome.get("args") is not None else args
            kwargs = outcome["kwargs"] if outcome.get("kwargs") is not None else kwargs
            continue
        if outcome["status"] == SUCCEEDED:
            value = serialization.loads(outcome["result"]) if outcome["result"] else None
            return EagerResult(task_id, value, states.CELERY_SUCCESS)
        if outcome["status"] in (REJECTED, IGNORED):  # Celery's eager states for them
            rejected = outcome["status"] == REJECTED
            state = states.CELERY_REJECTED if rejected else states.CELERY_IGNORED
            return EagerResult(task_id, outcome.get("exception"), state)
        return EagerResult(
            task_id, outcome["exception"], states.CELERY_FAILURE, outcome.get("traceback")
        )


def apply_eagerly(sig: Signature) -> Any:
    """Run a signature and what follows it in this process; return the last result."""
    if isinstance(sig, chain):
        value: Any = None
        result: Any = None
        for index, step in enumerate(upgrade_chain(sig.tasks, sig.app)):
            result = apply_eagerly(step.clone([value]) if index else step)
            value = result.get(propagate=True) if hasattr(result, "get") else result
        return result
    if isinstance(sig, group):
        members = [apply_eagerly(member) for member in sig.tasks]
        return GroupResult(sig.id or new_task_id(), members, app=sig.app)
    if isinstance(sig, chord):
        header = apply_eagerly(sig.header)
        body = sig.body
        assert body is not None
        return apply_eagerly(body.clone([header.get()]))
    options = sig.options
    outcome: EagerResult = sig.type.apply(sig.args, sig.kwargs, task_id=options.get("task_id"))
    followers = options.get("link" if outcome.successful() else "link_error") or ()
    for follower in followers:
        argument = outcome.result if outcome.successful() else outcome.id
        apply_eagerly(signature(follower, app=sig.app).clone([argument]))
    if outcome.failed() and sig.app.settings.eager_propagates:
        raise outcome.result  # Celery's task_eager_propagates, for canvases as for tasks
    return outcome


def _autoretry(task: RunnableTask, exc: Exception) -> None:
    """Turn ``exc`` into a retry when the task's autoretry options cover it."""
    if not task.autoretry_for or not isinstance(exc, task.autoretry_for):
        return
    if task.dont_autoretry_for and isinstance(exc, task.dont_autoretry_for):
        return
    options = dict(task.retry_kwargs)
    if task.retry_backoff:
        factor = 1.0 if task.retry_backoff is True else float(task.retry_backoff)
        options["countdown"] = retry_policy.backoff_delay(
            factor, task.request.retries, task.retry_backoff_max, task.retry_jitter
        )
    task.retry(exc=exc, **options)


def _retry(signal: Retry) -> dict[str, Any]:
    when = signal.when
    cause = signal.exc
    return {
        "status": RETRY,
        "when": when.isoformat() if isinstance(when, dt.datetime) else when,
        "exc": failure.describe(cause) if cause is not None else None,
        "error": failure.summary(cause) if cause is not None else str(signal),
        "traceback": failure.formatted(cause) if cause is not None else None,
        "max_retries": getattr(signal, "max_retries", None),
        "args": getattr(signal, "new_args", None),
        "kwargs": getattr(signal, "new_kwargs", None),
        # Only for hooks in this process; dropped before crossing a pipe.
        "cause": cause,
    }


def _rejected(reject: Reject) -> dict[str, Any]:
    return {
        "status": REJECTED,
        "requeue": bool(reject.requeue),
        "reason": str(reject),
        "exc": failure.describe(reject),
        "error": failure.summary(reject),
        "traceback": failure.formatted(reject),
        # Only for signals in this process; dropped before crossing a pipe.
        "exception": reject,
    }


def _failed(exc: BaseException, raised: BaseException | None) -> dict[str, Any]:
    return {
        "status": FAILED,
        "exc": failure.describe(exc),
        "error": failure.summary(exc),
        "traceback": failure.formatted(raised) if raised is not None else None,
        # Only for eager runs in this process; dropped before crossing a pipe.
        "exception": exc,
    }


def _parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None
