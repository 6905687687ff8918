"""Task and ``shared_task``: Celery's task API.

A task is an instance of a :class:`Task` subclass made from a function by
``@app.task`` or ``@shared_task``. ``.delay()``/``.apply_async()`` hand the call to the
app, which writes the row and publishes; calling the task directly runs the function
here, as in Celery. ``self.request`` and ``self.retry()`` work inside a running task;
the request itself (:class:`Context`) lives in :mod:`heretic_kombu.core.context`.
"""

from __future__ import annotations

import datetime as dt
import inspect
import threading
from collections.abc import Callable
from typing import Any

from . import limits, serialization
from . import retry as retry_policy
from .core import context
from .core.context import PROGRESS_KEY as PROGRESS_KEY
from .core.context import Context as Context
from .core.context import current_request as current_request
from .core.protocols import AppLike
from .core.registry import current_app, register_shared
from .exceptions import ConfigurationError, InvalidValue, MaxRetriesExceededError, Retry
from .execution import run_eagerly
from .ratelimit import parse_rate
from .result import AsyncResult
from .signatures import Signature, group


class Task:
    """Base class of every task; subclass it for shared behaviour (``base=``).

    Attributes mirror Celery's task options and keep its defaults.
    """

    name: str = ""
    app: AppLike | None = None
    typing: bool = True
    max_retries: int | None = 3
    default_retry_delay: float = 180
    autoretry_for: tuple[type[BaseException], ...] = ()
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    retry_kwargs: dict[str, Any] = {}  # noqa: RUF012
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter: bool = True
    queue: str | None = None
    priority: int | None = None
    expires: float | dt.datetime | None = None
    ignore_result: bool = False
    #: Expected errors: recorded as failures, but the worker logs them at INFO.
    throws: tuple[type[BaseException], ...] = ()
    #: Always true in heretic: messages are acked only after the outcome is committed.
    acks_late: bool = True
    #: Celery's rate limit ("10/s", "100/m", "1000/h"), per worker; None: no limit.
    rate_limit: str | float | None = None
    #: Hard time limit in seconds: the prefork pool kills the job's process after it and
    #: the attempt fails with TimeLimitExceeded. None: the task_time_limit setting.
    time_limit: float | None = None
    #: Soft time limit in seconds: SoftTimeLimitExceeded is raised inside the body.
    #: None: the task_soft_time_limit setting.
    soft_time_limit: float | None = None
    serializer: str = "json"

    def __init__(self) -> None:
        self._local = threading.local()

    # -- calling ------------------------------------------------------------

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task body; set from the decorated function."""
        raise NotImplementedError(f"task {self.name!r} has no body")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body here and now, as Celery does for a direct call."""
        stack = self._request_stack()
        if stack:  # already inside a worker/eager call that pushed the request
            return self.run(*args, **kwargs)
        self.push_request(
            Context(args=list(args), kwargs=kwargs, called_directly=True, task=self.name)
        )
        try:
            return self.run(*args, **kwargs)
        finally:
            self.pop_request()

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Send the task with these arguments: ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        expires: float | dt.datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Write the job's row and publish it; return its :class:`AsyncResult`.

        Arguments are checked against the task's signature (``typing``) and must be
        JSON-encodable; either problem raises here, before anything is written.
        """
        args = list(args or ())
        kwargs = dict(kwargs or {})
        if self.typing:
            self._check_arguments(args, kwargs)
        app = self._get_app()
        sent: AsyncResult = app.send_task(
            self.name,
            args,
            kwargs,
            task_id=task_id,
            countdown=countdown,
            eta=eta,
            expires=expires if expires is not None else self.expires,
            queue=queue,
            priority=priority if priority is not None else self.priority,
            max_attempts=retry_policy.max_attempts_for(self.max_retries),
            **options,
        )
        return sent

    # -- signatures (canvas) -------------------------------------------------

    def signature(
        self, args: Any = None, kwargs: Any = None, *starargs: Any, **options: Any
    ) -> Signature:
        """A signature of this task with these arguments and options (``.s()`` spelled out)."""
        immutable = options.pop("immutable", False)
        return Signature(self, args, kwargs, options, immutable=immutable, app=self._get_app())

    subtask = signature

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A partial signature: ``add.s(2)`` later called with more arguments."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: a parent's result is not passed to it."""
        return self.signature(args, kwargs, immutable=True)

    def starmap(self, it: Any) -> Signature:
        """One job calling this task once per argument tuple of ``it`` (Celery's starmap)."""
        arguments = {"task": self.s(), "it": [list(a) for a in it]}
        return Signature("celery.starmap", (), arguments, app=self._get_app())

    def map(self, it: Any) -> Signature:
        """One job calling this task once per item of ``it`` (Celery's map)."""
        return Signature("celery.map", (), {"task": self.s(), "it": list(it)}, app=self._get_app())

    def chunks(self, it: Any, n: int) -> Any:
        """A group of starmap jobs over ``it`` in chunks of ``n`` (Celery's chunks)."""
        items = [list(a) for a in it]
        return group(
            *(self.starmap(items[i : i + n]) for i in range(0, len(items), n)), app=self._get_app()
        )

    def AsyncResult(self, task_id: str) -> AsyncResult:  # noqa: N802 - Celery's name
        """The result handle of ``task_id``."""
        handle: AsyncResult = self._get_app().AsyncResult(task_id)
        return handle

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Run the task here, eagerly, with retries; return an ``EagerResult``."""
        return run_eagerly(self, list(args or ()), dict(kwargs or {}), options.get("task_id"))

    def update_state(
        self,
        task_id: str | None = None,
        state: str | None = None,
        meta: Any = None,
        **_: Any,
    ) -> None:
        """Publish progress of the running job: ``AsyncResult.state`` becomes ``state``
        and ``.info`` becomes ``meta`` until the attempt ends (Celery's update_state)."""
        task_id = task_id or self.request.id
        if task_id is None or self.request.is_eager:
            return
        progress = serialization.dumps({PROGRESS_KEY: state or "PROGRESS", "meta": meta})
        self._get_app().store.set_progress(task_id, progress)

    # -- hooks for custom base classes (Celery's names and arguments) ----------------
    # ``einfo`` is Celery's ExceptionInfo (heretic_kombu.failure.ExceptionInfo): .exception,
    # .type, .traceback; it is also the formatted traceback as text.

    def before_start(self, task_id: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Called in the worker just before the task body runs."""

    def on_success(
        self, retval: Any, task_id: str, args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        """Called after the body returned."""

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None:
        """Called after the body raised and the job will not be retried."""

    def on_retry(
        self,
        exc: BaseException | None,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None:
        """Called when the attempt ends in a retry."""

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: list[Any],
        kwargs: dict[str, Any],
        einfo: str | None,
    ) -> None:
        """Called after every attempt, with Celery's state name as ``status``."""

    # -- inside a running task ------------------------------------------------

    @property
    def request(self) -> Context:
        """The current call's :class:`Context` (an empty one outside a call)."""
        stack = self._request_stack()
        return stack[-1] if stack else Context(task=self.name)

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
    ) -> Retry:
        """Ask for another attempt of this job, as Celery's ``Task.retry``.

        Raises :class:`Retry` (the worker schedules the next attempt in the database),
        or, once ``max_retries`` is reached, re-raises ``exc`` if given, else
        :class:`MaxRetriesExceededError`.
        """
        request = self.request
        if request.called_directly:
            # Celery: a direct call has no message to retry; surface the error.
            if exc is not None:
                raise exc
            raise Retry("Task can be retried", None)
        limit = max_retries
        if limit is None:
            limit = (
                retry_policy.max_retries_for(request.max_attempts)
                if request.max_attempts is not None
                else self.max_retries
            )
        if retry_policy.retries_exhausted(request.retries, limit):
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
            )
        when: float | dt.datetime | None = eta if eta is not None else countdown
        if when is None:
            when = self.default_retry_delay
        if when is not None:  # refused here, in the task, rather than in the worker
            now = dt.datetime.now(dt.timezone.utc)
            limits.when(now, when, "eta" if eta is not None else "countdown")
        signal = Retry(exc=exc, when=when)
        signal.max_retries = max_retries  # type: ignore[attr-defined]
        signal.new_args = list(args) if args is not None else None  # type: ignore[attr-defined]
        signal.new_kwargs = dict(kwargs) if kwargs is not None else None  # type: ignore[attr-defined]
        if throw:
            raise signal
        return signal

    # -- internals ------------------------------------------------------------

    def _get_app(self) -> AppLike:
        if self.app is not None:
            return self.app
        return current_app()

    def _request_stack(self) -> list[Context]:
        stack: list[Context] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def push_request(self, request: Context) -> None:
        """Make ``request`` this task's current request, and this thread's (the worker
        and eager runs call this before the body runs)."""
        self._request_stack().append(request)
        context.push(request)

    def pop_request(self) -> None:
        """End the request pushed last (after the body ran)."""
        self._request_stack().pop()
        context.pop()

    def _check_arguments(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        run = self.run
        function = getattr(run, "__func__", run)
        cached = self.__dict__.get("_run_signature")
        if cached is None or cached[0] is not function:  # read once per task, not per call
            try:
                cached = (function, inspect.signature(run))
            except (TypeError, ValueError):  # builtins without a signature: nothing to check
                cached = (function, None)
            self._run_signature = cached
        signature = cached[1]
        if signature is None:
            return
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"


def make_task(
    fun: Callable[..., Any],
    *,
    app: AppLike | None,
    name: str | None = None,
    base: type[Task] | None = None,
    bind: bool = False,
    **options: Any,
) -> Task:
    """Build the task object for ``fun`` (what ``@app.task``/``@shared_task`` return)."""
    base = base or Task
    serializer = options.get("serializer", "json")
    if serializer != "json":
        raise ConfigurationError(
            f"task {fun.__name__!r}: serializer={serializer!r} refused; heretic_kombu is JSON only"
        )
    task_name = name or f"{fun.__module__}.{fun.__qualname__}"
    check_runtime_options(task_name, options)
    attributes: dict[str, Any] = {
        "name": task_name,
        "run": fun if bind else staticmethod(fun),
        "__doc__": fun.__doc__,
        "__module__": fun.__module__,
        "__wrapped__": fun,
        **options,
    }
    if app is not None:
        attributes["app"] = app
    cls = type(fun.__name__, (base,), attributes)
    return cls()  # type: ignore[no-any-return]


def check_runtime_options(task_name: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a ``rate_limit``, ``time_limit`` or ``soft_time_limit``
    no worker could apply, when the task is declared rather than when it runs."""
    if options.get("rate_limit") is not None:
        try:
            parse_rate(options["rate_limit"])
        except ValueError as exc:
            raise ValueError(f"task {task_name!r}: {exc}") from None
    for key in ("time_limit", "soft_time_limit"):
        value = options.get(key)
        if value is None:
            continue
        try:
            limits.positive_seconds(value, key)
        except InvalidValue:
            raise InvalidValue(
                f"task {task_name!r}: {key}={value!r} must be a number of seconds > 0"
            ) from None
    hard, soft = options.get("time_limit"), options.get("soft_time_limit")
    if hard is not None and soft is not None and soft > hard:
        raise ValueError(
            f"task {task_name!r}: soft_time_limit ({soft}) must be less than or equal to"
            f" time_limit ({hard})"
        )


def shared_task(*args: Any, **options: Any) -> Any:
    """Declare a task usable by any app, as Celery's ``shared_task``.

    With no app created, the task binds to a default app built from the environment
    (``HERETIC_DATABASE_URL``, ``HERETIC_BROKER_URL``…), so a Celery tasks module works
    after changing only its import line.
    """

    def decorate(fun: Callable[..., Any]) -> Task:
        task = make_task(fun, app=None, **options)
        register_shared(task)
        return task

    if len(args) == 1 and callable(args[0]) and not options:
        return decorate(args[0])
    return decorate
