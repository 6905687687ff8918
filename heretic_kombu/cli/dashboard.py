"""``heretic dashboard``: serve the web dashboard and ``/metrics`` (like Flower's port 5555).

Bound to 127.0.0.1 by default. Any other address needs ``--token`` or ``--basic-auth``:
without them the command exits 2 and says so, before anything listens. Needs the
``dashboard`` extra; without it the command exits 1 naming the pip command.
"""

from __future__ import annotations

import logging

import click

from ..dashboard.security import Access, BindRefused, parse_basic_auth
from .main import EXIT_ERROR, State, app_option, cli

EXIT_USAGE = 2


@cli.command()
@app_option
@click.option(
    "--host",
    default="127.0.0.1",
    envvar="HERETIC_DASHBOARD_HOST",
    show_envvar=True,
    show_default=True,
    help="Address to listen on; a non-loopback one needs --token or --basic-auth.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=5555,
    envvar="HERETIC_DASHBOARD_PORT",
    show_envvar=True,
    show_default=True,
)
@click.option(
    "--token",
    envvar="HERETIC_DASHBOARD_TOKEN",
    show_envvar=True,
    help="Require this token (as 'Authorization: Bearer TOKEN' or through the login "
    "page). Prefer the environment variable: a command line is visible to other users.",
)
@click.option(
    "--basic-auth",
    metavar="USER:PASSWORD",
    envvar="HERETIC_DASHBOARD_BASIC_AUTH",
    show_envvar=True,
    help="Require HTTP basic authentication with these credentials.",
)
@click.option(
    "-l",
    "--loglevel",
    default="info",
    envvar="HERETIC_DASHBOARD_LOGLEVEL",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
    show_default=True,
)
@click.pass_context
def dashboard(
    ctx: click.Context,
    host: str,
    port: int,
    token: str | None,
    basic_auth: str | None,
    loglevel: str,
) -> None:
    """Serve the web dashboard: overview, job search and detail, dead letters, the
    retry / cancel / replay actions, and Prometheus metrics at /metrics."""
    try:
        access = Access(token=token, basic_auth=parse_basic_auth(basic_auth))
        access.check_bind(host)
    except (BindRefused, ValueError) as exc:
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(EXIT_USAGE)
    from ..dashboard import INSTALL_HINT

    try:
        import uvicorn

        from ..dashboard.app import create_app
    except ImportError as exc:
        click.echo(
            f"Error: the dashboard needs its extra: {INSTALL_HINT} (missing: {exc.name})",
            err=True,
        )
        ctx.exit(EXIT_ERROR)
    state = ctx.ensure_object(State)
    asgi = create_app(state.app(), access)
    logging.basicConfig(level=loglevel.upper(), format="[%(asctime)s: %(levelname)s] %(message)s")
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"heretic dashboard on http://{shown}:{port}/", err=True)
    uvicorn.run(
        asgi,
        host=host,
        port=port,
        log_level=loglevel.lower(),
        server_header=False,
        proxy_headers=False,
    )
