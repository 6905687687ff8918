"""The canvas: planning a signature into the rows to write, and what a job's end sends.

What runs after a job is kept with the job, in its row's ``workflow`` column, in the keys
Celery puts in a message's embed: ``callbacks``, ``errbacks``, ``chain`` (the steps still
to run, last first) and ``chord``. The signature types themselves live in
:mod:`heretic_kombu.signatures`; running a signature here (``apply``, ``always_eager``)
lives in :mod:`heretic_kombu.execution`.

Applying a signature — from a client, or in a worker when a job ends — first *plans*
it: :func:`plan` turns it into the rows to write (and the chord counters to create),
without touching the database. The caller writes the plan in one transaction (the
worker: the same one that records the finished job's outcome) and publishes after the
commit, so a workflow never loses a step between two jobs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from typing import TYPE_CHECKING, Any

from . import failure, limits, protocol, serialization
from .core.protocols import AppLike
from .exceptions import ChordError
from .execution import apply_eagerly as apply_eagerly
from .result import AsyncResult, GroupResult
from .signatures import Signature as Signature
from .signatures import chain as chain
from .signatures import chord as chord
from .signatures import group as group
from .signatures import maybe_signature as maybe_signature
from .signatures import signature as signature
from .signatures import subtask as subtask
from .signatures import upgrade_chain
from .status import Status
from .store import NextSteps

if TYPE_CHECKING:
    from .store import Job, NewJob

#: Options that describe the workflow rather than the one job.
_WORKFLOW_OPTIONS = ("link", "link_error", "chain", "chord", "group_id", "group_index")
#: The workflow keys of a job's row, as a Celery message's embed carries them: what
#: :func:`next_steps` plans from once the job ends.
LINKS = ("callbacks", "errbacks", "chain", "chord")


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


#: Options of a signature that hold signatures sent later (when a job ends).
_LATER = ("link", "link_error", "chain", "chord")


def check(app: AppLike, sig: Signature) -> None:
    """Check the values of every signature in ``sig`` at the call, the ones sent later
    (links, the rest of a chain, a chord's body) included: a value no job could hold
    is refused here (:class:`InvalidValue`), not when a worker plans the next step.

    The rules are :mod:`heretic_kombu.limits`' (:meth:`build_job` applies them to the
    jobs planned now). A single task with no linked signature has nothing to check here.
    """
    if sig.subtask_type is None and not any(sig.options.get(key) for key in _LATER):
        return
    now = dt.datetime.now(dt.timezone.utc)
    maximum = app.settings.queue_max_priority
    stack: list[Any] = [sig]
    while stack:
        item = signature(stack.pop(), app=app)
        if item.subtask_type is None:
            limits.name(item.name, "task name")
        limits.call(item.options, now=now, max_priority=maximum)
        for key in _LATER:
            value = item.options.get(key)
            if value:
                stack.extend(value if isinstance(value, (list, tuple)) else [value])
        if isinstance(item, (chain, group)):
            stack.extend(item.tasks)
        elif isinstance(item, chord):
            stack.extend(item.header.tasks)
            if item.body is not None:
                stack.append(item.body)


def plan(app: AppLike, sig: Signature, lineage: Lineage = Lineage()) -> tuple[Plan, Any]:
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


def _plan_task(app: AppLike, sig: Signature, lineage: Lineage) -> tuple[Plan, AsyncResult]:
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


def _plan_chain(app: AppLike, sig: chain, lineage: Lineage) -> tuple[Plan, Any]:
    steps = upgrade_chain(sig.tasks, app)
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


def _plan_group(app: AppLike, sig: group, lineage: Lineage) -> tuple[Plan, GroupResult]:
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


def _plan_chord(app: AppLike, sig: chord, lineage: Lineage) -> tuple[Plan, Any]:
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


def next_steps(app: AppLike, job: Job, status: str, value: Any, error: str | None) -> NextSteps:
    """What the workflow of ``job`` sends now that it ended with ``status``.

    Succeeded: its callbacks (given the result), then the next step of its chain. Failed
    for good: its errbacks (given the job's id). A chord header job also counts
    toward its chord; the store calls back here to plan the body (or its failure).
    """
    workflow = job.workflow or {}
    lineage = Lineage(parent_id=job.task_id, root_id=job.root_id or job.task_id)
    planned = Plan()
    if status == Status.SUCCEEDED:
        for callback in workflow.get("callbacks") or ():
            planned.extend(plan(app, signature(callback, app=app).clone([value]), lineage)[0])
        steps = list(workflow.get("chain") or ())
        if steps:
            following = signature(steps.pop(), app=app).clone([value])
            if steps:
                _continue_with(following, steps)
            planned.extend(plan(app, following, lineage)[0])
    elif status == Status.FAILED:
        for errback in workflow.get("errbacks") or ():
            planned.extend(plan(app, signature(errback, app=app).clone([job.task_id]), lineage)[0])
        # As Celery: the steps of the chain that will never run fail with the same error,
        # so waiting on the chain's result raises it instead of waiting forever.
        for step in workflow.get("chain") or ():
            planned.jobs.extend(_never_run(app, signature(step, app=app), value, error, lineage))
    steps_after = NextSteps(jobs=planned.jobs, chords=planned.chords)
    chord_group = job.group_id if workflow.get("chord") else None
    if chord_group is None and status == Status.FAILED and workflow.get("chain"):
        # A chain in a chord's header failed before its last step, the one that counts
        # for the chord: the chord fails now rather than wait forever.
        tail_options = (workflow["chain"][0] or {}).get("options") or {}
        if tail_options.get("chord"):
            chord_group = tail_options.get("group_id")
    if chord_group and status in (Status.SUCCEEDED, Status.FAILED):
        steps_after.chord_group = chord_group
        steps_after.chord_succeeded = status == Status.SUCCEEDED

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
    app: AppLike, step: Signature, meta: Any, error: str | None, lineage: Lineage
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
            status=Status.FAILED,
            eta=None,
            error=error,
            result=serialization.dumps(meta) if meta is not None else None,
            workflow=None,
            note=f"an earlier step of its chain failed: {error}",
        )
    ]


def _failed_body(
    app: AppLike, body: Any, failed_id: str, error: str | None, lineage: Lineage
) -> tuple[list[NewJob], list[Any]]:
    """A header job failed for good: the body's row, failed with ``ChordError`` (Celery's
    error and message), plus the body's errbacks, each given the body's id."""
    body_sig = signature(body, app=app)
    planned, _ = plan(app, body_sig.clone(), lineage)
    message = f"Dependency {failed_id} raised {error or 'an error'}"
    exc = ChordError(message)
    row = dataclasses.replace(
        planned.jobs[0],
        status=Status.FAILED,
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


# -- retrying a step ---------------------------------------------------------------

#: How a step that never ran says so in its ``attempt_logs`` (rows.NewJob's ``note``).
_NOT_RUN = " not run: "


@dataclasses.dataclass
class RetryPlan:
    """What retrying one job takes so that its workflow resumes (see
    :meth:`heretic_kombu.store.History.retry_step`), or why it is refused."""

    refused: str | None = None
    #: Rows written failed, never run, for the steps after this one: deleted on retry.
    forget: list[str] = dataclasses.field(default_factory=list)
    #: The chord this job counts toward (resumed if this job's failure failed it).
    chord_group: str | None = None
    #: New arguments: a step that never ran, given its parent's result.
    payload: serialization.RawJSON | None = None

    @property
    def plain(self) -> bool:
        """Nothing beyond a plain retry of the row."""
        return not (self.forget or self.chord_group or self.payload is not None)


def never_ran(job: Job) -> bool:
    """A row written failed for a workflow step that never ran (an earlier step or a
    chord header job failed)."""
    return (
        job.status == Status.FAILED
        and job.attempts == 0
        and any(_NOT_RUN in line for line in job.attempt_logs)
    )


def plan_retry(
    app: AppLike, job: Job, parent: Job | None, chord_state: tuple[Any, bool]
) -> RetryPlan:
    """What a retry of ``job`` must do so its workflow resumes, given its parent's row
    and ``(body, failed)`` of the chord it counts toward (``(None, False)`` if none).

    A step that ran keeps its place: the steps after it that were written failed
    without running are forgotten, to be written again when it succeeds, and a chord
    its failure failed waits again. A step that never ran runs with its parent's stored
    result, if that parent succeeded; otherwise the retry is refused with the reason.
    """
    workflow = job.workflow or {}
    if never_ran(job):
        chord_body = any("chord header job" in line for line in job.attempt_logs)
        if chord_body:
            return RetryPlan(
                refused=(
                    f"this chord body never ran: a header job ({job.parent_id}) failed;"
                    " retry the failed header job(s) and the chord completes"
                )
            )
        if parent is None or parent.status != Status.SUCCEEDED:
            state = "gone" if parent is None else parent.status
            return RetryPlan(
                refused=(
                    f"this step never ran: the step before it ({job.parent_id}) is {state};"
                    " retry that step and the workflow resumes from it"
                )
            )
        args = [parent.result, *job.args]
        payload = serialization.dumps({"args": args, "kwargs": job.kwargs})
        return RetryPlan(payload=payload)
    planned = RetryPlan()
    for step in workflow.get("chain") or ():
        planned.forget.extend(_step_ids(app, signature(step, app=app)))
    group_id = retry_chord_group(job)
    body, failed = chord_state
    if group_id and failed and body is not None:
        planned.chord_group = group_id
        done, _ = plan(app, signature(body, app=app).clone(), Lineage())
        if done.jobs:
            planned.forget.append(done.jobs[0].task_id)
    return planned


def retry_chord_group(job: Job) -> str | None:
    """The chord ``job`` counts toward (as a header job, or a step of a header chain)."""
    workflow = job.workflow or {}
    if workflow.get("chord") and job.group_id:
        return job.group_id
    tail_options = ((workflow.get("chain") or [None])[0] or {}).get("options") or {}
    group = tail_options.get("group_id") if tail_options.get("chord") else None
    return group if isinstance(group, str) else None


def _step_ids(app: AppLike, step: Signature) -> list[str]:
    """The ids of the rows :func:`_never_run` writes for ``step``."""
    if isinstance(step, chord):
        return _step_ids(app, step.body) if step.body is not None else []
    if isinstance(step, (group, chain)):
        return [found for member in step.tasks for found in _step_ids(app, member)]
    return [step.id] if step.id is not None else []


# -- helpers -----------------------------------------------------------------------


def _to_dict(value: Any) -> dict[str, Any]:
    """A signature as plain JSON-able data (what goes in the row and the message)."""
    return serialization.loads(_encode(value))  # type: ignore[no-any-return]


def _encode(value: Any) -> serialization.RawJSON:
    return serialization.dumps(value)
