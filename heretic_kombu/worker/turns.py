"""A worker's turn: the one statement that records ended attempts and claims accepted
messages, and the thread it runs on while the loop goes on receiving.

One statement is in flight at a time (:class:`Turn`); what follows it (acks, starts) is
done by the worker's main thread once it has returned.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from .. import protocol
from ..broker import Delivery
from ..store import AttemptResult, Job
from .outcomes import Ending

_T = TypeVar("_T")

#: An attempt that ended here, its outcome not committed yet: the message to ack once
#: it is, the job, and how the attempt ended.
Ended: TypeAlias = tuple[Delivery, Job, Ending]
#: A message accepted for a claim, with its decoded message.
Accepted: TypeAlias = tuple[Delivery, protocol.TaskMessage]


@dataclasses.dataclass
class Turn:
    """A turn whose statement is in flight: the attempts it records (with their
    results) and the accepted messages it claims."""

    finished: list[Ended]
    batch: list[Accepted]
    results: list[AttemptResult]
    future: concurrent.futures.Future[Any]


class StatementThread:
    """Runs the worker's turn statements, one at a time, on a daemon thread of its own
    (a statement stuck waiting for the database must not keep a stopping process up)."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        if self._thread is None:  # started on first use: after the pool's fork
            self._thread = threading.Thread(target=self._run, name="heretic-turn", daemon=True)
            self._thread.start()
        self._calls.put((future, fn, args))
        return future

    @staticmethod
    def call_here(fn: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
        """Run ``fn`` on the calling thread; its outcome as a done future."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def stop(self) -> None:
        if self._thread is not None:
            self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
