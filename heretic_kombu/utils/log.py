"""``celery.utils.log`` under heretic's name: ``from heretic_kombu.utils.log import
get_task_logger`` is the import line Celery's documentation gives, with ``celery``
changed."""

from __future__ import annotations

from ..log import TASK_FORMAT, get_task_logger

__all__ = ["TASK_FORMAT", "get_task_logger"]
