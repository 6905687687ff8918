"""jobs_project plus a task deployed later: for replaying dead letters that named it."""

from __future__ import annotations

from jobs_project import app  # noqa: F401 - the same app, one more task

from heretic_kombu import shared_task


@shared_task(name="late.task")
def late_task(value):
    return f"late {value}"
