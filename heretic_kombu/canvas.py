"""Signatures and the canvas: ``chain``, ``group``, ``chord``, links and errbacks.

A :class:`Signature` is Celery's: a dict naming a task with its arguments and options,
so it travels as JSON in the same shape Celery uses (a Celery worker or client reads
ours, we read theirs). What runs after a job is kept with the job, in its row's
``workflow`` column, in the keys Celery puts in a message's embed: ``callbacks``,
``errbacks``, ``chain`` (the steps still to run, last first) and ``chord``.

Applying a signature — from a client, or in a worker when a job ends — first *plans*
it: :func:`plan` turns it into the rows to write (and the chord counters to create),
without touching the database. The caller writes the plan in one transaction (the
worker: the same one that records the finished job's outcome) and publishes after the
commit, so a workflow never loses a step between two jobs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import failure, protocol, serialization, states
from .exceptions import ChordError
from .result import AsyncResult, EagerResult, GroupResult

if TYPE_CHECKING:
    from .app import Heretic
    from .store import Job, NewJob, NextSteps
    from .task import Task

#: Options that describe the workflow rather than the one job.
_WORKFLOW_OPTIONS = ("link", "link_error", "chain", "chord", "group_id", "group_index")
#: The workflow keys of a job's row, as a Celery message's embed carries them: what
#: :func:`next_steps` plans from once the job ends.
LINKS = ("callbacks", "errbacks", "chain", "chord")


class Signature(dict):  # type: ignore[type-arg]
    """One task call, described but not sent: ``add.s(2, 2)``.

    Partial application as in Celery: arguments given when the signature is applied
    (or a parent's result) are put *before* its own; keyword arguments and options
    are merged. An immutable signature (``.si()``) ignores them.
    """

    def __init__(
        self,
        task: str | Task | dict[str, Any] | None = None,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Heretic | None = None,
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
    def app(self) -> Heretic:
        if self._app is None:
            from .app import current_app

            self._app = current_app()
        return self._app

    @property
    def type(self) -> Task:
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
        return self.app.AsyncResult(task_id)

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
        return apply_eagerly(self.clone(args, kwargs, **options))


class chain(Signature):  # noqa: N801 - Celery's name
    """Run tasks one after another, each getting the previous one's result."""

    def __init__(self, *tasks: Any, app: Heretic | None = None, **options: Any) -> None:
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

    def __init__(self, *tasks: Any, app: Heretic | None = None, **options: Any) -> None:
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
        app: Heretic | None = None,
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
        return header if isinstance(header, group) else group(signature(header))  # type: ignore[no-any-return]

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


def signature(value: Any, *args: Any, app: Heretic | None = None, **kwargs: Any) -> Signature:
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


# -- planning: what to write for a signature -----------------------------------------


@dataclasses.dataclass
class ChordCounter:
    """A chord's row in ``heretic_chords``: header jobs to wait for, and the body."""

    group_id: str
    total: int
    body: serialization.RawJSON


@dataclasses.dataclass
class Plan:
    """Rows to write in one transaction for one application of a signature."""

    jobs: list[NewJob] = dataclasses.field(default_factory=list)
    chords: list[ChordCounter] = dataclasses.field(default_factory=list)

    def extend(self, other: Plan) -> None:
        self.jobs.extend(other.jobs)
        self.chords.extend(other.chords)


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Who caused the jobs being planned (a job's id as parent, the workflow's root)."""

    parent_id: str | None = None
    root_id: str | None = None


def plan(app: Heretic, sig: Signature, lineage: Lineage = Lineage()) -> tuple[Plan, Any]:
    """Plan ``sig`` (its arguments already merged); return the plan and the handle
    (``AsyncResult`` or ``GroupResult``) the caller gets back."""
    kind = sig.subtask_type
    if kind == "chain":
        return _plan_chain(app, sig, lineage)  # type: ignore[arg-type]
    if kind == "group":
        return _plan_group(app, sig, lineage)  # type: ignore[arg-type]
    if kind == "chord":
        return _plan_chord(app, sig, lineage)  # type: ignore[arg-type]
    return _plan_task(app, sig, lineage)


def _plan_task(app: Heretic, sig: Signature, lineage: Lineage) -> tuple[Plan, AsyncResult]:
    options = dict(sig.options)
    workflow = {
        "callbacks": [_to_dict(s) for s in options.pop("link", None) or ()] or None,
        "errbacks": [_to_dict(s) for s in options.pop("link_error", None) or ()] or None,
        "chain": [_to_dict(s) for s in options.pop("chain", None) or ()] or None,
        "chord": _to_dict(options.pop("chord")) if options.get("chord") else None,
    }
    group_index = options.pop("group_index", None)
    if group_index is not None:
        workflow["group_index"] = group_index
    options.pop("chord", None)
    group_id = options.pop("group_id", None)
    encoded = (
        serialization.dumps(workflow) if any(v is not None for v in workflow.values()) else None
    )
    job = app.build_job(
        sig.name,
        sig.args,
        sig.kwargs,
        parent_id=lineage.parent_id,
        root_id=lineage.root_id,
        group_id=group_id,
        workflow=encoded,
        **options,
    )
    result = AsyncResult(job.task_id, app=app, task_name=sig.name)
    return Plan(jobs=[job]), result


def _plan_chain(app: Heretic, sig: chain, lineage: Lineage) -> tuple[Plan, Any]:
    steps = _upgrade_chain(sig.tasks, app)
    if not steps:
        raise ValueError("cannot apply an empty chain")
    results = [step.freeze() for step in steps]  # ids known up front: .parent links
    for earlier, later in itertools.pairwise(results):
        later.parent = earlier
    first, rest = steps[0], steps[1:]
    for key in ("link", "link_error"):  # the chain's own links go on its last step
        for extra in sig.options.get(key, ()):
            steps[-1].options.setdefault(key, []).append(extra)
    if sig.options.get("link_error"):  # an error anywhere in the chain calls them
        for step in steps[:-1]:
            step.options.setdefault("link_error", []).extend(sig.options["link_error"])
    first = first.clone(**_call_options(sig.options))
    if rest:
        first.options["chain"] = list(reversed(rest))
    planned, _ = plan(app, first, lineage)
    return planned, results[-1]


def _upgrade_chain(steps: Sequence[Signature], app: Heretic) -> list[Signature]:
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


def _plan_group(app: Heretic, sig: group, lineage: Lineage) -> tuple[Plan, GroupResult]:
    group_id = sig.options.get("task_id") or protocol.new_task_id()
    extra = _call_options(sig.options)
    total = Plan()
    results = []
    for index, member in enumerate(sig.tasks):
        member = member.clone(**extra)
        _mark_group(member, group_id, index)
        planned, handle = plan(app, member, lineage)
        lineage = _rooted(lineage, planned)
        total.extend(planned)
        results.append(handle)
    return total, GroupResult(group_id, results, app=app)


def _rooted(lineage: Lineage, planned: Plan) -> Lineage:
    """``lineage`` for the jobs planned after ``planned``: a workflow sent from outside
    any job has its first job as root (the sender sets it on every job; set here, the
    members of a group need no second pass)."""
    if lineage.root_id is None and planned.jobs:
        return Lineage(lineage.parent_id, planned.jobs[0].task_id)
    return lineage


def _mark_group(member: Signature, group_id: str, index: int) -> None:
    """Tag the job whose result is the member's result (a chain's last step)."""
    target = member
    while isinstance(target, chain) and target.tasks:
        target = target.tasks[-1]
    target.options["group_id"] = group_id
    target.options["group_index"] = index


def _plan_chord(app: Heretic, sig: chord, lineage: Lineage) -> tuple[Plan, Any]:
    body = sig.body
    if body is None:
        raise ValueError("a chord needs a body: chord(header)(body) or chord(header, body)")
    body = body.clone(**_chord_body_options(sig.options))
    body_result = body.freeze()
    header = sig.header
    if not header.tasks:  # nothing to wait for: the body runs with an empty list
        planned, _ = plan(app, body.clone([[]]), lineage)
        return planned, body_result
    group_id = header.options.get("task_id") or protocol.new_task_id()
    extra = _call_options(sig.options)
    extra.pop("chain", None)
    total = Plan(chords=[ChordCounter(group_id, len(header.tasks), _encode(body))])
    header_results = []
    for index, member in enumerate(header.tasks):
        member = member.clone(**extra)
        _mark_group(member, group_id, index)
        tail = member
        while isinstance(tail, chain) and tail.tasks:
            tail = tail.tasks[-1]
        tail.options["chord"] = body
        planned, handle = plan(app, member, lineage)
        lineage = _rooted(lineage, planned)
        total.extend(planned)
        header_results.append(handle)
    body_result.parent = GroupResult(group_id, header_results, app=app)
    return total, body_result


def _chord_body_options(options: dict[str, Any]) -> dict[str, Any]:
    """A chain continuing after the chord, and the chord's links, belong to its body."""
    return {k: options[k] for k in ("chain", "link", "link_error") if options.get(k)}


