"""``heretic db``: create the job table, or print its DDL."""

from __future__ import annotations

import click

from ..config import redact_url
from ..store import render_postgresql_ddl
from .main import State, app_option, cli


@cli.group()
def db() -> None:
    """The job table."""


@db.command("init")
@app_option
@click.pass_obj
def db_init(state: State) -> None:
    """Create the heretic_jobs table, indexes and trigger if missing (idempotent)."""
    app = state.app()
    created = app.store.create_schema()
    where = redact_url(app.settings.database_url)
    click.echo(f"{'created' if created else 'already present'}: heretic_jobs in {where}")


@db.command("sql")
def db_sql() -> None:
    """Print the PostgreSQL DDL (for teams that run their own migrations)."""
    click.echo(render_postgresql_ddl(), nl=False)
