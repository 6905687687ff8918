"""``heretic``: Celery's command line with ``celery`` replaced, plus heretic's own groups.

Exit codes: 0 success; 1 error (bad configuration, unreachable service, worker failure);
2 usage error; 3 the requested job does not exist. -A may stand before or after the
command, as with Celery. Every option can be set with the HERETIC_* variable shown
in --help.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import click

from ..app import Heretic, current_app, find_app
from ..config import Settings, env_var
from ..exceptions import HereticKombuError

EXIT_ERROR = 1
EXIT_NOT_FOUND = 3


class State:
    """Shared CLI state: which app to load (resolved lazily, once)."""

    def __init__(self, app_name: str | None = None) -> None:
        self.app_name = app_name
        self._app: Heretic | None = None

    def app(self) -> Heretic:
        if self._app is None:
            self._app = find_app(self.app_name) if self.app_name else current_app()
        return self._app


def app_option(func: Any) -> Any:
    """``-A/--app`` on a subcommand, overriding the one given before the command."""

    def remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value:
            ctx.ensure_object(State).app_name = value

    return click.option(
        "-A",
        "--app",
        "app_name",
        envvar="HERETIC_APP",
        show_envvar=True,
        expose_value=False,
        callback=remember,
        is_eager=True,
        help="App module: module, module:attribute or package.",
    )(func)


class HereticGroup(click.Group):
    """Turns heretic errors into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HereticKombuError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)


def _epilog() -> str:
    exit_codes = (__doc__ or "").split("\n\n", 1)[1].replace("\n", " ")
    names = ", ".join(env_var(f.name) for f in dataclasses.fields(Settings))
    return f"{exit_codes}\n\nSettings from the environment: {names}."


@click.group(cls=HereticGroup, epilog=_epilog())
@click.option(
    "-A",
    "--app",
    "app_name",
    envvar="HERETIC_APP",
    show_envvar=True,
    help="App module: module, module:attribute or package.",
)
@click.version_option(package_name="heretic-kombu")
@click.pass_context
def cli(ctx: click.Context, app_name: str | None) -> None:
    """heretic_kombu: Celery-compatible background jobs, every job a row in SQL."""
    # Like celery: the current directory is importable, so `-A proj` finds ./proj.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    state = ctx.ensure_object(State)
    if app_name and not state.app_name:
        state.app_name = app_name


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="heretic")
