"""Celery's built-in tasks that the canvas sends by name: ``celery.starmap``, ``celery.map``.

Every app registers them, so ``add.starmap(...)``/``add.chunks(...)`` jobs run on a
heretic worker, and messages a Celery client sends for them do too.
"""

from __future__ import annotations

from typing import Any

from .core.protocols import AppLike
from .signatures import signature
from .task import make_task


def register_builtins(app: AppLike) -> None:
    """Add the built-in tasks to ``app``."""

    def starmap(task: dict[str, Any], it: list[list[Any]]) -> list[Any]:
        """Call ``task`` once per argument list in ``it``; return the results in order."""
        body = _body(app, task)
        return [body(*args) for args in it]

    def map_(task: dict[str, Any], it: list[Any]) -> list[Any]:
        """Call ``task`` once per item of ``it``; return the results in order."""
        body = _body(app, task)
        return [body(item) for item in it]

    for name, fun in (("celery.starmap", starmap), ("celery.map", map_)):
        app.register_task(make_task(fun, app=app, name=name, typing=False))


def _body(app: AppLike, task: dict[str, Any]) -> Any:
    sig = signature(task, app=app)
    return sig.type