def _call_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options of a composite that apply to each job it sends (queue, countdown…)."""
    return {
        k: v
        for k, v in options.items()
        if k not in _WORKFLOW_OPTIONS and k not in ("task_id", "link", "link_error")
    }


# -- what happens when a job ends ---------------------------------------------------


def next_steps(app: Heretic, job: Job, status: str, value: Any, error: str | None) -> NextSteps:
    """What the workflow of ``job`` sends now that it ended with ``status``.

    Succeeded: its callbacks (given the result), then the next step of its chain. Failed
    for good: its errbacks (given the job's id). A chord header job also counts
    toward its chord; the store calls back here to plan the body (or its failure).
    """
    from .store import NextSteps

    workflow = job.workflow or {}
    lineage = Lineage(parent_id=job.task_id, root_id=job.root_id or job.task_id)
    planned = Plan()
    if status == states.SUCCEEDED:
        for callback in workflow.get("callbacks") or ():
            planned.extend(plan(app, signature(callback, app=app).clone([value]), lineage)[0])
        steps = list(workflow.get("chain") or ())
        if steps:
            following = signature(steps.pop(), app=app).clone([value])
            if steps:
                _continue_with(following, steps)
            planned.extend(plan(app, following, lineage)[0])
    elif status == states.FAILED:
        for errback in workflow.get("errbacks") or ():
            planned.extend(plan(app, signature(errback, app=app).clone([job.task_id]), lineage)[0])
        # As Celery: the steps of the chain that will never run fail with the same error,
        # so waiting on the chain's result raises it instead of waiting forever.
        for step in workflow.get("chain") or ():
            planned.jobs.extend(_never_run(app, signature(step, app=app), value, error, lineage))
    steps_after = NextSteps(jobs=planned.jobs, chords=planned.chords)
    chord_group = job.group_id if workflow.get("chord") else None
    if chord_group is None and status == states.FAILED and workflow.get("chain"):
        # A chain in a chord's header failed before its last step, the one that counts
        # for the chord: the chord fails now rather than wait forever.
        tail_options = (workflow["chain"][0] or {}).get("options") or {}
        if tail_options.get("chord"):
            chord_group = tail_options.get("group_id")
    if chord_group and status in (states.SUCCEEDED, states.FAILED):
        steps_after.chord_group = chord_group
        steps_after.chord_succeeded = status == states.SUCCEEDED

        def complete(body: Any, results: list[Any]) -> tuple[list[NewJob], list[Any]]:
            done, _ = plan(app, signature(body, app=app).clone([results]), lineage)
            return done.jobs, list(done.chords)

        def fail(body: Any) -> tuple[list[NewJob], list[Any]]:
            return _failed_body(app, body, job.task_id, error, lineage)

        steps_after.complete_chord, steps_after.fail_chord = complete, fail
    return steps_after


def _continue_with(step: Signature, rest: list[Any]) -> None:
    """Attach the rest of a chain to ``step`` (to a chord's body, if ``step`` is a chord)."""
    if isinstance(step, chord) and step.body is not None:
        body = step.body
        body.options["chain"] = rest
        step.kwargs["body"] = body
    else:
        step.options["chain"] = rest


def _never_run(
    app: Heretic, step: Signature, meta: Any, error: str | None, lineage: Lineage
) -> list[NewJob]:
    """Rows, already failed with ``meta``/``error``, for the jobs of a chain step that
    cannot run because an earlier step failed: the step itself, a chord's body, or a
    group's members."""
    if isinstance(step, chord):
        body = step.body
        return _never_run(app, body, meta, error, lineage) if body is not None else []
    if isinstance(step, (group, chain)):
        return [
            row for member in step.tasks for row in _never_run(app, member, meta, error, lineage)
        ]
    if step.id is None:
        return []  # never frozen, so nobody holds its id
    planned, _ = plan(app, step.clone(), lineage)
    return [
        dataclasses.replace(
            planned.jobs[0],
            status=states.FAILED,
            eta=None,
            error=error,
            result=serialization.dumps(meta) if meta is not None else None,
            workflow=None,
            note=f"an earlier step of its chain failed: {error}",
        )
    ]


def _failed_body(
    app: Heretic, body: Any, failed_id: str, error: str | None, lineage: Lineage
) -> tuple[list[NewJob], list[Any]]:
    """A header job failed for good: the body's row, failed with ``ChordError`` (Celery's
    error and message), plus the body's errbacks, each given the body's id."""
    body_sig = signature(body, app=app)
    planned, _ = plan(app, body_sig.clone(), lineage)
    message = f"Dependency {failed_id} raised {error or 'an error'}"
    exc = ChordError(message)
    row = dataclasses.replace(
        planned.jobs[0],
        status=states.FAILED,
        eta=None,
        error=failure.summary(exc),
        result=serialization.dumps(failure.describe(exc)),
        workflow=None,
        note=f"chord header job {failed_id} failed",
    )
    rows = [row]
    errback_lineage = Lineage(parent_id=row.task_id, root_id=lineage.root_id)
    for errback in body_sig.options.get("link_error") or ():
        more, _ = plan(app, signature(errback, app=app).clone([row.task_id]), errback_lineage)
        rows.extend(more.jobs)
    return rows, []


# -- running a signature here (apply / always_eager) ---------------------------------


def apply_eagerly(sig: Signature) -> Any:
    """Run a signature and what follows it in this process; return the last result."""
    if isinstance(sig, chain):
        value: Any = None
        result: Any = None
        for index, step in enumerate(_upgrade_chain(sig.tasks, sig.app)):
            result = apply_eagerly(step.clone([value]) if index else step)
            value = result.get(propagate=True) if hasattr(result, "get") else result
        return result
    if isinstance(sig, group):
        members = [apply_eagerly(member) for member in sig.tasks]
        return GroupResult(sig.id or protocol.new_task_id(), members, app=sig.app)
    if isinstance(sig, chord):
        header = apply_eagerly(sig.header)
        body = sig.body
        assert body is not None
        return apply_eagerly(body.clone([header.get()]))
    options = sig.options
    outcome: EagerResult = sig.type.apply(sig.args, sig.kwargs, task_id=options.get("task_id"))
    followers = options.get("link" if outcome.successful() else "link_error") or ()
    for follower in followers:
        argument = outcome.result if outcome.successful() else outcome.id
        apply_eagerly(signature(follower, app=sig.app).clone([argument]))
    if outcome.failed() and sig.app.settings.eager_propagates:
        raise outcome.result  # Celery's task_eager_propagates, for canvases as for tasks
    return outcome


# -- helpers -----------------------------------------------------------------------


def _to_dict(value: Any) -> dict[str, Any]:
    """A signature as plain JSON-able data (what goes in the row and the message)."""
    return serialization.loads(_encode(value))  # type: ignore[no-any-return]


def _encode(value: Any) -> serialization.RawJSON:
    return serialization.dumps(value)


def _copy_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in options.items()}


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]
