"""heretic_kombu: Celery's task API, with every job a searchable row in SQL.

Change ``from celery import shared_task`` to ``from heretic_kombu import shared_task``
(and ``Celery`` likewise); see README.md.
"""

from __future__ import annotations

from . import exceptions, states
from .__about__ import __version__
from .app import Celery, Heretic, Job, current_app
from .exceptions import HereticKombuError, MaxRetriesExceededError, Retry
from .result import AsyncResult, EagerResult, GroupResult
from .schedules import crontab, schedule
from .signatures import Signature, chain, chord, group, signature, subtask
from .task import Task, shared_task

__all__ = [
    "AsyncResult",
    "Celery",
    "EagerResult",
    "GroupResult",
    "Heretic",
    "HereticKombuError",
    "Job",
    "MaxRetriesExceededError",
    "Retry",
    "Signature",
    "Task",
    "__version__",
    "chain",
    "chord",
    "crontab",
    "current_app",
    "exceptions",
    "group",
    "schedule",
    "shared_task",
    "signature",
    "states",
    "subtask",
]
