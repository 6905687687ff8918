"""A job row's status: the one vocabulary of ``heretic_jobs.status``.

The table keeps these lowercase values; :class:`~heretic_kombu.AsyncResult` reports
Celery's upper-case state names instead (:mod:`heretic_kombu.states`). A
:class:`Status` is a ``str``, so it compares equal to the text read back from the table
and is written as that text.
"""

from __future__ import annotations

import enum


class Status(str, enum.Enum):
    """Where a job is in its lifecycle (DESIGN §4)."""

    PENDING = "pending"  # row written, message not yet confirmed by the broker
    SCHEDULED = "scheduled"  # eta/countdown in the future: waits in the database
    QUEUED = "queued"  # message confirmed by the broker
    STARTED = "started"  # claimed by a worker, running
    RETRYING = "retrying"  # an attempt failed; the next one waits in the database until eta
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REVOKED = "revoked"  # revoked, terminated or expired: never ran (again)
    IGNORED = "ignored"  # the task raised Ignore: ended without an outcome

    def __str__(self) -> str:  # the value, in f-strings and logs, on every Python version
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


ALL_STATUSES: tuple[Status, ...] = tuple(Status)
#: Statuses a job never leaves but by an explicit command (retry, replay).
TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.REVOKED, Status.IGNORED})
#: Statuses a delivered message may claim at once.
READY = (Status.PENDING, Status.QUEUED)
#: Statuses a delivered message may claim once their eta has passed.
WAITING = (Status.SCHEDULED, Status.RETRYING)

__all__ = ["ALL_STATUSES", "READY", "TERMINAL", "WAITING", "Status"]
