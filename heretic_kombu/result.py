"""AsyncResult: Celery's result handle, reading the job's row.

There is no separate result backend: the row in ``heretic_jobs`` *is* the result.
``state`` maps the row's status to Celery's names; an id nobody enqueued is PENDING,
as in Celery. ``get()`` polls the row with a short, growing interval.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from . import failure, states
from .core.context import PROGRESS_KEY as PROGRESS_KEY
from .core.context import current_request as current_request
from .core.protocols import AppLike
from .core.registry import current_app
from .exceptions import HereticKombuError, TaskRevokedError, TimeoutError
from .status import TERMINAL, Status

if TYPE_CHECKING:
    from .store import Job


class AsyncResult:
    """The state and outcome of one job, by task id."""

    def __init__(self, id: str, app: AppLike | None = None, task_name: str | None = None) -> None:
        if app is None:
            app = current_app()
        self.id = str(id)
        self.app = app
        self._task_name = task_name
        #: The result of the step before this one in a chain (set by the canvas).
        self.parent: Any = None

    @property
    def task_id(self) -> str:
        return self.id

    # -- reading the row -------------------------------------------------------

    def _job(self) -> Job | None:
        return self.app.store.get(self.id)

    @property
    def state(self) -> str:
        """Celery's state name: PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        status = self.app.store.status_of(self.id)
        if status in (Status.STARTED, Status.IGNORED):  # update_state()'s custom state wins
            progress = _progress(self._job())
            if progress is not None:
                return str(progress[PROGRESS_KEY])
        return states.to_celery(status)

    status = state

    @property
    def result(self) -> Any:
        """The return value, or the exception for FAILURE/RETRY, else ``None``."""
        return _outcome(self._job())

    info = result

    @property
    def traceback(self) -> str | None:
        job = self._job()
        return job.traceback if job is not None else None

    @property
    def name(self) -> str | None:
        job = self._job()
        return job.task_name if job is not None else self._task_name

    @property
    def args(self) -> list[Any] | None:
        job = self._job()
        return job.args if job is not None else None

    @property
    def kwargs(self) -> dict[str, Any] | None:
        job = self._job()
        return job.kwargs if job is not None else None

    @property
    def retries(self) -> int:
        job = self._job()
        return max(job.attempts - 1, 0) if job is not None else 0

    @property
    def date_done(self) -> dt.datetime | None:
        job = self._job()
        return job.finished_at if job is not None else None

    @property
    def worker(self) -> str | None:
        job = self._job()
        return job.worker if job is not None else None

    @property
    def queue(self) -> str | None:
        job = self._job()
        return job.queue_name if job is not None else None

    def ready(self) -> bool:
        """True once the job succeeded, failed for good or was revoked."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.CELERY_SUCCESS

    def failed(self) -> bool:
        return self.state == states.CELERY_FAILURE

    # -- waiting -------------------------------------------------------------

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float | None = None,
        disable_sync_subtasks: bool = True,
        follow_parents: bool = True,
        **_: Any,
    ) -> Any:
        """Wait for the job to finish and return its result.

        Raises the task's exception (rebuilt with its type and message) when it failed
        and ``propagate`` is true, :class:`TaskRevokedError` when it was revoked, and
        :class:`TimeoutError` after ``timeout`` seconds. As in Celery, with
        ``follow_parents`` the error of a failed earlier step (``.parent``: a chain's
        previous step, a chord's header) is raised first.
        """
        if disable_sync_subtasks and current_request() is not None:
            if not current_request().called_directly:  # type: ignore[union-attr]
                raise RuntimeError(
                    "Never call result.get() within a task! A worker waiting on another"
                    " job can deadlock the pool."
                )
        ceiling = interval if interval is not None else self.app.settings.result_poll_interval
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        store = self.app.store
        listener = store.listen()  # before the first read: no ending can be missed
        # The row is read on the listener's own connection: no pool checkout on the
        # way from the job's end (the notification) to the caller.
        read = self._job if listener is None else lambda: listener.get(self.id)
        check_parents = follow_parents and propagate and self.parent is not None
        while (job := read()) is None or job.status not in TERMINAL:
            if check_parents:
                self._reraise_parent_error()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"The operation timed out ({timeout}s) waiting for {self.id}")
            remaining = ceiling if deadline is None else max(0.0, deadline - time.monotonic())
            if listener is not None:  # PostgreSQL wakes us when the job ends
                listener.wait(self.id, min(ceiling, remaining))
            else:
                time.sleep(min(pause, ceiling, remaining))
                pause *= 2
        if check_parents and job.status != Status.SUCCEEDED:
            self._reraise_parent_error()
        if job.status == Status.REVOKED and propagate:
            raise TaskRevokedError(f"task {self.id} was revoked: {job.error or 'revoked'}")
        value = _outcome(job)
        if job.status == Status.FAILED and propagate:
            raise value
        return value

    wait = get

    def maybe_throw(self, propagate: bool = True, **_: Any) -> None:
        """Raise the job's exception if it has failed (Celery's ``maybe_throw``)."""
        job = self._job()
        if propagate and job is not None and job.status == Status.FAILED:
            raise _outcome(job)

    def _reraise_parent_error(self) -> None:
        """Raise the error of the earliest failed step before this one."""
        parents = []
        node = self.parent
        while node is not None:
            parents.append(node)
            node = node.parent
        for parent in reversed(parents):
            parent.maybe_throw()

    def revoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: str | int | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Revoke this job (Celery's ``AsyncResult.revoke``): a job that has not started
        never will; a running one is killed with ``signal`` only if ``terminate``."""
        self.app.control.revoke(self.id, terminate=terminate, signal=signal or "SIGTERM")

    def forget(self) -> None:
        """Drop the stored result and traceback (Celery's ``forget``). The row itself
        stays, with its status and attempt logs: the history is the point of heretic."""
        self.app.store.forget(self.id)

    @property
    def children(self) -> list[AsyncResult]:
        """Jobs this job sent (callbacks, the next chain step, jobs sent from its body)."""
        return [AsyncResult(j.task_id, app=self.app) for j in self.app.store.children_of(self.id)]

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)


