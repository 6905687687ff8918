"""What the layers under ``app.py`` may ask of an app, and of a task.

Task, result, signatures, canvas, execution, builtins, control and jobs are handed an
app (``Heretic``) but never import ``app.py``: they name it by these protocols, which
hold exactly the members they use. ``Heretic`` satisfies :class:`AppLike` and ``Task``
satisfies :class:`RunnableTask` structurally; mypy checks both where the objects are
passed down.

Members that return façade objects (an ``AsyncResult``, ``app.control``) are typed
``Any`` here: naming their classes would make core import the façade above it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..broker import Broker
    from ..config import Settings
    from ..exceptions import BrokerError, Retry
    from ..store import Job, JobStore, NewJob
    from .context import Context


class StoreOwner(Protocol):
    """Whatever holds a job store (an app): all ``app.control`` needs."""

    @property
    def store(self) -> JobStore:
        """The job store (created on first use)."""
        ...


class TaskLike(Protocol):
    """What a signature asks of the task it names: its name, app, and ways to call it."""

    @property
    def name(self) -> str: ...

    @property
    def app(self) -> AppLike | None: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body here and now."""
        ...

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Send the task: write its row and publish it."""
        ...

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run the task here, eagerly, with retries; return an ``EagerResult``."""
        ...


class RunnableTask(TaskLike, Protocol):
    """What running an attempt (:mod:`heretic_kombu.execution`) asks of a task: its body,
    Celery's options and hooks, and its request stack."""

    @property
    def max_retries(self) -> int | None: ...
    @property
    def ignore_result(self) -> bool: ...
    @property
    def autoretry_for(self) -> tuple[type[BaseException], ...]: ...
    @property
    def dont_autoretry_for(self) -> tuple[type[BaseException], ...]: ...
    @property
    def retry_kwargs(self) -> dict[str, Any]: ...
    @property
    def retry_backoff(self) -> bool | float: ...
    @property
    def retry_backoff_max(self) -> float: ...
    @property
    def retry_jitter(self) -> bool: ...
    @property
    def request(self) -> Context: ...

    def run(self, *args: Any, **kwargs: Any) -> Any: ...

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: dt.datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry: ...

    def push_request(self, request: Context) -> None:
        """Make ``request`` the task's (and the thread's) current request."""
        ...

    def pop_request(self) -> None:
        """End the request pushed last."""
        ...

    def before_start(self, task_id: str, args: list[Any], kwargs: dict[str, Any]) -> None: ...

    def on_success(
        self, retval: Any, task_id: str, args: list[Any], kwargs: dict[str, Any]
    ) -> None: ...

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None: ...

    def on_retry(
        self,
        exc: BaseException | None,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None: ...

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None: ...


class AppLike(StoreOwner, Protocol):
    """What the layers under ``app.py`` (and the worker, beat and dashboard) ask of an app."""

    # -- configuration and connections ---------------------------------------

    @property
    def conf(self) -> MutableMapping[str, Any]:
        """``app.conf``: the settings as given (Celery's or heretic's names)."""
        ...

    @property
    def settings(self) -> Settings:
        """The effective settings (environment over ``conf``)."""
        ...

    @property
    def broker(self) -> Broker:
        """The broker (created on first use)."""
        ...

    @property
    def control(self) -> Any:
        """Celery's ``app.control`` (:class:`heretic_kombu.control.Control`)."""
        ...

    def close(self) -> None:
        """Release the database and broker connections this process holds."""
        ...

    def emit(self, event: str, *args: Any) -> None:
        """Call every listener of ``event`` (``job_error``, ``job_failed``)."""
        ...

    # -- tasks ---------------------------------------------------------------

    @property
    def tasks(self) -> Mapping[str, RunnableTask]:
        """The registered tasks, by name."""
        ...

    def register_task(self, task: RunnableTask) -> None:
        """Add a task that is not the app's own (a shared or built-in one) by its name."""
        ...

    # -- sending -------------------------------------------------------------

    def AsyncResult(self, task_id: str) -> Any:  # noqa: N802 - Celery's name
        """The result handle of ``task_id`` (an ``AsyncResult``)."""
        ...

    def send_task(
        self,
        name: str,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Write a job's row and publish it; return its ``AsyncResult``."""
        ...

    def apply_signature(self, sig: Any, *, eager: bool | None = None) -> Any:
        """Send a signature (task, chain, group, chord), or run it here if ``eager``."""
        ...

    def build_job(
        self, name: str, args: list[Any], kwargs: dict[str, Any], **options: Any
    ) -> NewJob:
        """The row for one call of task ``name``; nothing is written yet."""
        ...

    def deliver_all(self, rows: Iterable[Job]) -> None:
        """Publish the committed rows that are due now and mark the confirmed ones."""
        ...

    def publish_jobs(self, jobs: Sequence[Job]) -> list[BrokerError | None]:
        """Publish the messages of rows already written; per row ``None`` or the error."""
        ...
