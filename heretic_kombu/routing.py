"""Celery's ``task_routes``: which queue a task goes to when the call does not say.

Accepted forms, as in Celery: a dict ``{"name or glob*": {"queue": "q"} | "q"}``, a
callable ``router(name, args, kwargs, options, task=None, **kw)`` returning such a dict
(or ``None``), or a list/tuple of those, tried in order. Globs use ``fnmatch``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

from .exceptions import ConfigurationError


def route(routes: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """The queue ``routes`` give task ``name``, or ``None`` if no route matches."""
    if not routes:
        return None
    for router in routes if isinstance(routes, (list, tuple)) else [routes]:
        found = _apply(router, name, args, kwargs)
        if found is not None:
            return found
    return None


def _apply(router: Any, name: str, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    if isinstance(router, Mapping):
        if name in router:
            return _queue_of(router[name], name)
        for pattern, target in router.items():
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
                return _queue_of(target, name)
        return None
    if callable(router):
        answer = _call(router, name, args, kwargs)
        return _queue_of(answer, name) if answer is not None else None
    raise ConfigurationError(f"task_routes: {router!r} is neither a dict nor a callable")


def _call(router: Callable[..., Any], name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return router(name, args, kwargs, {}, task=None)


def _queue_of(target: Any, name: str) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, Mapping) and isinstance(target.get("queue"), str):
        return str(target["queue"])
    raise ConfigurationError(f"task_routes: the route of {name!r} names no queue: {target!r}")