class GroupResult:
    """The results of a group's jobs, in the group's order (Celery's ``GroupResult``)."""

    def __init__(self, id: str, results: list[Any], app: AppLike | None = None) -> None:
        self.id = id
        self.results = list(results)
        self.app = app
        self.parent: Any = None

    def __iter__(self) -> Any:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> Any:
        return self.results[index]

    @property
    def children(self) -> list[Any]:
        return self.results

    def ready(self) -> bool:
        """True when every job has finished (succeeded, failed or revoked)."""
        return all(r.ready() for r in self.results)

    def successful(self) -> bool:
        """True when every job succeeded."""
        return all(r.successful() for r in self.results)

    def failed(self) -> bool:
        """True when any job failed."""
        return any(r.failed() for r in self.results)

    def waiting(self) -> bool:
        """True while any job has not finished."""
        return not self.ready()

    def completed_count(self) -> int:
        """How many jobs succeeded."""
        return sum(1 for r in self.results if r.successful())

    def get(
        self, timeout: float | None = None, propagate: bool = True, **options: Any
    ) -> list[Any]:
        """Wait for every job; return their results in order (``join``)."""
        return self.join(timeout=timeout, propagate=propagate, **options)

    def join(
        self, timeout: float | None = None, propagate: bool = True, **options: Any
    ) -> list[Any]:
        """Wait for each job in turn within one overall ``timeout``; the first failure
        raises when ``propagate`` is true."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for result in self.results:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(result.get(timeout=remaining, propagate=propagate, **options))
        return values

    def forget(self) -> None:
        for result in self.results:
            result.forget()

    def maybe_throw(self, propagate: bool = True, **options: Any) -> None:
        """Raise the first member's exception, if any member has failed."""
        for result in self.results:
            result.maybe_throw(propagate=propagate, **options)

    def __repr__(self) -> str:
        return f"<GroupResult: {self.id} [{', '.join(str(r.id) for r in self.results)}]>"


class EagerResult:
    """The outcome of a task run in the caller's process (``apply``/``always_eager``)."""

    def __init__(self, id: str, value: Any, state: str, traceback: str | None = None) -> None:
        self.id = id
        self._value = value
        self.state = self.status = state
        self.traceback = traceback

    @property
    def result(self) -> Any:
        return self._value

    info = result

    def ready(self) -> bool:
        return True

    def successful(self) -> bool:
        return self.state == states.CELERY_SUCCESS

    def failed(self) -> bool:
        return self.state == states.CELERY_FAILURE

    def get(self, timeout: float | None = None, propagate: bool = True, **_: Any) -> Any:
        if self.state == states.CELERY_FAILURE and propagate:
            raise self._value
        return self._value

    wait = get

    def __repr__(self) -> str:
        return f"<EagerResult: {self.id}>"


def _progress(job: Job | None) -> dict[str, Any] | None:
    if (
        job is not None
        and job.status in (Status.STARTED, Status.IGNORED)
        and isinstance(job.result, dict)
    ):
        if PROGRESS_KEY in job.result:
            return job.result
    return None


def _outcome(job: Job | None) -> Any:
    if job is None:
        return None
    progress = _progress(job)
    if progress is not None:
        return progress.get("meta")
    if job.status == Status.SUCCEEDED:
        return job.result
    if job.status in (Status.FAILED, Status.RETRYING):
        if job.result is not None:
            return failure.rebuild(job.result)
        if job.status == Status.FAILED:
            return HereticKombuError(job.error or "job failed")
    return None
