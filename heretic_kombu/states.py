"""Job statuses as stored in ``heretic_jobs.status``, and Celery's state names.

The table keeps heretic's lowercase statuses; :class:`~heretic_kombu.AsyncResult` reports
Celery's upper-case states so that code comparing ``result.state == "SUCCESS"`` keeps working.
"""

from __future__ import annotations

# Row statuses (the table's vocabulary).
PENDING = "pending"  # row written, message not yet confirmed by the broker
SCHEDULED = "scheduled"  # eta/countdown in the future: waits in the database
QUEUED = "queued"  # message confirmed by the broker
STARTED = "started"  # claimed by a worker, running
RETRYING = "retrying"  # an attempt failed; the next one waits in the database until eta
SUCCEEDED = "succeeded"
FAILED = "failed"
REVOKED = "revoked"  # revoked, terminated or expired: never ran (again)
IGNORED = "ignored"  # the task raised Ignore: ended without an outcome

ALL_STATUSES = (
    PENDING,
    SCHEDULED,
    QUEUED,
    STARTED,
    RETRYING,
    SUCCEEDED,
    FAILED,
    REVOKED,
    IGNORED,
)
TERMINAL = frozenset({SUCCEEDED, FAILED, REVOKED, IGNORED})
#: Statuses a delivered message may claim at once.
READY = (PENDING, QUEUED)
#: Statuses a delivered message may claim once their eta has passed.
WAITING = (SCHEDULED, RETRYING)

# Celery's state names (what AsyncResult.state returns).
CELERY_PENDING = "PENDING"
CELERY_STARTED = "STARTED"
CELERY_RETRY = "RETRY"
CELERY_SUCCESS = "SUCCESS"
CELERY_FAILURE = "FAILURE"
CELERY_REVOKED = "REVOKED"
CELERY_IGNORED = "IGNORED"
CELERY_REJECTED = "REJECTED"

_TO_CELERY = {
    PENDING: CELERY_PENDING,
    SCHEDULED: CELERY_PENDING,
    QUEUED: CELERY_PENDING,
    STARTED: CELERY_STARTED,
    RETRYING: CELERY_RETRY,
    SUCCEEDED: CELERY_SUCCESS,
    FAILED: CELERY_FAILURE,
    REVOKED: CELERY_REVOKED,
    IGNORED: CELERY_IGNORED,
}

READY_STATES = frozenset({CELERY_SUCCESS, CELERY_FAILURE, CELERY_REVOKED})


def to_celery(status: str | None) -> str:
    """Map a row status (or ``None`` for no row) to Celery's state name."""
    if status is None:
        return CELERY_PENDING
    return _TO_CELERY.get(status, status.upper())
