"""Tasks for tests/integration/test_worker_lifecycle.py (shared tasks on the default app,
configured from the test's HERETIC_* environment)."""

from __future__ import annotations

import os
import time

from heretic_kombu import shared_task
from heretic_kombu.worker.pool import resident_kib

_LEAKED: list[bytearray] = []


@shared_task
def leak(megabytes):
    """Keep ``megabytes`` MB more in this process for good; return (pid, RSS in KiB)."""
    chunk = bytearray(megabytes * 1024 * 1024)
    chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page: resident, not just mapped
    _LEAKED.append(chunk)
    return [os.getpid(), resident_kib()]


@shared_task
def pid_of(number):
    return [number, os.getpid()]


@shared_task(bind=True, max_retries=0)
def runs_once(self, seconds, trace):
    """Append this run's task id to ``trace`` (a line per execution), hold ``seconds``."""
    fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{self.request.id}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return seconds
