"""The request context: what is known about the task call running in this thread.

Each thread keeps a stack of :class:`Context` objects: the worker (and an eager run, or a
direct call of a task) pushes one before the task body runs and pops it after, so code
anywhere below can ask :func:`current_request` which job it runs in (for lineage, and to
refuse ``result.get()`` inside a task).
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any


class Context:
    """``task.request``: what is known about the call being executed."""

    id: str | None = None
    args: list[Any] = []  # noqa: RUF012 - read-only defaults, replaced per call
    kwargs: dict[str, Any] = {}  # noqa: RUF012
    retries: int = 0
    eta: dt.datetime | None = None
    expires: dt.datetime | None = None
    hostname: str | None = None
    delivery_info: dict[str, Any] = {}  # noqa: RUF012
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    called_directly: bool = True
    is_eager: bool = False
    task: str | None = None
    #: heretic: the row's id and attempt limit.
    job_id: int | None = None
    max_attempts: int | None = None
    #: Celery's (hard, soft) time limits of this call, in seconds.
    timelimit: tuple[float | None, float | None] | None = None

    def __init__(self, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"<Context id={self.id} retries={self.retries}>"


_current = threading.local()

#: Key of the ``result`` object that holds a running job's ``update_state`` progress.
PROGRESS_KEY = "progress_state"


def current_request() -> Context | None:
    """The request of the task running in this thread, if any (for lineage and checks)."""
    stack = getattr(_current, "stack", None)
    return stack[-1] if stack else None


def push(request: Context) -> None:
    """Make ``request`` this thread's current request (until the matching :func:`pop`)."""
    if not hasattr(_current, "stack"):
        _current.stack = []
    _current.stack.append(request)


def pop() -> None:
    """End the current request: the one pushed before it is current again."""
    _current.stack.pop()
