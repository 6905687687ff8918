"""Job statuses as stored in ``heretic_jobs.status``, and Celery's state names.

The table keeps heretic's lowercase statuses; :class:`~heretic_kombu.AsyncResult` reports
Celery's upper-case states so that code comparing ``result.state == "SUCCESS"`` keeps working.
"""

from __future__ import annotations

from .status import Status

# Row statuses: heretic_kombu.status.Status is their one vocabulary; these names stay
# importable from here.
PENDING = Status.PENDING
SCHEDULED = Status.SCHEDULED
QUEUED = Status.QUEUED
STARTED = Status.STARTED
RETRYING = Status.RETRYING
SUCCEEDED = Status.SUCCEEDED
FAILED = Status.FAILED
REVOKED = Status.REVOKED
IGNORED = Status.IGNORED

# Celery's state names (what AsyncResult.state returns).
CELERY_PENDING = "PENDING"
CELERY_STARTED = "STARTED"
CELERY_RETRY = "RETRY"
CELERY_SUCCESS = "SUCCESS"
CELERY_FAILURE = "FAILURE"
CELERY_REVOKED = "REVOKED"
CELERY_IGNORED = "IGNORED"
CELERY_REJECTED = "REJECTED"

_TO_CELERY: dict[str, str] = {
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
