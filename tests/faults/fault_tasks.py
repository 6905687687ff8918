"""The task the fault scenarios run: it leaves a trace of every execution.

Each run appends its task id to the file named by ``HERETIC_FAULT_RUNS`` (one
``os.write`` of one short line on an ``O_APPEND`` descriptor, so lines from several
processes never interleave). Comparing that file with the rows' ``attempt_logs`` tells
how many times each job really ran, independently of what heretic recorded.

Only ``@shared_task``: workers start it with ``-A fault_tasks`` and get the default app,
configured from the ``HERETIC_*`` environment the test sets.
"""

from __future__ import annotations

import os
import time

from heretic_kombu import shared_task


@shared_task(bind=True, max_retries=50)
def record_run(self, number, pause=0.0):
    """Note this execution, hold the job ``pause`` seconds, return ``number``."""
    path = os.environ.get("HERETIC_FAULT_RUNS")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.request.id}\n".encode())
        finally:
            os.close(fd)
    time.sleep(pause)
    return number
