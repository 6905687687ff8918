"""Logging inside tasks: Celery's ``get_task_logger``.

A task logger is an ordinary :mod:`logging` logger whose records also carry the running
job's ``task_id`` and ``task_name`` (``"???"`` outside a task, as in Celery), so a format
such as Celery's task format can name them::

    "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"
"""

from __future__ import annotations

import logging

from .core.context import current_request

#: Celery's task log format, for handlers of task loggers.
TASK_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"


class TaskFields(logging.Filter):
    """Adds ``task_id`` and ``task_name`` of the job running in this thread to a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = current_request()
        record.task_id = (request.id if request is not None else None) or "???"
        record.task_name = (request.task if request is not None else None) or "???"
        return True


def get_task_logger(name: str) -> logging.Logger:
    """The logger ``name`` (usually ``__name__``), its records carrying the running job's
    ``task_id`` and ``task_name``."""
    logger = logging.getLogger(name)
    if not any(isinstance(existing, TaskFields) for existing in logger.filters):
        logger.addFilter(TaskFields())
    return logger


__all__ = ["TASK_FORMAT", "TaskFields", "get_task_logger"]
