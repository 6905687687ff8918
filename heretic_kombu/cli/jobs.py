"""``heretic jobs`` and ``heretic prune``: search the history and act on it.

Filters are the same everywhere (``--status``, ``--task``, ``--queue``, ``--where
kwargs.to=bob@example.com``, ``--payload '{"kwargs": {...}}'``, ``--error-contains``,
``--since 2h``, ``--until``); a bad one exits 2 with what was wrong. Output is a
readable table, or ``--json``: one JSON object per line, for scripts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from ..search import Where, parse_duration
from ..status import ALL_STATUSES, TERMINAL
from ..store import Job
from ..store.history import REQUEUABLE
from .main import EXIT_NOT_FOUND, State, app_option, cli

#: A command refused (as click's usage errors).
EXIT_USAGE = 2


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The search filters every ``jobs`` command shares."""
    options = [
        click.option(
            "--status",
            "statuses",
            multiple=True,
            type=click.Choice([s.value for s in ALL_STATUSES]),
            help="Only jobs in this status (repeatable).",
        ),
        click.option("--task", help="Only jobs of this task name."),
        click.option("--queue", help="Only jobs of this queue."),
        click.option(
            "--where",
            "conditions",
            multiple=True,
            help="PATH OP VALUE on the arguments, e.g. kwargs.to=bob@example.com, "
            "args.0>100 (OP: = != > >= < <=; VALUE is JSON if it parses). Repeatable.",
        ),
        click.option(
            "--payload", help='JSON the payload must contain, e.g. \'{"kwargs": {"to": "bob"}}\'.'
        ),
        click.option("--error-contains", help="Only jobs whose error contains this text."),
        click.option(
            "--since", help="Created within this long (2h, 30m, 7d) or since an ISO date."
        ),
        click.option("--until", help="Created before this long ago, or before an ISO date."),
        click.option("--root", "root_id", help="Only jobs of the workflow with this root id."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def query_filters(
    statuses: Sequence[str],
    task: str | None,
    queue: str | None,
    conditions: Sequence[str],
    payload: str | None,
    error_contains: str | None,
    since: str | None,
    until: str | None,
    root_id: str | None,
    **_: Any,
) -> dict[str, Any]:
    """The CLI's filter options as ``app.jobs.search`` keyword arguments."""
    try:
        where = [Where.parse(text) for text in conditions]
        contains = json.loads(payload) if payload else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return {
        "status": list(statuses),
        "task": task,
        "queue": queue,
        "where": where,
        "payload": contains,
        "error_contains": error_contains,
        "since": since,
        "until": until,
        "root_id": root_id,
    }


def _checked(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@cli.group()
def jobs() -> None:
    """Job history, straight from the heretic_jobs table."""


@jobs.command("list")
@app_option
@filter_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--after", help="The cursor printed at the end of the previous page.")
@click.option(
    "--order",
    type=click.Choice(["-created_at", "created_at", "-id", "id"]),
    default="-created_at",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def jobs_list(
    state: State, /, limit: int, after: str | None, order: str, as_json: bool, **options: Any
) -> None:
    """Jobs matching the filters, newest first."""
    filters = query_filters(**options)
    page = _checked(
        lambda: state.app().jobs.search(**filters, limit=limit, after=after, order_by=order)
    )
    for bad in page.skipped:  # left out, named: the other rows are listed (issue 15)
        click.echo(
            f"row {bad.id} ({bad.task_id}, {bad.status}) cannot be read: {bad.reason}", err=True
        )
    if as_json:
        for row in page.rows:
            click.echo(json.dumps(_as_dict(row), default=str))
        return
    table = [("ID", "TASK ID", "TASK", "QUEUE", "STATUS", "TRIES", "CREATED", "ERROR")]
    for row in page.rows:
        table.append(
            (
                str(row.id),
                row.task_id,
                row.task_name,
                row.queue_name,
                row.status,
                f"{row.attempts}/{_limit(row.max_attempts)}",
                row.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                (row.error or "")[:60],
            )
        )
    _print_table(table)
    if page.next_cursor:
        click.echo(f"more: --after {page.next_cursor}")


@jobs.command("show")
@app_option
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="The row as one JSON object.")
@click.pass_obj
def jobs_show(state: State, task_id: str, as_json: bool) -> None:
    """One job (by task id or row id): payload, result or error, and every attempt."""
    row = state.app().jobs.get(task_id)
    if row is None:
        click.echo(f"no job {task_id}", err=True)
        raise SystemExit(EXIT_NOT_FOUND)
    if as_json:
        click.echo(json.dumps(_as_dict(row), default=str))
        return
    data = _as_dict(row)
    logs = data.pop("attempt_logs")
    tb = data.pop("traceback")
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        click.echo(f"{key:>18}: {'' if value is None else value}")
    click.echo(f"{'attempt_logs':>18}:")
    for line in logs:
        click.echo(f"    {line}")
    if tb:
        click.echo(f"{'traceback':>18}:")
        click.echo("    " + tb.rstrip().replace("\n", "\n    "))


@jobs.command("retry")
@app_option
@click.argument("task_ids", nargs=-1)
@filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--requeue",
    is_flag=True,
    help="Also publish again named queued or started jobs whose message the broker lost.",
)
@click.pass_obj
def jobs_retry(
    state: State, /, task_ids: tuple[str, ...], yes: bool, requeue: bool, **options: Any
) -> None:
    """Send failed or revoked jobs again: the ones named, or every one matching the
    filters (asks first, unless --yes). Each keeps its id and history; the retry is
    logged in its attempt_logs. A workflow step keeps its place in its workflow; a
    step that never ran and cannot be run (its parent did not succeed) is refused
    (exit 2). With --requeue, a named queued or started job is published again."""
    app = state.app()
    if task_ids:
        _retry_named(app, task_ids, requeue)
        return
    filters = query_filters(**options)
    if not filters["status"]:
        filters["status"] = ["failed", "revoked"]
    if not set(filters["status"]) <= {"failed", "revoked"}:
        raise click.UsageError("only failed or revoked jobs can be retried")
    count = _checked(lambda: app.jobs.count(**filters))
    if count == 0:
        click.echo("no job matches")
        return
    if not yes:
        click.confirm(f"Retry {count} job(s)?", abort=True)
    click.echo(f"retried {_checked(lambda: app.jobs.retry_matching(**filters))} job(s)")


def _retry_named(app: Any, task_ids: tuple[str, ...], requeue: bool) -> None:
    """``jobs retry ID…``: retry (or with ``requeue``, publish again) each named job;
    exit 2 if one was refused."""
    found = {key: app.jobs.get(key) for key in task_ids}
    missing = [key for key, job in found.items() if job is None]
    if missing:
        click.echo(f"no job {', '.join(missing)}", err=True)
        raise SystemExit(EXIT_NOT_FOUND)
    done, refused = 0, 0
    for job in found.values():
        if job.status in REQUEUABLE:
            if not requeue:
                click.echo(
                    f"{job.task_id}: not retried, it is {job.status} (its message may still"
                    " be on its way); --requeue publishes it again if the broker lost it",
                    err=True,
                )
                refused += 1
            elif app.jobs.requeue(job.task_id):
                click.echo(f"{job.task_id}: requeued (was {job.status})")
                done += 1
            continue
        reason = app.jobs.retry_refusal(job)
        if reason is not None:
            click.echo(f"{job.task_id}: not retried, {reason}", err=True)
            refused += 1
        elif app.jobs.retry(job.task_id):
            done += 1
    click.echo(f"retried {done} of {len(task_ids)} job(s)")
    if refused:
        raise SystemExit(EXIT_USAGE)


@jobs.command("cancel")
@app_option
@click.argument("task_ids", nargs=-1, required=True)
@click.pass_obj
def jobs_cancel(state: State, task_ids: tuple[str, ...]) -> None:
    """Revoke jobs that have not started yet (a started job is left to finish)."""
    app = state.app()
    code = 0
    for key in task_ids:
        row = app.jobs.get(key)
        if row is None:
            click.echo(f"no job {key}", err=True)
            code = EXIT_NOT_FOUND
            continue
        if app.jobs.cancel(row.task_id):
            click.echo(f"{row.task_id}: revoked")
        else:
            click.echo(f"{row.task_id}: not cancelled, it is {app.jobs.get(row.task_id).status}")  # type: ignore[union-attr]
    raise SystemExit(code)


@jobs.command("purge")
@app_option
@filter_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def jobs_purge(state: State, /, yes: bool, **options: Any) -> None:
    """Delete finished jobs (succeeded, failed, revoked) matching the filters."""
    app = state.app()
    filters = query_filters(**options)
    filters["status"] = [s for s in filters["status"] or TERMINAL if s in TERMINAL]
    if not filters["status"]:
        raise click.UsageError("only finished jobs (succeeded, failed, revoked) can be purged")
    count = _checked(lambda: app.jobs.count(**filters))
    if count == 0:
        click.echo("no job matches")
        return
    if not yes:
        click.confirm(f"Delete {count} finished job(s)?", abort=True)
    click.echo(f"deleted {_checked(lambda: app.jobs.purge(**filters))} job(s)")


@jobs.command("stats")
@app_option
@click.option(
    "--since", default="1h", show_default=True, help="Window for throughput and run times."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def jobs_stats(state: State, since: str, as_json: bool) -> None:
    """Jobs per task and status, jobs finished per minute, and run time p50/p95 per task."""
    stats = _checked(lambda: state.app().jobs.stats(since))
    if as_json:
        data = {
            "counts": [{"task": t, "status": s, "jobs": n} for (t, s), n in stats.counts.items()],
            "per_minute": [
                {"minute": m.isoformat(), "finished": n, "failed": f}
                for m, n, f in stats.per_minute
            ],
            "runtimes": {
                task: {"p50": p50, "p95": p95, "samples": n}
                for task, (p50, p95, n) in stats.runtimes.items()
            },
        }
        click.echo(json.dumps(data))
        return
    tasks = sorted({task for task, _ in stats.counts})
    columns = [s for s in ALL_STATUSES if any((t, s) in stats.counts for t in tasks)]
    table = [("TASK", *(c.upper() for c in columns), "P50", "P95")]
    for task in tasks:
        p50, p95, _ = stats.runtimes.get(task, (None, None, 0))
        table.append(
            (
                task,
                *(str(stats.counts.get((task, c), 0)) for c in columns),
                _seconds(p50),
                _seconds(p95),
            )
        )
    _print_table(table)
    if stats.per_minute:
        click.echo(f"\nfinished per minute (since {since} ago):")
        for minute, finished, failed in stats.per_minute[-30:]:
            click.echo(f"  {minute:%H:%M}  {finished:>6}  ({failed} failed)")


@cli.command()
@app_option
@click.option("--older-than", required=True, help="Age of jobs to delete: 30d, 12h, 2w.")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(sorted(s.value for s in TERMINAL)),
    help="Only finished jobs in this status (repeatable) [default: every finished status].",
)
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.pass_obj
def prune(state: State, older_than: str, statuses: tuple[str, ...], batch_size: int) -> None:
    """Delete finished jobs older than --older-than, a batch per transaction, so no
    lock is held for long (retention). Unfinished jobs are never deleted."""
    age = _checked(lambda: parse_duration(older_than))
    deleted = state.app().jobs.prune(age, status=list(statuses) or None, batch_size=batch_size)
    cutoff = dt.datetime.now(dt.timezone.utc) - age
    click.echo(f"deleted {deleted} job(s) created before {cutoff:%Y-%m-%d %H:%M:%S}Z")


def _print_table(table: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _as_dict(row: Job) -> dict[str, Any]:
    return dataclasses.asdict(row)


def _limit(max_attempts: int) -> str:
    return "∞" if max_attempts >= 2**31 - 1 else str(max_attempts)
