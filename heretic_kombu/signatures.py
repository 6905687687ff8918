"""Signatures: Celery's ``Signature``, ``chain``, ``group``, ``chord`` and ``signature()``.

A :class:`Signature` is Celery's: a dict naming a task with its arguments and options,
so it travels as JSON in the same shape Celery uses (a Celery worker or client reads
ours, we read theirs). This module holds the data types, how they are built, copied and
combined (partial application, ``|``, ``freeze``), and how applying one is handed on:
to the task's own ``apply_async``, or to the app, which plans the rows
(:mod:`heretic_kombu.canvas`) or runs it here (:mod:`heretic_kombu.execution`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from . import protocol, serialization
from .core.protocols import AppLike, TaskLike
from .core.registry import current_app
from .result import AsyncResult, GroupResult


class Signature(dict):  # type: ignore[type-arg]
    """One task call, described but not sent: ``add.s(2, 2)``.

    Partial application as in Celery: arguments given when the signature is applied
    (or a parent's result) are put *before* its own; keyword arguments and options
    are merged. An immutable signature (``.si()``) ignores them.
    """

    def __init__(
        self,
        task: str | TaskLike | dict[str, Any] | None = None,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: AppLike | None = None,
        **extra_options: Any,
    ) -> None:
        if isinstance(task, dict):  # a signature's dict (e.g. from a message)
            data = task
            super().__init__(
                task=data["task"],
                args=list(data.get("args") or ()),
                kwargs=dict(data.get("kwargs") or {}),
                options=dict(data.get("options") or {}),
                subtask_type=data.get("subtask_type"),
                immutable=bool(data.get("immutable", False)),
                chord_size=data.get("chord_size"),
            )
        else:
            name = task if isinstance(task, str) or task is None else task.name
            if app is None and task is not None and not isinstance(task, str):
                app = task.app
            super().__init__(
                task=name,
                args=list(args or ()),
                kwargs=dict(kwargs or {}),
                options={**(options or {}), **extra_options},
                subtask_type=subtask_type,
                immutable=immutable,
                chord_size=None,
            )
        self._app = app

    # -- fields -----------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self["task"])

    task = name

    @property
    def args(self) -> list[Any]:
        return self["args"]  # type: ignore[no-any-return]

    @property
    def kwargs(self) -> dict[str, Any]:
        return self["kwargs"]  # type: ignore[no-any-return]

    @property
    def options(self) -> dict[str, Any]:
        return self["options"]  # type: ignore[no-any-return]

    @property
    def immutable(self) -> bool:
        return bool(self["immutable"])

    @property
    def subtask_type(self) -> str | None:
        return self["subtask_type"]  # type: ignore[no-any-return]

    @property
    def id(self) -> str | None:
        return self.options.get("task_id")

    @property
    def app(self) -> AppLike:
        if self._app is None:
            self._app = current_app()
        return self._app

    @property
    def type(self) -> TaskLike:
        """The registered task this signature calls."""
        return self.app.tasks[self.name]

    # -- building -----------------------------------------------------------

    def clone(
        self, args: Iterable[Any] | None = None, kwargs: dict[str, Any] | None = None, **opts: Any
    ) -> Signature:
        """A copy with ``args`` prepended, ``kwargs`` and options merged (Celery's)."""
        new_args, new_kwargs, new_options = self._merge(args, kwargs, opts)
        copy = type(self)._from_fields(self, new_args, new_kwargs, new_options)
        copy._app = self._app
        return copy

    def _merge(
        self, args: Iterable[Any] | None, kwargs: dict[str, Any] | None, options: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        merged_options = {**self.options, **options}
        if self.immutable:
            return list(self.args), dict(self.kwargs), merged_options
        return (
            [*(args or ()), *self.args],
            {**self.kwargs, **(kwargs or {})},
            merged_options,
        )

    @classmethod
    def _from_fields(
        cls, source: Signature, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> Signature:
        copy = Signature(
            source.name,
            args,
            kwargs,
            _copy_options(options),
            subtask_type=source.subtask_type,
            immutable=source.immutable,
        )
        return copy

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        """Set options in place (``queue=``, ``countdown=``…); returns the signature."""
        if immutable is not None:
            self["immutable"] = immutable
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = immutable

    def link(self, callback: Signature) -> Signature:
        """Apply ``callback`` with this task's result when it succeeds."""
        self.options.setdefault("link", []).append(callback)
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Apply ``errback`` with this task's id when it fails for good."""
        self.options.setdefault("link_error", []).append(errback)
        return errback

    on_error = link_error

    def freeze(self, _id: str | None = None, group_id: str | None = None, **_: Any) -> AsyncResult:
        """Fix the task id now (``options['task_id']``) and return its result handle."""
        task_id = _id or self.id or protocol.new_task_id()
        self.options["task_id"] = task_id
        if group_id is not None:
            self.options["group_id"] = group_id
        handle: AsyncResult = self.app.AsyncResult(task_id)
        return handle

    def __or__(self, other: Any) -> chain:
        if isinstance(other, Signature):
            return chain(self, other, app=self._app)
        return NotImplemented

    def __deepcopy__(self, memo: Any) -> Signature:
        return signature(serialization.loads(serialization.dumps(self)), app=self._app)

    def __repr__(self) -> str:
        args = ", ".join(
            [*(repr(a) for a in self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())]
        )
        return f"{self.name}({args}){'' if not self.immutable else ' (immutable)'}"

    # -- calling --------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Send it: write every row the signature needs, then publish."""
        sig = self.clone(args, kwargs, **options)
        if sig.subtask_type is None and sig.name in self.app.tasks:
            # The task's own apply_async: argument check and the task's defaults.
            return sig.type.apply_async(sig.args, sig.kwargs, **sig.options)
        return self.app.apply_signature(sig)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task body here, as Celery does for a signature called directly."""
        new_args, new_kwargs, _ = self._merge(args, kwargs, {})
        return self.type(*new_args, **new_kwargs)

    def apply(
        self,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Run it in this process (eagerly), links included; return an ``EagerResult``."""
        return self.app.apply_signature(self.clone(args, kwargs, **options), eager=True)


class chain(Signature):  # noqa: N801 - Celery's name
    """Run tasks one after another, each getting the previous one's result."""

    def __init__(self, *tasks: Any, app: AppLike | None = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], dict):
            tasks = tuple(tasks[0])  # chain([a, b]) as well as chain(a, b)
        steps: list[Signature] = []
        for task in tasks:
            step = signature(task, app=app)
            if isinstance(step, chain):
                steps.extend(step.tasks)  # a chain in a chain is flattened
            else:
                steps.append(step)
        app = app or next((s._app for s in steps if s._app is not None), None)
        super().__init__("celery.chain", (), {"tasks": steps}, options, "chain", app=app)

    @property
    def tasks(self) -> list[Signature]:
        return self.kwargs["tasks"]  # type: ignore[no-any-return]

    @classmethod
    def _from_fields(
        cls, source: Signature, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> Signature:
        tasks = [signature(t) for t in source.kwargs["tasks"]]
        if tasks and args and not source.immutable:
            tasks[0] = tasks[0].clone(args)
        return chain(*tasks, **_copy_options(options))

    def __or__(self, other: Any) -> chain:
        if isinstance(other, Signature):
            return chain(*self.tasks, other, app=self._app)
        return NotImplemented

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) or "chain()"


class group(Signature):  # noqa: N801 - Celery's name
    """Run tasks in parallel; ``apply_async`` returns a :class:`GroupResult`."""

    def __init__(self, *tasks: Any, app: AppLike | None = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], dict):
            tasks = tuple(tasks[0])  # group([a, b]) or group(generator)
        members = [signature(t, app=app) for t in tasks]
        app = app or next((s._app for s in members if s._app is not None), None)
        super().__init__("celery.group", (), {"tasks": members}, options, "group", app=app)

    @property
    def tasks(self) -> list[Signature]:
        return self.kwargs["tasks"]  # type: ignore[no-any-return]

    @classmethod
    def _from_fields(
        cls, source: Signature, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> Signature:
        tasks = [signature(t) for t in source.kwargs["tasks"]]
        if args and not source.immutable:
            tasks = [t.clone(args) for t in tasks]
        return group(*tasks, **_copy_options(options))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    def freeze(self, _id: str | None = None, group_id: str | None = None, **_: Any) -> Any:
        """Fix the group's id and every member's; return the :class:`GroupResult`."""
        gid = _id or self.id or protocol.new_task_id()
        self.options["task_id"] = gid
        self.kwargs["tasks"] = members = [signature(t, app=self._app) for t in self.tasks]
        return GroupResult(gid, [m.freeze() for m in members], app=self.app)

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"


class chord(Signature):  # noqa: N801 - Celery's name
    """Run ``header`` (a group) in parallel, then ``body`` once with the list of results.

    The body runs exactly once, when the last header job succeeds: the count of header
    jobs still to finish lives in ``heretic_chords`` and each finishing job decrements it
    in the transaction that records its outcome. If a header job fails for good, the
    body is not run: it is recorded as failed with :class:`ChordError` and its errbacks
    are applied, as Celery does.
    """

    def __init__(
        self,
        header: Any,
        body: Any = None,
        app: AppLike | None = None,
        **options: Any,
    ) -> None:
        if isinstance(header, dict) and header.get("subtask_type") == "group":
            header = signature(header, app=app)
        header_group = header if isinstance(header, group) else group(*_as_list(header), app=app)
        body_sig = signature(body, app=app) if body is not None else None
        app = app or header_group._app or (body_sig._app if body_sig is not None else None)
        super().__init__(
            "celery.chord",
            (),
            {"header": header_group, "body": body_sig, "kwargs": {}},
            options,
            "chord",
            app=app,
        )

    @property
    def tasks(self) -> list[Signature]:
        return self.header.tasks

    @property
    def header(self) -> group:
        header = self.kwargs["header"]
        return header if isinstance(header, group) else group(signature(header))

    @property
    def body(self) -> Signature | None:
        body = self.kwargs["body"]
        return signature(body) if body is not None else None

    @classmethod
    def _from_fields(
        cls, source: Signature, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> Signature:
        header = signature(source.kwargs["header"])
        if args and not source.immutable:
            header = header.clone(args)
        body = source.kwargs.get("body")
        return chord(
            header, signature(body) if body is not None else None, **_copy_options(options)
        )

    def freeze(self, _id: str | None = None, group_id: str | None = None, **_: Any) -> Any:
        """Fix the body's id: a chord's result is its body's."""
        body = self.body
        if body is None:
            raise ValueError("a chord needs a body")
        result = body.freeze(_id)
        self.kwargs["body"] = body
        return result

    def __call__(self, body: Signature | None = None, **options: Any) -> Any:
        """``chord(header)(body)`` applies the chord with that body."""
        target = chord(self.header, body if body is not None else self.body, app=self._app)
        return target.apply_async(**{**self.options, **options})

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"


def signature(value: Any, *args: Any, app: AppLike | None = None, **kwargs: Any) -> Signature:
    """Celery's ``signature()``: from a dict (as in a message), a name, or a signature."""
    if isinstance(value, Signature) and not args and not kwargs:
        if app is not None and value._app is None:
            value._app = app
        return value
    if isinstance(value, dict) and not args and not kwargs:
        kind = value.get("subtask_type")
        options = dict(value.get("options") or {})
        if kind == "chain":
            return chain(*value["kwargs"]["tasks"], app=app, **options)
        if kind == "group":
            return group(*value["kwargs"]["tasks"], app=app, **options)
        if kind == "chord":
            inner = value["kwargs"]
            return chord(inner["header"], inner.get("body"), app=app, **options)
        if kind is not None:
            raise ValueError(f"unknown signature type {kind!r}")
        sig = Signature(value, app=app)
        return sig
    return Signature(value, *args, app=app, **kwargs)  # type: ignore[misc]


subtask = signature
maybe_signature = signature


def upgrade_chain(steps: Sequence[Signature], app: AppLike) -> list[Signature]:
    """A group followed by another step becomes a chord with that step as body (Celery)."""
    out: list[Signature] = []
    for step in steps:
        if out and isinstance(out[-1], group):
            header = out.pop()
            step = chord(header, step, app=app)
        elif out and isinstance(out[-1], chord) and out[-1].body is None:
            previous = out.pop()
            assert isinstance(previous, chord)
            step = chord(previous.header, step, app=app)
        out.append(step)
    return out


# -- helpers -----------------------------------------------------------------------


def _copy_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in options.items()}


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
