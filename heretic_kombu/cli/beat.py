"""``heretic beat``: send the periodic tasks of ``beat_schedule``, as ``celery beat`` does."""

from __future__ import annotations

import logging

import click

from ..beat import Beat
from .main import State, app_option, cli

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]


@cli.command()
@app_option
@click.option(
    "-l",
    "--loglevel",
    default="info",
    envvar="HERETIC_LOGLEVEL",
    show_envvar=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    show_default=True,
)
@click.option(
    "--max-interval",
    type=click.FloatRange(min=0, min_open=True),
    envvar="HERETIC_BEAT_MAX_INTERVAL",
    show_envvar=True,
    help="Longest sleep between two looks at the schedule, in seconds [default: 300].",
)
@click.option(
    "-s",
    "--schedule",
    "schedule_file",
    hidden=True,
    help="Accepted for Celery compatibility and ignored: the state lives in the database.",
)
@click.pass_obj
def beat(
    state: State, loglevel: str, max_interval: float | None, schedule_file: str | None
) -> None:
    """Send the app's beat_schedule entries when due, until SIGTERM/SIGINT.

    Run as many as you like: each due time is sent once, as one row of heretic_jobs.
    The entries' state is kept in the heretic_beat_entries table.
    """
    logging.basicConfig(level=loglevel.upper(), format=LOG_FORMAT)
    app = state.app()
    app.import_modules()
    raise SystemExit(Beat(app, max_interval=max_interval).run())
