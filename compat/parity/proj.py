"""A Celery project written against Celery's documented API, for the parity suite.

The import block below is the ONLY place that differs between the two implementations:
``COMPAT_IMPL=celery`` imports Celery, ``COMPAT_IMPL=heretic`` imports heretic_kombu, and
every line after it is the same for both. The runner sets the environment:

- ``COMPAT_BROKER_URL``: the broker (the same RabbitMQ for both implementations);
- ``COMPAT_RESULT_BACKEND``: Celery's result backend (heretic ignores it: its table is
  the backend, found through ``HERETIC_DATABASE_URL``);
- ``COMPAT_QUEUE_PREFIX``: a prefix for every queue name, distinct per implementation and
  run, so that nothing one side sends is consumed by the other;
- ``COMPAT_STATE_DIR``: a directory both the worker and the client can read, where hooks,
  signals and callbacks record what they saw (one JSON line per event).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

IMPL = os.environ.get("COMPAT_IMPL", "celery")

# ---- the only implementation-specific lines ------------------------------------------
if IMPL == "celery":
    from celery import Celery, Task, chain, chord, group, shared_task, signals, signature
    from celery.exceptions import (
        Ignore,
        MaxRetriesExceededError,
        Reject,
        SoftTimeLimitExceeded,
    )
elif IMPL == "heretic":
    from heretic_kombu import Celery, Task, chain, chord, group, shared_task, signals, signature
    from heretic_kombu.exceptions import (
        Ignore,
        MaxRetriesExceededError,
        Reject,
        SoftTimeLimitExceeded,
    )
else:
    raise SystemExit(f"COMPAT_IMPL must be 'celery' or 'heretic', not {IMPL!r}")
# ---------------------------------------------------------------------------------------

__all__ = ["chain", "chord", "group", "signature"]  # used by the scenarios through `proj`

PREFIX = os.environ.get("COMPAT_QUEUE_PREFIX", f"parity.{IMPL}")
STATE_DIR = Path(
    os.environ.get("COMPAT_STATE_DIR", os.path.join(tempfile.gettempdir(), f"parity-state-{IMPL}"))
)
STATE_DIR.mkdir(parents=True, exist_ok=True)


def queue(name: str) -> str:
    """The run's name of the queue ``name`` (``default``, ``routed`` or ``other``)."""
    return f"{PREFIX}.{name}"


QUEUES = [queue("default"), queue("routed"), queue("other")]

