"""The app: configuration, task registry, sending jobs, and the original heretic API.

``Heretic`` (alias ``Celery``) owns one :class:`~heretic_kombu.store.JobStore` and one
:class:`~heretic_kombu.broker.Broker`, built lazily from its settings. Sending a job
follows the order the guarantees depend on: encode the arguments (a bad value fails
here, before anything is written), insert the row and commit, then publish, then mark
the row ``queued`` once the broker confirmed the message. A job with a future eta is
only written, as ``scheduled``: a worker's scheduler publishes it when due.

One ``.delay()`` does not wait for the broker: the process's
:class:`~heretic_kombu.sender.Sender` publishes the message and marks the row when the
confirm comes. Several rows sent together (a group, a chord, a transaction's jobs) are
published at once and their confirms waited for once (:meth:`Heretic.deliver_all`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from . import canvas, execution, limits, protocol, result, serialization, signals
from . import retry as retry_policy
from . import transaction as _transaction
from .broker import Broker
from .broker.core import Outgoing
from .builtins import register_builtins
from .config import Settings, refuse_non_json
from .control import Control
from .core import registry
from .core.context import current_request
from .core.protocols import RunnableTask
from .core.registry import register_shared as register_shared
from .exceptions import (
    BrokerError,
    ConfigurationError,
    HereticKombuError,
    MessageRefused,
    NotRegistered,
    PublishError,
    QueueMismatchError,
)
from .jobs import Jobs
from .result import AsyncResult
from .routing import route
from .sender import Sender, stays_pending
from .signatures import Signature, signature
from .status import Status
from .store import Job as JobRow
from .store import JobStore, NewJob, utcnow
from .task import Task, make_task
from .transaction import current_outbox

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

logger = logging.getLogger("heretic_kombu")

EVENTS = ("job_error", "job_failed")


class Config(dict):  # type: ignore[type-arg]
    """``app.conf``: a dict that also allows attribute access, as Celery's does."""

    def __init__(self, owner: Heretic, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._owner._settings_changed()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._owner._settings_changed()


class Heretic:
    """A heretic_kombu application (``Celery`` is the same class).

    Args:
        main: the app's name, as Celery's first argument.
        broker: broker URL (Celery's ``broker``); ``HERETIC_BROKER_URL`` wins over it.
        database_url: the job table's database URL; ``HERETIC_DATABASE_URL`` wins.
        include: modules to import when a worker starts (Celery's ``include``).
        backend: accepted for compatibility and ignored: the job table is the backend.
        **settings: any other setting, by heretic's or Celery's name.
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | None = None,
        database_url: str | None = None,
        include: Iterable[str] | None = None,
        backend: str | None = None,
        **settings: Any,
    ) -> None:
        self.main = main
        self.tasks: dict[str, Task] = {}
        self.include = list(include or ())
        self._autodiscover: list[tuple[Any, str]] = []
        self._listeners: dict[str, list[Callable[..., Any]]] = {name: [] for name in EVENTS}
        self._settings: Settings | None = None
        self._store: JobStore | None = None
        self._broker: Broker | None = None
        self._sender: Sender | None = None
        self._sender_lock = threading.Lock()
        self.conf = Config(self)
        if broker:
            self.conf["broker_url"] = broker
        if database_url:
            self.conf["database_url"] = database_url
        self.conf.update(settings)
        for task in registry.shared_tasks():
            self.register_task(task)
        register_builtins(self)
        registry.add_app(self)

    def __repr__(self) -> str:
        return f"<Heretic {self.main or '__main__'}>"

    # -- configuration -----------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The effective settings (environment over ``conf``), rebuilt after a change."""
        if self._settings is None:
            self._settings = Settings.build(self.conf)
        return self._settings

    def _settings_changed(self) -> None:
        refuse_non_json(self.conf)  # fail where pickle is asked for, not at the first send
        self._settings = None
        self.close()

    def config_from_object(self, obj: Any, namespace: str | None = None) -> None:
        """Load settings from a module (or its dotted name) or an object's attributes.

        With ``namespace="CELERY"``, only ``CELERY_``-prefixed upper-case names are read
        and the prefix is dropped (Django settings style).
        """
        if isinstance(obj, str):
            obj = importlib.import_module(obj)
        values: dict[str, Any] = {}
        for name in dir(obj):
            if name.startswith("_"):
                continue
            if namespace:
                prefix = f"{namespace}_"
                if not name.startswith(prefix):
                    continue
                values[name[len(prefix) :].lower()] = getattr(obj, name)
            elif name.islower():
                values[name] = getattr(obj, name)
        self.conf.update(values)

    @property
    def jobs(self) -> Jobs:
        """The job history: ``app.jobs.search(...)``, ``.get()``, ``.retry()``…"""
        return Jobs(self)

    @property
    def store(self) -> JobStore:
        """The job store (created on first use)."""
        if self._store is None:
            self._store = JobStore(self.settings.database_url)
        return self._store

    @property
    def broker(self) -> Broker:
        """The broker (created on first use)."""
        if self._broker is None:
            s = self.settings
            self._broker = Broker(
                s.broker_url,
                transport_options=dict(s.broker_transport_options),
                confirm_timeout=s.confirm_timeout,
                queue_max_priority=s.queue_max_priority,
                queue_type=s.queue_type,
                delivery_limit=s.delivery_limit,
            )
        return self._broker

    @property
    def control(self) -> Control:
        """Celery's ``app.control``: ``revoke(task_id, terminate=, signal=)``, answered by
        the job table (see :mod:`heretic_kombu.control`)."""
        return Control(self)

    def close(self) -> None:
        """Release database and broker connections held by this process, after the
        messages handed to the sender are published and their rows marked."""
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
        if self._store is not None:
            self._store.dispose()
        if self._broker is not None:
            self._broker.close()
        self._store = self._broker = None

    # -- tasks ---------------------------------------------------------------

    def task(self, *args: Any, **options: Any) -> Any:
        """Decorator that registers a task in this app (Celery's ``@app.task``)."""

        def decorate(fun: Callable[..., Any]) -> Task:
            task = make_task(fun, app=self, **options)
            self._register(task, bound=True)
            return task

        if len(args) == 1 and callable(args[0]) and not options:
            return decorate(args[0])
        return decorate

    def register_task(self, task: RunnableTask) -> None:
        """Add a task that is not the app's own (a ``@shared_task`` or a built-in) by its
        name, silently replacing one of the same name."""
        # Every task is a Task (make_task builds them); core only names it by protocol.
        self._register(cast(Task, task), bound=False)

    def _register(self, task: Task, bound: bool) -> None:
        existing = self.tasks.get(task.name)
        if existing is not None and existing is not task and bound:
            logger.warning("task %r registered twice; the later definition wins", task.name)
        self.tasks[task.name] = task

    def import_modules(self) -> None:
        """Import ``include`` and the autodiscovered modules (a worker does this at start)."""
        for module in self.include:
            importlib.import_module(module)
        for packages, related_name in self._autodiscover:
            _discover(packages, related_name)

    def autodiscover_tasks(
        self,
        packages: Iterable[str] | Callable[[], Iterable[str]] | None = None,
        related_name: str = "tasks",
        force: bool = False,
    ) -> None:
        """Import ``<package>.<related_name>`` of each package, as Celery does.

        ``packages`` may be a callable (e.g. ``lambda: settings.INSTALLED_APPS``); it is
        called when the worker starts, or now with ``force=True``. A package without
        that module is skipped.
        """
        self._autodiscover.append((packages, related_name))
        if force:
            _discover(packages, related_name)

    # -- the original heretic API --------------------------------------------

    def process(self, name: str, **options: Any) -> Callable[[Callable[..., Any]], Task]:
        """Register ``handler(job)`` for jobs named ``name`` (heretic's ``process``).

        Any exception the handler raises fails the attempt and, until the job's
        ``max_attempts`` is reached, retries it with exponential backoff (1 s, 2 s, 4 s…,
        with jitter), firing ``job_failed`` each time.
        """
        options.setdefault("autoretry_for", (Exception,))
        options.setdefault("retry_backoff", True)
        options.setdefault("max_retries", 0)

        def decorate(handler: Callable[..., Any]) -> Task:
            def run(self: Task, payload: Any = None) -> Any:
                return handler(Job(self.request, payload))

            run.__name__ = getattr(handler, "__name__", "handler")
            run.__module__ = handler.__module__
            run.__doc__ = handler.__doc__
            task = make_task(run, app=self, name=name, bind=True, typing=False, **options)
            self._register(task, bound=True)
            return task

        return decorate

    def enqueue(
        self,
        name: str,
        payload: Any = None,
        *,
        max_attempts: int = 1,
        queue: str | None = None,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        priority: int | None = None,
    ) -> result.AsyncResult:
        """Enqueue a job for the handler registered with :meth:`process` (heretic's API)."""
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        return self.send_task(
            name,
            [payload],
            {},
            max_attempts=max_attempts,
            queue=queue,
            countdown=countdown,
            eta=eta,
            priority=priority,
        )

    def on(self, event: str, listener: Callable[..., Any]) -> Callable[..., Any]:
        """Subscribe ``listener`` to ``job_error`` or ``job_failed``; returns the listener.

        ``job_error(error)`` fires in the worker when a message can never be handled and
        is dead-lettered; ``error`` is a :class:`MalformedMessage` with ``.reason``,
        ``.queue`` and ``.task_id``. ``job_failed(exc, job)`` fires after every failed
        attempt, with the task's exception and the job's row (``job.status`` tells
        whether it will be retried).
        """
        if event not in self._listeners:
            raise ValueError(f"unknown event {event!r}; choose one of {', '.join(EVENTS)}")
        self._listeners[event].append(listener)
        return listener

    def emit(self, event: str, *args: Any) -> None:
        """Call every listener of ``event``; a failing listener is logged, not raised."""
        for listener in list(self._listeners.get(event, ())):
            try:
                listener(*args)
            except Exception:
                logger.exception("%s listener %r failed", event, listener)

    # -- sending ---------------------------------------------------------------

    def AsyncResult(self, task_id: str) -> result.AsyncResult:  # noqa: N802 - Celery's name
        """The result handle of ``task_id``."""
        return AsyncResult(task_id, app=self)

    def send_task(
        self,
        name: str,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        expires: float | dt.datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        **options: Any,
    ) -> result.AsyncResult:
        """Write the job's row, publish it, and return its :class:`AsyncResult`.

        The call returns once the row is committed and the message handed to the
        process's sender, without waiting for the broker: the row becomes ``queued``
        when the broker confirms the message (see :mod:`heretic_kombu.sender`). Sent
        from a running job, the call waits for the confirm.

        Raises:
            EncodeError: ``args``/``kwargs`` are not JSON; nothing was written.
            QueueMismatchError: the broker holds the queue with other arguments; the row
                is marked failed with that error.

        If the broker does not confirm the message, the committed row stays ``pending``
        and a worker's reconciler publishes it after ``pending_timeout``: the job is
        accepted once its row is committed, whatever the broker does next.
        """
        args = list(args or ())
        kwargs = dict(kwargs or {})
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TypeError("kwargs must be a dict with string keys")
        if self.settings.always_eager and name in self.tasks:
            # An EagerResult: AsyncResult's stand-in for a job run here.
            return self._run_eagerly(name, args, kwargs, task_id)  # type: ignore[no-any-return]
        sig = Signature(name, args, kwargs, app=self)
        for callback in _as_list(options.pop("link", None)):
            sig.link(signature(callback, app=self))
        for errback in _as_list(options.pop("link_error", None)):
            sig.link_error(signature(errback, app=self))
        sig.set(
            task_id=task_id,
            countdown=countdown,
            eta=eta,
            expires=expires,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            **options,
        )
        return self._send(sig)  # type: ignore[no-any-return]

    def build_job(
        self,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        *,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        expires: float | dt.datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        parent_id: str | None = None,
        root_id: str | None = None,
        group_id: str | None = None,
        workflow: serialization.RawJSON | None = None,
        **options: Any,
    ) -> NewJob:
        """The row for one call of task ``name``: arguments encoded, queue routed, eta
        and expiry resolved. Nothing is written yet.

        Every value is checked here, the one door of every new job (``delay``,
        ``apply_async``, ``send_task``, canvas, beat), by :mod:`heretic_kombu.limits`.

        Raises:
            EncodeError: the arguments are not JSON.
            InvalidValue: a value the table, the broker or a worker cannot hold (a date
                out of range, a priority above the queue's, a message larger than
                ``max_message_size``, a NUL in a name...).
        """
        _check_options(options)
        limits.name(name, "task name")
        task = self.tasks.get(name)
        if task is not None:
            if max_attempts is None:
                max_attempts = retry_policy.max_attempts_for(task.max_retries)
            if expires is None:
                expires = task.expires
            if priority is None:
                priority = task.priority
        if max_attempts is None:
            max_attempts = retry_policy.max_attempts_for(3)
        now = utcnow()
        checked = limits.call(
            {
                **options,
                "task_id": task_id,
                "countdown": countdown,
                "eta": eta,
                "expires": expires,
                "queue": queue,
                "priority": priority,
                "max_attempts": max_attempts,
            },
            now=now,
            max_priority=self.settings.queue_max_priority,
        )
        options.pop("time_limit", None), options.pop("soft_time_limit", None)
        if checked.time_limits != (None, None):  # per-call limits travel with the row
            extra = serialization.loads(workflow) if workflow else {}
            extra["timelimit"] = list(checked.time_limits)
            workflow = serialization.dumps(extra)
        task_id = protocol.check_task_id(task_id) if task_id else protocol.new_task_id()
        run_at = checked.run_at
        expires_at = checked.expires_at
        payload = serialization.dumps({"args": list(args), "kwargs": dict(kwargs)})
        limits.message_size((payload, workflow), self.settings.max_message_size)
        # The call's queue, then Celery's task_routes, then the task's own, then the default.
        queue_name = limits.short_string(
            queue
            or route(self.conf.get("task_routes"), name, args, kwargs)
            or (task.queue if task is not None else None)
            or self.settings.default_queue,
            "queue",
        )
        scheduled = run_at > now
        return NewJob(
            task_id=task_id,
            task_name=name,
            queue_name=queue_name,
            payload=payload,
            max_attempts=max_attempts,
            status=Status.SCHEDULED if scheduled else Status.PENDING,
            eta=run_at if scheduled else None,
            expires_at=expires_at,
            priority=priority,
            parent_id=parent_id,
            root_id=root_id or task_id,
            group_id=group_id,
            workflow=workflow,
        )

    def apply_signature(self, sig: Signature, *, eager: bool | None = None) -> Any:
        """Send a signature (a task, chain, group or chord): every row it needs is
        written in one transaction, then the messages are published.

        With ``eager`` (by default the ``task_always_eager`` setting), run it in this
        process instead (``signature.apply()``) and return its ``EagerResult``.
        """
        if self.settings.always_eager if eager is None else eager:
            return execution.apply_eagerly(sig)
        return self._send(sig)

    def _send(self, sig: Signature) -> Any:
        """Check ``sig``'s values, plan it under the task sending it (if any), write,
        publish."""
        canvas.check(self, sig)
        parent = current_request()
        lineage = canvas.Lineage()
        if parent is not None and not parent.called_directly:
            lineage = canvas.Lineage(parent.id, parent.root_id or parent.id)
        planned, handle = canvas.plan(self, sig, lineage)
        if lineage.root_id is None and planned.jobs:  # one root for the whole workflow
            root = planned.jobs[0].task_id
            planned.jobs = [
                job if job.root_id == root else dataclasses.replace(job, root_id=root)
                for job in planned.jobs
            ]
        # A running job's sends are confirmed before it ends: its pool process may leave
        # with os._exit right after, where no exit hook would mark the rows queued.
        self.submit(planned, wait=parent is not None and not parent.called_directly)
        return handle

    def submit(self, planned: canvas.Plan, *, wait: bool = True) -> None:
        """Write a plan's rows (and chord counters) in one transaction, then publish the
        jobs due now. Inside :meth:`transaction`, the caller's commit decides.

        Without ``wait``, a single job is handed to the process's sender and the call
        returns before the broker confirms it (see :mod:`heretic_kombu.sender`).
        """
        outbox = current_outbox()
        if outbox is not None:
            outbox.add(self, planned, len(planned.jobs))
            return
        rows = self.store.insert_plan(planned.jobs, planned.chords)
        if len(rows) == 1 and not wait:
            self._hand_over(rows[0])
        else:
            self.deliver_all(rows)

    def deliver_all(self, rows: Iterable[JobRow]) -> None:
        """Publish the committed rows that are due now (``pending``), wait once (up to
        ``confirm_timeout``) for the broker's confirms, and mark the rows confirmed
        ``queued`` in one statement.

        A row whose message is not confirmed stays ``pending``, with a warning: the
        committed row is the job, and a worker's reconciler publishes rows left pending
        longer than ``pending_timeout``.

        Raises:
            QueueMismatchError: RabbitMQ holds a row's queue with other arguments; the
                rows of that queue are failed with this error, the others published.
        """
        due = [row for row in rows if row.status == Status.PENDING]
        if not due:
            return
        errors = self.publish_jobs(due)
        confirmed: list[str] = []
        mismatch: QueueMismatchError | None = None
        for row, error in zip(due, errors, strict=True):
            if error is None:
                confirmed.append(row.task_id)
            elif isinstance(error, QueueMismatchError):
                # No publish can ever succeed until someone fixes the queue.
                self.store.fail_unhandleable(row.task_id, str(error))
                mismatch = mismatch or error
            elif isinstance(error, MessageRefused):
                # Refused on its own, the others taken: set aside, failed with why.
                self.store.fail_unhandleable(row.task_id, str(error))
            else:
                stays_pending(row.task_id, error)
        self.store.mark_queued_many(confirmed)
        if mismatch is not None:
            raise mismatch

    def write_sent(self, connection: Connection, sent: list[canvas.Plan]) -> list[JobRow]:
        """Write the plans sent inside a caller's transaction through its connection, many
        rows to a statement (see :mod:`heretic_kombu.transaction`)."""
        merged = canvas.Plan()
        for planned in sent:
            merged.extend(planned)
        return self.store.insert_plan(merged.jobs, merged.chords, connection=connection)

    def _hand_over(self, row: JobRow) -> None:
        """Give a committed row's message to the process's sender, which publishes it
        and marks the row ``queued`` when the broker confirms it.

        Raises:
            QueueMismatchError: see :meth:`deliver_all`.
        """
        if row.status != Status.PENDING:
            return  # scheduled: a worker's scheduler publishes it when due
        message, published = self._prepare(row)
        try:
            self._process_sender().send(row.task_id, message)
        except PublishError as exc:
            stays_pending(row.task_id, exc)
            return
        signals.after_task_publish.send(**published)

    def _process_sender(self) -> Sender:
        """This process's sender, started on first use (and again in a forked child:
        the parent's thread does not exist there)."""
        sender = self._sender
        if sender is None or sender.pid != os.getpid():
            with self._sender_lock:
                sender = self._sender
                if sender is None or sender.pid != os.getpid():
                    sender = self._sender = Sender(self.broker, self.store)
        return sender

    def transaction(self, target: Any) -> contextlib.AbstractContextManager[Any]:
        """Send jobs inside a database transaction: they exist only if it commits.

        ``with app.transaction(session):`` (a SQLAlchemy ORM ``Session``) writes the rows
        of jobs sent in the block through the session; their messages are published
        after the session commits, and a rollback leaves no job and no message.
        ``with app.transaction(engine) as conn:`` opens and commits a transaction of its
        own. The job table must be in the same database.
        """
        self.store.ensure_schema()  # before the caller's transaction holds any lock
        return _transaction.transaction(target)

    def publish_job(self, job: JobRow) -> None:
        """Publish the message of a row already written (the row is the source of truth)
        and wait for the broker's confirm.

        Raises:
            PublishError: the broker did not confirm the message.
            QueueMismatchError: the queue exists with other arguments.
        """
        error = self.publish_jobs([job])[0]
        if error is not None:
            raise error

    def publish_jobs(self, jobs: Sequence[JobRow]) -> list[BrokerError | None]:
        """Publish the messages of rows already written, all at once, and wait once for
        the broker's confirms; per row ``None`` (confirmed) or the error, as
        :meth:`Broker.publish_all` says. Rows are not updated here."""
        # A row whose message cannot be encoded (a value no edge check refused: written
        # by an older version or by hand) is refused alone; the others are published.
        errors: list[BrokerError | None] = [None] * len(jobs)
        prepared: dict[int, tuple[Outgoing, dict[str, Any]]] = {}
        for index, job in enumerate(jobs):
            try:
                prepared[index] = self._prepare(job)
            except (ValueError, TypeError, OverflowError) as exc:
                errors[index] = MessageRefused(f"the message cannot be encoded: {exc}")
        sent = self.broker.publish_all([message for message, _ in prepared.values()])
        for index, error in zip(prepared, sent, strict=True):
            errors[index] = error
            if error is None:
                signals.after_task_publish.send(**prepared[index][1])
        return errors

    def _prepare(self, job: JobRow) -> tuple[Outgoing, dict[str, Any]]:
        """Encode a row's message and send ``before_task_publish``; returns the message
        and the arguments of its ``after_task_publish``."""
        workflow = job.workflow or {}
        message = protocol.TaskMessage(
            id=job.task_id,
            task=job.task_name,
            args=job.args,
            kwargs=job.kwargs,
            retries=job.attempts,
            expires=job.expires_at,
            root_id=job.root_id,
            parent_id=job.parent_id,
            group=job.group_id,
            job_id=job.id,
            priority=job.priority,
            embed={key: workflow.get(key) for key in canvas.LINKS},
            group_index=workflow.get("group_index"),
            timelimit=tuple(workflow.get("timelimit") or (None, None)),
        )
        body, headers, properties = protocol.encode(message)
        route = {"exchange": job.queue_name, "routing_key": job.queue_name}
        signals.before_task_publish.send(
            sender=job.task_name,
            body=(job.args, job.kwargs, message.embed),
            headers=headers,
            properties=properties,
            declare=[],
            retry_policy=None,
            **route,
        )
        outgoing = self.broker.task_message(body, headers, properties, job.queue_name)
        published = {
            "sender": job.task_name,
            "body": (job.args, job.kwargs, message.embed),
            "headers": headers,
            **route,
        }
        return outgoing, published

    def _run_eagerly(
        self, name: str, args: list[Any], kwargs: dict[str, Any], task_id: str | None
    ) -> Any:
        result = self.tasks[name].apply(args, kwargs, task_id=task_id)
        if result.failed() and self.settings.eager_propagates:
            raise result.result
        return result


class Job:
    """What a :meth:`Heretic.process` handler receives."""

    def __init__(self, request: Any, payload: Any) -> None:
        self.id: int | None = request.job_id
        self.task_id: str | None = request.id
        self.name: str | None = request.task
        self.payload = payload
        self.attempts: int = request.retries + 1
        self.max_attempts: int | None = request.max_attempts
        self.queue: str | None = (request.delivery_info or {}).get("routing_key")

    def __repr__(self) -> str:
        return f"<Job {self.name} {self.task_id} attempt {self.attempts}>"


Celery = Heretic


def _discover(packages: Any, related_name: str) -> None:
    for package in (packages() if callable(packages) else packages) or ():
        module = f"{package}.{related_name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but fails to import: say so
                raise


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _check_options(options: dict[str, Any]) -> None:
    serializer = options.get("serializer")
    if serializer not in (None, "json"):
        raise ConfigurationError(f"serializer={serializer!r} refused: heretic_kombu is JSON only")


def current_app() -> Heretic:
    """The app a task without its own app uses: the latest created, else a default one.

    The default app reads only the environment (``HERETIC_*``), so a module that uses
    nothing but ``@shared_task`` works unchanged. (The registry is
    :mod:`heretic_kombu.core.registry`; this is its answer typed as :class:`Heretic`.)
    """
    # Only Heretic registers itself as an app (in __init__), so the answer is one.
    return cast(Heretic, registry.current_app())


def _default_app() -> Heretic:
    """The app :func:`current_app` builds when none exists: from the environment only."""
    return Heretic("default")


registry.set_default_app_factory(_default_app)


def find_app(name: str) -> Heretic:
    """Resolve ``-A``: ``module``, ``module:attribute`` or ``package`` (as Celery does).

    Looks for an app attribute (``app``, ``celery``, or any :class:`Heretic` instance) in
    the module, then in ``module.celery``; a module with only ``@shared_task`` functions
    gets the default app.
    """
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import app module {module_name!r}: {exc}") from exc
    if attribute:
        app = getattr(module, attribute, None)
        if not isinstance(app, Heretic):
            raise ConfigurationError(f"{name!r} is not a heretic_kombu app")
        return app
    candidates = [module]
    try:
        candidates.append(importlib.import_module(f"{module_name}.celery"))
    except ImportError:
        pass
    for candidate in candidates:
        for attr in ("app", "celery"):
            if isinstance(getattr(candidate, attr, None), Heretic):
                return getattr(candidate, attr)  # type: ignore[no-any-return]
        for value in vars(candidate).values():
            if isinstance(value, Heretic):
                return value
    return current_app()


__all__ = ["Celery", "Heretic", "Job", "NotRegistered", "HereticKombuError", "current_app"]
