"""A Celery-style project with a beat_schedule, for the beat tests.

Written as for Celery but for the import lines. The entries are named after
BEAT_TEST_PREFIX (each test's own, so tests sharing a database do not meet) and fire
every BEAT_TEST_EVERY seconds; BEAT_TEST_BAD=1 adds a malformed entry.
"""

from __future__ import annotations

import os
from datetime import timedelta

from heretic_kombu import Celery, shared_task

app = Celery("beat_project")

PREFIX = os.environ.get("BEAT_TEST_PREFIX", "beat")
EVERY = float(os.environ.get("BEAT_TEST_EVERY", "1"))


@shared_task
def beat_tick(entry, n=0):
    return {"entry": entry, "n": n}


class BeatConfig:
    beat_schedule = {
        f"{PREFIX}-every": {
            "task": "beat_project.beat_tick",
            "schedule": timedelta(seconds=EVERY),
            "args": (f"{PREFIX}-every",),
            "kwargs": {"n": 1},
            "options": {"expires": 60, "priority": 3},
        },
    }
    if os.environ.get("BEAT_TEST_BAD") == "1":
        beat_schedule[f"{PREFIX}-bad"] = {"task": "beat_project.beat_tick", "schedule": "often"}


app.config_from_object(BeatConfig)