app = Celery(
    "parity",
    broker=os.environ.get("COMPAT_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("COMPAT_RESULT_BACKEND"),
)
app.conf.update(
    task_default_queue=queue("default"),
    task_routes={"compat.parity.proj.routed_*": {"queue": queue("routed")}},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


# ---- where the worker leaves what it saw ---------------------------------------------


def record(key: str, kind: str, data: Any = None) -> None:
    """Append one event for ``key`` (usually a task id) to the shared state directory."""
    line = json.dumps({"kind": kind, "data": data}, default=repr)
    with open(STATE_DIR / f"{key}.jsonl", "a", encoding="utf-8") as out:
        out.write(line + "\n")


def recorded(key: str) -> list[dict[str, Any]]:
    """The events recorded for ``key``, in order."""
    path = STATE_DIR / f"{key}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _exc(exc: BaseException) -> list[str]:
    return [type(exc).__name__, str(exc)]


# ---- signals ---------------------------------------------------------------------------

#: Publish signals fire in the client: kept in memory there.
PUBLISHED: list[dict[str, Any]] = []


@signals.before_task_publish.connect
def _before_publish(sender=None, headers=None, routing_key=None, **kwargs):
    PUBLISHED.append(
        {"signal": "before_task_publish", "sender": sender, "id": (headers or {}).get("id")}
    )


@signals.after_task_publish.connect
def _after_publish(sender=None, headers=None, routing_key=None, **kwargs):
    PUBLISHED.append(
        {"signal": "after_task_publish", "sender": sender, "id": (headers or {}).get("id")}
    )


@signals.task_prerun.connect
def _prerun(sender=None, task_id=None, task=None, args=None, kwargs=None, **extra):
    record(
        task_id,
        "task_prerun",
        {"sender": getattr(sender, "name", sender), "args": list(args or ())},
    )


@signals.task_postrun.connect
def _postrun(sender=None, task_id=None, retval=None, state=None, **extra):
    value = _exc(retval) if isinstance(retval, BaseException) else retval
    record(task_id, "task_postrun", {"state": state, "retval": value})


@signals.task_success.connect
def _success(sender=None, result=None, **extra):
    record(sender.request.id, "task_success", {"result": result})


@signals.task_failure.connect
def _failure(sender=None, task_id=None, exception=None, **extra):
    record(task_id, "task_failure", {"exception": _exc(exception)})


@signals.task_retry.connect
def _retry(sender=None, request=None, reason=None, **extra):
    record(request.id, "task_retry", {"reason": str(reason)})


# ---- tasks -------------------------------------------------------------------------------


class ParityError(Exception):
    """A user exception with two arguments, to see how it travels back."""


@app.task
def add(x, y):
    return x + y


@app.task
def sub(x, y):
    return x - y


@app.task
def mul(x, y):
    return x * y


@app.task
def tsum(values):
    return sum(values)


@app.task
def echo(value):
    return value


@app.task
def fail(value=None):
    raise ValueError(f"boom {value}")


@app.task
def raise_custom(message, code):
    raise ParityError(message, code)


@app.task
def raise_keyerror(key):
    return {}[key]


@app.task
def arg_types(*args):
    return [type(value).__name__ for value in args]


@app.task
def stamp():
    return time.time()


@app.task
def sleeper(token, seconds):
    record(token, "started")
    time.sleep(seconds)
    return "slept"


@app.task(typing=False)
def untyped(x, y):
    return x + y


@shared_task
def shared_add(x, y):
    return x + y


# routing ---------------------------------------------------------------------------------


def _routing_key(request) -> str:
    key = (request.delivery_info or {}).get("routing_key") or ""
    return key[len(PREFIX) + 1 :] if key.startswith(PREFIX + ".") else key


@app.task(bind=True)
def whoami(self):
    return _routing_key(self.request)


@app.task(bind=True)
def routed_probe(self):
    return _routing_key(self.request)


@app.task(bind=True, queue=queue("other"))
def queued_probe(self):
    return _routing_key(self.request)


# the request -------------------------------------------------------------------------------


@app.task(bind=True)
def request_probe(self, *args, **kwargs):
    request = self.request
    return {
        "id": request.id,
        "root_id": request.root_id,
        "parent_id": request.parent_id,
        "args": list(request.args or ()),
        "kwargs": dict(request.kwargs or {}),
        "retries": request.retries,
        "is_eager": bool(request.is_eager),
        "called_directly": bool(request.called_directly),
        "hostname_set": bool(request.hostname),
        "routing_key": _routing_key(request),
        "eta": request.eta is not None,
        "expires": request.expires is not None,
        "group": request.group,
    }


@app.task(bind=True)
def lineage(self, value):
    return {"value": value, "parent_id": self.request.parent_id, "root_id": self.request.root_id}


# retries ---------------------------------------------------------------------------------


@app.task(bind=True, max_retries=3)
def flaky(self, failures):
    if self.request.retries < failures:
        raise self.retry(exc=ConnectionError("flaky"), countdown=0.1)
    return self.request.retries


@app.task(bind=True, max_retries=2)
def always_retry(self):
    raise self.retry(exc=ValueError("nope"), countdown=0.1)


@app.task(bind=True, max_retries=1, default_retry_delay=0.1)
def retry_without_exc(self):
    raise self.retry()


@app.task(bind=True, max_retries=1, default_retry_delay=0.1)
def catch_max_retries(self):
    try:
        raise self.retry()
    except MaxRetriesExceededError:
        return "gave up politely"


@app.task(
    bind=True, autoretry_for=(ConnectionError,), retry_kwargs={"max_retries": 3, "countdown": 0.1}
)
def autoretrying(self, failures):
    if self.request.retries < failures:
        raise ConnectionError(f"attempt {self.request.retries}")
    return self.request.retries


@app.task(
    bind=True, autoretry_for=(ConnectionError,), retry_kwargs={"max_retries": 1, "countdown": 0.1}
)
def autoretry_gives_up(self):
    raise ConnectionError(f"still down after {self.request.retries}")


@app.task(
    bind=True, autoretry_for=(ConnectionError,), retry_kwargs={"max_retries": 3, "countdown": 0.1}
)
def autoretry_other_error(self):
    raise KeyError("not retried")


# hooks -------------------------------------------------------------------------------------


class RecordingTask(Task):
    """A custom base class whose hooks record what they were given."""

    def before_start(self, task_id, args, kwargs):
        record(task_id, "before_start", {"args": list(args)})

    def on_success(self, retval, task_id, args, kwargs):
        record(task_id, "on_success", {"retval": retval})

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        record(task_id, "on_failure", {"exc": _exc(exc), "einfo": einfo is not None})

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        record(task_id, "on_retry", {"exc": type(exc).__name__})

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        value = _exc(retval) if isinstance(retval, BaseException) else retval
        record(task_id, "after_return", {"status": status, "retval": value})


@app.task(bind=True, base=RecordingTask, max_retries=2)
def hooked(self, mode):
    if mode == "fail":
        raise ValueError("hooked failure")
    if mode == "ignore":
        raise Ignore()
    if mode == "retry" and self.request.retries == 0:
        raise self.retry(exc=ConnectionError("once"), countdown=0.1)
    return f"{mode} done"


# state, results, expiry ------------------------------------------------------------------


@app.task(bind=True)
def progress(self, token):
    self.update_state(state="PROGRESS", meta={"step": 1, "of": 2})
    deadline = time.monotonic() + 15
    while not (STATE_DIR / f"{token}.release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return "done"


@app.task(ignore_result=True)
def no_result(token):
    record(token, "ran")
    return 42


# callbacks -------------------------------------------------------------------------------


@app.task
def record_link(value, token):
    record(token, "callback", {"value": value})
    return value


@app.task
def on_error(task_id):
    record(f"errback-{task_id}", "errback")


# time limits, reject, ignore, rate limit ---------------------------------------------------


@app.task(soft_time_limit=0.5, time_limit=10)
def soft_limited():
    try:
        time.sleep(5)
    except SoftTimeLimitExceeded:
        return "cleaned up after soft limit"
    return "not interrupted"


@app.task(time_limit=0.5)
def hard_limited():
    time.sleep(5)
    return "not killed"


@app.task(bind=True)
def rejecting(self, token):
    record(token, "ran")
    raise Reject("refused by the task", requeue=False)


@app.task(bind=True)
def ignoring(self, token):
    record(token, "ran")
    raise Ignore()


@app.task(bind=True)
def custom_state_then_ignore(self, token):
    self.update_state(state="CUSTOM", meta={"kept": True})
    record(token, "ran")
    raise Ignore()


@app.task(rate_limit="2/s")
def limited():
    return time.time()


# a serializer other than JSON ------------------------------------------------------------

try:

    @app.task(serializer="pickle")
    def pickled(value):
        return value

    PICKLE_DECLARATION: list[str] = ["declared"]
except Exception as exc:  # heretic refuses it here, at decoration time
    pickled = None
    PICKLE_DECLARATION = ["refused", type(exc).__name__]
