"""heretic_kombu: Celery's task API, with every job a searchable row in SQL.

Change ``from celery import shared_task`` to ``from heretic_kombu import shared_task``
(and ``Celery`` likewise); see README.md.
"""

from __future__ import annotations

from . import exceptions, states
from .__about__ import __version__
from .app import Celery, Heretic, Job, current_app
from .exceptions import HereticKombuError, MaxRetriesExceededError, Retry
from .result import AsyncResult, EagerResult
from .task import Task, shared_task

__all__ = [
    "AsyncResult",
    "Celery",
    "EagerResult",
    "Heretic",
    "HereticKombuError",
    "Job",
    "MaxRetriesExceededError",
    "Retry",
    "Task",
    "__version__",
    "current_app",
    "exceptions",
    "shared_task",
    "states",
]
