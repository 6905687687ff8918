"""Example tasks, written exactly as for Celery but for the import line."""

from __future__ import annotations

import random

from heretic_kombu import Heretic, shared_task

app = Heretic("examples")


@shared_task
def add(x, y):
    return x + y


@shared_task(bind=True, max_retries=3, default_retry_delay=1)
def send_email(self, to, body):
    # Fails on the first attempt to show a retry in the history.
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("SMTP server busy"), countdown=1)
    return f"sent {len(body)} characters to {to}"


@shared_task(autoretry_for=(ValueError,), retry_backoff=0.5, max_retries=2)
def flaky_parse(text):
    raise ValueError(f"cannot parse {text!r}")


# The original heretic API: a handler per job name, and its two events.
@app.process("report.build")
def build_report(job):
    return {"rows": random.randint(1, 100), "for": job.payload["customer"]}


app.on("job_error", lambda error: print(f"job_error: {error}"))
app.on("job_failed", lambda exc, job: print(f"job_failed: {job.task_name}: {exc!r}"))
