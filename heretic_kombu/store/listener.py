"""Waiting for jobs to end (PostgreSQL): a connection of its own that LISTENs.

A worker's record of finished attempts notifies ``heretic_done`` with the ids of the
jobs that ended, delivered with its commit. ``AsyncResult.get()`` waits on a
:class:`DoneListener` instead of polling, and reads the row on the same connection.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from .rows import Job, jobs_from_cursor
from .statements import LISTEN_DONE


class DoneListener:
    """A connection of its own that LISTENs on ``heretic_done`` (PostgreSQL).

    ``get_sql`` is the driver SQL that reads a job by task id (``%(task_id)s``), and
    ``fallback`` reads it through the pool when this connection cannot.
    """

    def __init__(self, engine: Engine, get_sql: str, fallback: Callable[[str], Job | None]) -> None:
        self.pid = os.getpid()
        self._fallback = fallback
        self._get_sql = get_sql
        self._raw = engine.raw_connection()
        connection: Any = self._raw.driver_connection
        connection.autocommit = True
        self._conn = connection
        with self._conn.cursor() as cursor:
            cursor.execute(LISTEN_DONE)

    @property
    def closed(self) -> bool:
        return bool(self._conn.closed)

    def get(self, task_id: str) -> Job | None:
        """:meth:`JobStore.get`, read on this connection: already checked out and in
        autocommit, it saves ``.get()`` the pool's checkout and check-in on each read,
        the last of which is on the path from the job's end to the caller. A
        notification that comes in meanwhile stays in the connection's list, where
        :meth:`wait` finds it. On an error the pool's connections read instead."""
        if not self.closed:
            try:
                with self._conn.cursor() as cursor:
                    cursor.execute(self._get_sql, {"task_id": task_id})
                    found = jobs_from_cursor(cursor)
                return found[0] if found else None
            except Exception:
                if self.closed:  # lost: the next listen() opens another
                    self._raw.invalidate()
        return self._fallback(task_id)

    def wait(self, task_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` s for ``task_id`` to be announced as ended; ``True`` if
        it was. Other announcements are dropped (their waiters listen themselves)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._conn.poll()
            except Exception:  # a broken connection: the caller falls back to polling
                self._raw.invalidate()
                return False
            found = any(task_id in n.payload.split(",") for n in self._conn.notifies)
            self._conn.notifies.clear()
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return found
            select.select([self._conn], [], [], remaining)
