"""Tasks for the canvas cases (chain, group, chord, links) and task options, imported by
jobs_project."""

from __future__ import annotations

import os
import time
from pathlib import Path

from heretic_kombu import shared_task


@shared_task
def mul(x, y):
    return x * y


@shared_task
def tsum(values):
    return sum(values)


@shared_task
def collect(values, label=None):
    """A chord body that also leaves a trace of every run, to count them."""
    marker = os.environ.get("HERETIC_TEST_EVENTS")
    if marker:
        with open(Path(marker).with_name("chord-bodies.txt"), "a", encoding="utf-8") as out:
            out.write(f"{label}\n")
    return sorted(values)


@shared_task
def jittery(x):
    """Finish at slightly different times so header jobs race for the counter."""
    time.sleep((x % 5) * 0.01)
    return x


@shared_task(max_retries=0)
def explode(*args):
    raise ValueError(f"exploded with {list(args)}")


@shared_task
def errback_seen(task_id):
    return f"errback got {task_id}"


class OutOfStock(Exception):
    """An expected business error, declared in the task's ``throws``."""


@shared_task(throws=(OutOfStock,), max_retries=0)
def reserve(item):
    raise OutOfStock(f"no {item} left")


@shared_task(max_retries=0)
def needs_file(path):
    """Fails until ``path`` exists: an operator fixes the cause, then retries the job."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing")
    return "found"
