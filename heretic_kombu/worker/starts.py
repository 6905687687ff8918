"""Start marks: which claimed jobs have started running in a pool process.

A worker claims more jobs than it has slots (its prefetch); those waiting for a slot
have not run. If the worker dies, the attempts of those that never started are given
back (invariant 11), so the row must know which started: the pool reports each start,
and a thread of this worker writes them (``last_attempted_at``) in batches, off the
loop and off the slots' way — a start never waits for the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("heretic_kombu.worker")

Claims = list[tuple[str, int]]


class StartMarks:
    """Collects the starts the pool reports and writes them, batched, on a thread."""

    def __init__(self, write: Callable[[Claims], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._pending: Claims = []
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="heretic-starts", daemon=True)

    def started(self, call: dict[str, Any]) -> None:
        """The pool started ``call`` (or is about to: a call sent to an idle process)."""
        with self._lock:
            self._pending.append((str(call["id"]), int(call["retries"]) + 1))
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        pause = 0.0
        while True:
            self._wake.wait()
            if pause:  # the database failed last time: do not hammer it
                threading.Event().wait(pause)
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                try:
                    self._write(batch)
                    pause = 0.0
                except Exception as exc:  # kept for the next try
                    logger.warning("start marks not written (%r); trying again", exc)
                    with self._lock:
                        self._pending[:0] = batch
                    pause = min(max(0.2, pause * 2), 5.0)
                    self._wake.set()
            if self._stopped:
                return
