"""``heretic dead``: the dead-letter queues — messages no worker could ever handle."""

from __future__ import annotations

import json

import click

from .main import EXIT_NOT_FOUND, State, app_option, cli


@cli.group()
def dead() -> None:
    """Dead letters: list them, look at one, send them back to work."""


@dead.command("list")
@app_option
@click.option("-Q", "--queue", help="The work queue [default: the default queue].")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def dead_list(state: State, queue: str | None, limit: int, as_json: bool) -> None:
    """The dead letters of a queue, oldest first (they stay in the queue)."""
    letters = state.app().jobs.dead_letters(queue, limit)
    for letter in letters:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "position": letter.position,
                        "queue": letter.queue,
                        "task_id": letter.task_id,
                        "task": letter.task,
                        "reason": letter.reason,
                        "content_type": letter.content_type,
                    }
                )
            )
        else:
            click.echo(
                f"#{letter.position}  {letter.task or '?'}  {letter.task_id or '-'}"
                f"  {letter.reason or ''}"
            )
    if not letters and not as_json:
        click.echo("no dead letters")


@dead.command("show")
@app_option
@click.argument("which")
@click.option("-Q", "--queue", help="The work queue [default: the default queue].")
@click.pass_obj
def dead_show(state: State, which: str, queue: str | None) -> None:
    """One dead letter, by position (as listed) or task id: headers and raw body."""
    for letter in state.app().jobs.dead_letters(queue, 10_000):
        if which in (str(letter.position), letter.task_id):
            click.echo(f"position: {letter.position}")
            click.echo(f"queue: {letter.queue}")
            click.echo(f"reason: {letter.reason}")
            click.echo(f"content type: {letter.content_type}")
            click.echo("headers: " + json.dumps(letter.headers, default=str, sort_keys=True))
            click.echo("body: " + letter.body_text)
            return
    click.echo(f"no dead letter {which}", err=True)
    raise SystemExit(EXIT_NOT_FOUND)


@dead.command("replay")
@app_option
@click.argument("which", nargs=-1)
@click.option("-Q", "--queue", help="The work queue [default: the default queue].")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def dead_replay(
    state: State, which: tuple[str, ...], queue: str | None, replay_all: bool, yes: bool
) -> None:
    """Send dead letters (by position or task id, or --all) back to work, e.g. after
    deploying the task they named. Their jobs run again, logged in attempt_logs."""
    if not which and not replay_all:
        raise click.UsageError("name dead letters by position or task id, or use --all")
    app = state.app()
    if replay_all and not yes:
        count = len(app.jobs.dead_letters(queue, 10_000))
        click.confirm(f"Replay {count} dead letter(s)?", abort=True)
    positions = [int(w) for w in which if w.isdigit()]
    task_ids = [w for w in which if not w.isdigit()]
    replayed, refused = app.jobs.replay_dead(
        queue,
        task_ids=None if replay_all else task_ids,
        positions=None if replay_all else positions,
    )
    for reason in refused:
        click.echo(f"not replayed {reason}", err=True)
    click.echo(f"replayed {replayed} dead letter(s)")
