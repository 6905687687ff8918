"""The apps of this process: the current app, and the registry of ``@shared_task`` tasks.

Every app registers itself here when created (:func:`add_app`); a task without an app of
its own (``@shared_task``, a signature or result made without ``app=``) uses
:func:`current_app`: the latest app created, else a default one. Building that default
app is ``app.py``'s job: it installs its factory with :func:`set_default_app_factory`
when imported, so this module never imports it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..exceptions import ConfigurationError
from .protocols import AppLike, RunnableTask

_shared_tasks: list[RunnableTask] = []
_apps: list[AppLike] = []
_default_app_lock = threading.Lock()
_default_app_factory: Callable[[], object] | None = None


def set_default_app_factory(factory: Callable[[], object]) -> None:
    """Install what :func:`current_app` calls when no app exists yet; the app it
    builds registers itself (:func:`add_app`) as every app does."""
    global _default_app_factory
    _default_app_factory = factory


def add_app(app: AppLike) -> None:
    """Register a new app: it becomes the current app."""
    _apps.append(app)


def shared_tasks() -> list[RunnableTask]:
    """The ``@shared_task`` tasks declared so far, in order (a new app registers them)."""
    return list(_shared_tasks)


def register_shared(task: RunnableTask) -> None:
    """Add a ``@shared_task`` to every app, present and future."""
    _shared_tasks.append(task)
    for app in _apps:
        app.register_task(task)


def current_app() -> AppLike:
    """The app a task without its own app uses: the latest created, else a default one.

    The default app reads only the environment (``HERETIC_*``), so a module that uses
    nothing but ``@shared_task`` works unchanged.
    """
    if _apps:
        return _apps[-1]
    with _default_app_lock:
        if not _apps:
            if _default_app_factory is None:  # only if heretic_kombu.app was never imported
                raise ConfigurationError("no app: import heretic_kombu to create the default one")
            _default_app_factory()
    return _apps[-1]
