"""``heretic worker``: run a worker, with Celery's options."""

from __future__ import annotations

import logging

import click

from ..beat import Beat, run_beside_worker
from ..config import POOLS
from ..worker import Worker
from .main import State, app_option, cli

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"


@cli.command()
@app_option
@click.option(
    "-Q",
    "--queues",
    envvar="HERETIC_QUEUES",
    show_envvar=True,
    help="Comma-separated queues to consume [default: the default queue].",
)
@click.option(
    "-c",
    "--concurrency",
    type=int,
    envvar="HERETIC_CONCURRENCY",
    show_envvar=True,
    help="Pool slots [default: number of CPUs].",
)
@click.option(
    "-P",
    "--pool",
    type=click.Choice(POOLS),
    envvar="HERETIC_POOL",
    show_envvar=True,
    help="prefork (processes), threads, or solo [default: prefork].",
)
@click.option(
    "-l",
    "--loglevel",
    default="info",
    envvar="HERETIC_LOGLEVEL",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
    show_default=True,
)
@click.option(
    "--prefetch-multiplier",
    type=click.IntRange(min=1),
    envvar="HERETIC_PREFETCH_MULTIPLIER",
    show_envvar=True,
    help="Messages reserved per slot [default: 4].",
)
@click.option(
    "-n",
    "--hostname",
    "name",
    envvar="HERETIC_WORKER_NAME",
    show_envvar=True,
    help="Worker name, with %h/%n/%d placeholders [default: heretic@<host>].",
)
@click.option(
    "-B",
    "--beat",
    "embed_beat",
    is_flag=True,
    envvar="HERETIC_WORKER_BEAT",
    show_envvar=True,
    help="Also send the periodic tasks of beat_schedule, from a thread (as heretic beat).",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=0),
    envvar="HERETIC_WORKER_MAX_TASKS_PER_CHILD",
    show_envvar=True,
    help="Replace a prefork process after this many tasks [default: never]"
    " (Celery's worker_max_tasks_per_child; threads and solo: no effect).",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=0),
    envvar="HERETIC_WORKER_MAX_MEMORY_PER_CHILD",
    show_envvar=True,
    help="Replace a prefork process whose resident memory exceeds this many KiB, after"
    " the task that went over ends [default: no limit] (Celery's"
    " worker_max_memory_per_child; threads and solo: no effect).",
)
@click.option(
    "-O",
    "optimization",
    type=click.Choice(["default", "fair"]),
    help="Accepted for Celery's command lines and changes nothing: a busy prefork process"
    " is sent one job ahead only while its own job is short, and loses it to an idle"
    " process after 0.1 s.",
)
@click.pass_obj
def worker(
    state: State,
    queues: str | None,
    concurrency: int | None,
    pool: str | None,
    loglevel: str,
    prefetch_multiplier: int | None,
    name: str | None,
    embed_beat: bool,
    max_tasks_per_child: int | None,
    max_memory_per_child: int | None,
    optimization: str | None,
) -> None:
    """Consume queues and run their jobs until SIGTERM/SIGINT.

    The first SIGTERM or SIGINT stops consuming, lets running jobs finish and exits 0
    (also while it waits for the broker or the database); a second one, or SIGQUIT,
    exits at once (status 1) and the broker redelivers what was not acked.
    """
    logging.basicConfig(level=loglevel.upper(), format=LOG_FORMAT)
    if optimization is not None:
        logging.getLogger("heretic_kombu.worker").info(
            "-O %s: accepted as Celery's, with no effect (see heretic worker --help)",
            optimization,
        )
    app = state.app()
    app.import_modules()
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    the_worker = Worker(
        app,
        queues=queue_list,
        concurrency=concurrency,
        pool=pool,
        prefetch_multiplier=prefetch_multiplier,
        name=name,
        max_tasks_per_child=max_tasks_per_child,
        max_memory_per_child=max_memory_per_child,
    )
    if embed_beat:
        run_beside_worker(Beat(app), the_worker)
    raise SystemExit(the_worker.run())
