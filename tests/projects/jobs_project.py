"""A Celery-style project the integration tests run real workers on.

Written as for Celery but for the import line. Events are appended to the file named
by HERETIC_TEST_EVENTS so tests can see what the worker process fired.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import canvas_tasks  # noqa: F401 - the canvas cases' tasks, in the same worker

from heretic_kombu import Heretic, shared_task

app = Heretic("jobs_project")


class PaymentDeclined(Exception):
    """A user-defined exception that must come back to the caller with its type."""


def _record_event(kind: str, **fields: object) -> None:
    path = os.environ.get("HERETIC_TEST_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": kind, **fields}, default=str) + "\n")


app.on(
    "job_error",
    lambda error: _record_event(
        "job_error", reason=error.reason, task_id=error.task_id, queue=error.queue
    ),
)
app.on(
    "job_failed",
    lambda exc, job: _record_event(
        "job_failed", error=repr(exc), task_id=job.task_id, status=job.status, attempts=job.attempts
    ),
)


@shared_task
def add(x, y):
    return x + y


@shared_task
def echo(value):
    return value


@shared_task
def charge(amount):
    raise PaymentDeclined(f"card declined for {amount}")


@shared_task
def fail(message):
    raise ValueError(message)


@shared_task(bind=True)
def whoami(self):
    return {
        "id": self.request.id,
        "retries": self.request.retries,
        "args": self.request.args,
        "hostname": self.request.hostname,
    }


@shared_task(bind=True, max_retries=3)
def flaky(self, succeed_on_attempt):
    """Fails until the given attempt (1-based), retrying with exponential backoff."""
    if self.request.retries + 1 < succeed_on_attempt:
        raise self.retry(
            exc=ConnectionError(f"attempt {self.request.retries + 1} failed"),
            countdown=0.2 * 2**self.request.retries,
        )
    return f"ok on attempt {self.request.retries + 1}"


@shared_task(autoretry_for=(ConnectionError,), retry_backoff=0.1, retry_jitter=False, max_retries=2)
def always_down():
    raise ConnectionError("service down")


@shared_task(bind=True, max_retries=1, default_retry_delay=0.1)
def retry_without_exc(self):
    raise self.retry()


@shared_task(max_retries=1)
def slow(seconds, marker=None):
    """Sleeps; touches `marker` when it starts so tests know it is running."""
    if marker:
        Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return seconds


@shared_task(max_retries=1)
def die():
    os._exit(13)


class Unprintable(Exception):
    """An exception whose ``str()`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")


@shared_task(max_retries=0)
def raise_hostile(kind):
    """Raise an exception whose text no table or log can hold as it is."""
    if kind == "nul":
        raise ValueError("a NUL \x00 in the message")
    if kind == "surrogate":
        raise ValueError("a lone \ud800 surrogate")
    raise Unprintable("unprintable")


@app.process("report.build")
def build_report(job):
    if job.payload.get("fail"):
        raise RuntimeError(f"report for {job.payload['customer']} failed")
    return {"customer": job.payload["customer"], "attempt": job.attempts}


# Celery's signals, observed from the worker and its pool processes.
from heretic_kombu import signals  # noqa: E402


@signals.worker_ready.connect
def _ready(sender=None, **kwargs):
    _record_event("worker_ready")


@signals.worker_process_init.connect
def _child(sender=None, **kwargs):
    _record_event("worker_process_init", pid=os.getpid())


@signals.task_postrun.connect
def _postrun(sender=None, task_id=None, state=None, **kwargs):
    _record_event("task_postrun", task=sender.name, task_id=task_id, state=state, pid=os.getpid())


@shared_task(bind=True)
def progress(self, marker, release):
    """Reports progress, then waits (bounded) until the test lets it finish."""
    self.update_state(state="PROGRESS", meta={"done": 1, "of": 2})
    Path(marker).write_text("running")
    deadline = time.monotonic() + 20
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return "done"


# -- runtime controls (tests/integration/test_control.py) --------------------------------
from heretic_kombu.exceptions import Ignore, Reject, SoftTimeLimitExceeded  # noqa: E402


@shared_task(max_retries=0)
def sleep_then_touch(seconds, started, done):
    """Touches `started`, sleeps, then touches `done`: the side effect a kill prevents."""
    Path(started).write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(done).write_text("done")
    return "slept"


@shared_task(soft_time_limit=0.5, max_retries=0)
def soft_limited(seconds):
    """Catches its soft time limit and says so."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded as exc:
        return f"soft limit caught: {exc}"
    return "finished in time"


@shared_task(time_limit=1, max_retries=3)
def hard_limited(seconds, done):
    time.sleep(seconds)
    Path(done).write_text("done")
    return "finished in time"


@shared_task(max_retries=2)
def rejecting(reason, requeue=False):
    raise Reject(reason, requeue=requeue)


@shared_task(bind=True, max_retries=3)
def reject_first_attempt(self):
    """Rejects with requeue on its first attempt; accepts on the next."""
    if self.request.retries == 0:
        raise Reject("not yet", requeue=True)
    return f"accepted on attempt {self.request.retries + 1}"


@shared_task
def ignoring():
    raise Ignore()


@shared_task(rate_limit="2/s")
def limited(i):
    return i


@signals.task_revoked.connect
def _revoked(sender=None, request=None, terminated=None, signum=None, expired=None, **kwargs):
    _record_event(
        "task_revoked",
        task=sender.name,
        task_id=request.id,
        terminated=terminated,
        signum=signum,
        expired=expired,
    )
