"""``heretic jobs``: read the job history from the table."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from .. import states
from ..store import Job
from .main import EXIT_NOT_FOUND, State, app_option, cli


@cli.group()
def jobs() -> None:
    """Job history, straight from the heretic_jobs table."""


@jobs.command("list")
@app_option
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(states.ALL_STATUSES),
    help="Only jobs in this status (repeatable).",
)
@click.option("--task", help="Only jobs of this task name.")
@click.option("--queue", help="Only jobs of this queue.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def jobs_list(
    state: State,
    statuses: tuple[str, ...],
    task: str | None,
    queue: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The newest jobs, newest first."""
    rows = state.app().store.list(statuses=statuses, task_name=task, queue_name=queue, limit=limit)
    if as_json:
        for row in rows:
            click.echo(json.dumps(_as_dict(row), default=str))
        return
    table = [("ID", "TASK ID", "TASK", "QUEUE", "STATUS", "TRIES", "CREATED", "ERROR")]
    for row in rows:
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
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip()
        )


@jobs.command("show")
@app_option
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="The row as one JSON object.")
@click.pass_obj
def jobs_show(state: State, task_id: str, as_json: bool) -> None:
    """One job: payload, result or error, and every attempt."""
    store = state.app().store
    try:
        row = store.get_by_id(int(task_id)) if task_id.isdigit() else store.get(task_id)
    except Exception:  # not a UUID: no such job, rather than a database error
        row = None
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


def _as_dict(row: Job) -> dict[str, Any]:
    return dataclasses.asdict(row)


def _limit(max_attempts: int) -> str:
    return "∞" if max_attempts >= 2**31 - 1 else str(max_attempts)
