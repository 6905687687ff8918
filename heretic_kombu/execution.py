"""Running one attempt of a task and describing how it ended.

:func:`execute` is what a pool slot runs (in a prefork child, a thread, or inline). It
takes and returns plain JSON-able dicts, so nothing but JSON ever crosses the pipe to a
child process. It never raises: every ending (success, retry, failure) becomes an
outcome for the worker to record. Autoretry (``autoretry_for`` + ``retry_backoff``) is
applied here, exactly as Celery wraps a task's ``run``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import traceback
from typing import TYPE_CHECKING, Any

from . import failure, serialization, signals, states
from . import retry as retry_policy
from .exceptions import EncodeError, NotRegistered, Retry
from .protocol import new_task_id
from .task import Context, Task

if TYPE_CHECKING:
    from .app import Heretic
    from .result import EagerResult

logger = logging.getLogger("heretic_kombu.worker")

SUCCEEDED = "succeeded"
RETRY = "retry"
FAILED = "failed"
LOST = "lost"  # reported by a pool whose child died during the attempt


def execute(app: Heretic, call: dict[str, Any]) -> dict[str, Any]:
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
        )
        outcome = run_task(task, request)
    outcome["runtime"] = time.perf_counter() - started
    return outcome


def run_task(task: Task, request: Context) -> dict[str, Any]:
    """Run ``task`` under ``request``, with Celery's task signals; return the outcome dict."""
    task._push(request)
    try:
        signals.task_prerun.send(
            sender=task, task_id=request.id, task=task, args=request.args, kwargs=request.kwargs
        )
        _hook(task.before_start, request.id, request.args, request.kwargs)
        value, outcome = _attempt(task, request)
        _announce(task, request, value, outcome)
        return outcome
    finally:
        task._pop()


def _attempt(task: Task, request: Context) -> tuple[Any, dict[str, Any]]:
    try:
        try:
            value = task.run(*request.args, **request.kwargs)
        except Retry:
            raise
        except Exception as exc:
            _autoretry(task, exc)
            raise
        encoded = None if task.ignore_result else serialization.dumps(value)
        return value, {"status": SUCCEEDED, "result": encoded}
    except Retry as retry_signal:
        return None, _retry(retry_signal)
    except EncodeError as exc:
        return None, _failed(EncodeError(f"the task's return value is not JSON: {exc}"), exc)
    except (Exception, SystemExit) as exc:
        return None, _failed(exc, exc)


def _announce(task: Task, request: Context, value: Any, outcome: dict[str, Any]) -> None:
    """Send task_success / task_retry / task_failure, then task_postrun, as Celery does."""
    status = outcome["status"]
    einfo = outcome.get("traceback")
    ids = (request.id, request.args, request.kwargs)
    if status == SUCCEEDED:
        _hook(task.on_success, value, *ids)
        signals.task_success.send(sender=task, result=value)
        state, retval = states.CELERY_SUCCESS, value
    elif status == RETRY:
        _hook(task.on_retry, outcome.get("cause"), *ids, einfo)
        signals.task_retry.send(
            sender=task, request=request, reason=outcome["error"], einfo=outcome.get("traceback")
        )
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
            einfo=outcome.get("traceback"),
        )
        state, retval = states.CELERY_FAILURE, exception
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


def _hook(method: Any, *args: Any) -> None:
    """Call a task hook; a hook that raises is logged and does not change the outcome."""
    try:
        method(*args)
    except Exception:
        logger.exception("task hook %s failed", getattr(method, "__name__", method))


def run_eagerly(
    task: Task, args: list[Any], kwargs: dict[str, Any], task_id: str | None = None
) -> EagerResult:
    """Run ``task`` here until it succeeds or fails for good (``task.apply()``)."""
    from .result import EagerResult

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
        return EagerResult(
            task_id, outcome["exception"], states.CELERY_FAILURE, outcome.get("traceback")
        )


def _autoretry(task: Task, exc: Exception) -> None:
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
        "traceback": _format(cause) if cause is not None else None,
        "max_retries": getattr(signal, "max_retries", None),
        "args": getattr(signal, "new_args", None),
        "kwargs": getattr(signal, "new_kwargs", None),
        # Only for hooks in this process; dropped before crossing a pipe.
        "cause": cause,
    }


def _failed(exc: BaseException, raised: BaseException | None) -> dict[str, Any]:
    return {
        "status": FAILED,
        "exc": failure.describe(exc),
        "error": failure.summary(exc),
        "traceback": _format(raised) if raised is not None else None,
        # Only for eager runs in this process; dropped before crossing a pipe.
        "exception": exc,
    }


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None
