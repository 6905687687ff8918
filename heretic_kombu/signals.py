"""Celery's signals, with Celery's names and keyword arguments.

``from celery.signals import task_success`` becomes
``from heretic_kombu.signals import task_success``; receivers connect the same way::

    @task_success.connect
    def on_success(sender=None, result=None, **kwargs): ...

    @task_failure.connect(sender=my_task)   # only for one task
    def on_failure(sender=None, exception=None, **kwargs): ...

Task signals fire where the task runs (the pool process, as in Celery); publish signals
where ``.delay()`` is called; worker signals in the worker. A receiver that raises is
logged and does not stop the others, nor the job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("heretic_kombu.signals")

Receiver = Callable[..., Any]


class Signal:
    """A named hook that receivers connect to, optionally for one sender only."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._receivers: list[tuple[Receiver, Any]] = []
        self._lock = threading.Lock()

    def connect(self, receiver: Receiver | None = None, *, sender: Any = None, **_: Any) -> Any:
        """Connect ``receiver`` (usable as ``@signal.connect`` or ``@signal.connect(sender=…)``)."""

        def register(func: Receiver) -> Receiver:
            with self._lock:
                if (func, sender) not in self._receivers:
                    self._receivers.append((func, sender))
            return func

        return register(receiver) if receiver is not None else register

    def disconnect(self, receiver: Receiver, sender: Any = None) -> None:
        """Disconnect ``receiver`` (for ``sender``, if it was connected for one)."""
        with self._lock:
            self._receivers = [
                (r, s) for r, s in self._receivers if not (r == receiver and s == sender)
            ]

    @property
    def receivers(self) -> list[Receiver]:
        return [receiver for receiver, _ in self._receivers]

    def send(self, sender: Any, **named: Any) -> list[tuple[Receiver, Any]]:
        """Call every matching receiver with ``sender=`` and ``named``; collect the answers."""
        responses = []
        with self._lock:
            receivers = list(self._receivers)
        for receiver, wanted in receivers:
            if wanted is not None and not _same_sender(wanted, sender):
                continue
            try:
                responses.append((receiver, receiver(signal=self, sender=sender, **named)))
            except Exception as exc:
                logger.exception("signal %s: receiver %r failed", self.name, receiver)
                responses.append((receiver, exc))
        return responses

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"


def _same_sender(wanted: Any, sender: Any) -> bool:
    if wanted is sender or wanted == sender:
        return True
    # Celery lets a task's name stand for the task, and the other way round.
    return bool(getattr(wanted, "name", wanted) == getattr(sender, "name", sender))


before_task_publish = Signal("before_task_publish")
after_task_publish = Signal("after_task_publish")
task_prerun = Signal("task_prerun")
task_postrun = Signal("task_postrun")
task_success = Signal("task_success")
task_failure = Signal("task_failure")
task_retry = Signal("task_retry")
task_revoked = Signal("task_revoked")
worker_ready = Signal("worker_ready")
worker_shutdown = Signal("worker_shutdown")
worker_process_init = Signal("worker_process_init")
