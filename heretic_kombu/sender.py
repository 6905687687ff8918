"""The sender: publishes committed rows from a thread of its own, and marks them
``queued`` as the broker confirms them.

``.delay()`` writes the job's row and commits (from then on the job is accepted), then
hands its message to the process's :class:`Sender` and returns without waiting for the
broker. The sender's thread publishes what it was handed in bursts, on a connection
it alone uses (py-amqp connections are not thread-safe), and waits once per burst for
the broker's confirms. The rows confirmed are marked ``queued`` together, by one
UPDATE: when :data:`MARK_BATCH` of them are waiting, :data:`MARK_DELAY` seconds after
the first was confirmed (so a process that sends one job and idles, a web server,
still gets its row ``queued`` within a tenth of a second), and when the sender stops:
``app.close()`` and the interpreter's exit, so a script that sends and exits leaves no
row ``pending``.

A message the broker refuses (nack), does not confirm within ``confirm_timeout``, or
that cannot be published (broker down) leaves its row ``pending``, with a warning. So
does a process killed before its rows were marked. That is safe: a worker's reconciler
publishes rows left ``pending`` longer than ``pending_timeout`` (invariant 6); if the
first message did arrive, the job is delivered twice and the claim runs it once
(invariant 3).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import weakref

from .broker import Broker
from .broker.core import Outgoing
from .exceptions import BrokerError, MessageRefused, PublishError, QueueMismatchError
from .store import JobStore

logger = logging.getLogger("heretic_kombu")

#: Most rows marked ``queued`` by one UPDATE; a full batch is marked at once.
MARK_BATCH = 500
#: Longest a confirmed row waits for its batch to fill before it is marked, in seconds.
MARK_DELAY = 0.1
#: Most messages published before one wait for their confirms.
BURST = 1000
#: Most messages handed over and not yet published. Beyond it (the broker is down or
#: slower than the senders) a send is refused at once and its row stays ``pending``.
BACKLOG = 10_000


#: Publish errors that no later try can change: the row is failed with the error.
_FINAL = (QueueMismatchError, MessageRefused)


@dataclasses.dataclass
class _Item:
    task_id: str
    message: Outgoing
    #: Set when the message was confirmed or given up on, if the sender waits for it.
    done: threading.Event | None = None
    error: BrokerError | None = None


class Sender:
    """One process's sender for one app (see the module docstring)."""

    def __init__(self, broker: Broker, store: JobStore) -> None:
        self.broker = broker
        self.store = store
        self.pid = os.getpid()
        self._inbox: queue.Queue[_Item | None] = queue.Queue(BACKLOG)
        # Queues this sender has published to: only the first send to a queue waits.
        # Written by the thread, read by senders (a stale read makes one more wait).
        self._proven: set[str] = set()
        # Queues whose waited-for send is not answered yet, and queues whose waited-for
        # send was not confirmed (a broker in a memory alarm, unreachable): sends to
        # them do not wait, so a broker that holds one publish costs the callers one
        # confirm_timeout, not one each. A confirm to the queue ends both.
        self._probing: set[str] = set()
        self._unconfirmed: set[str] = set()
        self._closed = False
        # Held by the thread while it publishes or marks; see _pause.
        self._busy = threading.Lock()
        self._paused = False
        self._thread = threading.Thread(target=self._run, name="heretic-sender", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        _senders.add(self)

    def send(self, task_id: str, message: Outgoing) -> None:
        """Hand over the message of committed row ``task_id``; return before the broker
        confirms it.

        The first message to a queue is waited for (up to ``confirm_timeout``), so that
        a queue RabbitMQ holds with other arguments, or a broker that cannot be reached,
        is reported to the caller as a publish that waits would report it. While that
        wait is under way, or after it went unconfirmed, later sends to the queue do not
        wait: their rows stay ``pending`` until the broker takes them (or the reconciler
        publishes them).

        Raises:
            QueueMismatchError: the queue exists with other arguments; the row is failed.
            MessageRefused: the broker took others but not this message (e.g. over its
                size limit); the row is failed with the reason.
            PublishError: the message could not be handed over or, when waited for, was
                not confirmed; the row stays ``pending`` (and may still be marked
                ``queued`` if its confirm comes later).
        """
        if self._closed:
            raise PublishError("the sender is closed")
        target = message.queue
        wait = not ({target} & (self._proven | self._probing | self._unconfirmed))
        item = _Item(task_id, message, threading.Event() if wait else None)
        if wait:
            self._probing.add(target)
        try:
            self._inbox.put_nowait(item)
        except queue.Full:
            self._probing.discard(target)
            raise PublishError(f"{BACKLOG} messages wait for the broker already") from None
        if item.done is None:
            return
        if not item.done.wait(self.broker.confirm_timeout):
            self._unconfirmed.add(target)
            raise PublishError(f"not confirmed within {self.broker.confirm_timeout}s")
        if item.error is not None:
            raise item.error

    def close(self) -> None:
        """Publish what was handed over, mark what is confirmed, and stop the thread
        (waiting at most twice ``confirm_timeout``). Called by ``app.close()`` and at
        the interpreter's exit."""
        if self._closed or self.pid != os.getpid():
            return  # a forked child never touches its parent's thread
        self._closed = True
        atexit.unregister(self.close)
        patience = 2 * self.broker.confirm_timeout
        deadline = time.monotonic() + patience
        with contextlib.suppress(queue.Full):
            self._inbox.put(None, timeout=patience)  # after everything handed over so far
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.warning(
                "the sender did not finish in time: rows not yet confirmed stay pending"
                " (a worker's reconciler publishes them)"
            )

    def _pause(self) -> None:
        """Before a fork: let the thread finish what it is doing (up to
        ``confirm_timeout``) and start nothing more until :meth:`_resume`. A child
        must not inherit a lock taken mid-call (SQLite's, a connection pool's): it
        would wait for it for ever."""
        if self.pid == os.getpid() and self._thread.is_alive() and not self._paused:
            self._paused = self._busy.acquire(timeout=self.broker.confirm_timeout)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._busy.release()

    def _run(self) -> None:
        confirmed: list[str] = []  # task ids to mark queued
        mark_at = 0.0
        stopping = False
        while not stopping:
            burst = self._take(max(0.0, mark_at - time.monotonic()) if confirmed else None)
            if burst and burst[-1] is None:
                stopping = True
                burst.pop()
            items = [item for item in burst if item is not None]
            with self._busy:
                if items:
                    done = self._publish(items)
                    if done and not confirmed:
                        mark_at = time.monotonic() + MARK_DELAY
                    confirmed += done
                if confirmed and (
                    stopping or len(confirmed) >= MARK_BATCH or time.monotonic() >= mark_at
                ):
                    self._mark(confirmed)
                    confirmed = []
        with self._busy:
            self.broker.close_publisher()

    def _take(self, timeout: float | None) -> list[_Item | None]:
        """Wait up to ``timeout`` s (``None``: for ever) for a message, then take every
        one already waiting, up to a burst; the stop mark (``None``) ends a burst."""
        try:
            burst = [self._inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(burst) < BURST and burst[-1] is not None:
            try:
                burst.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return burst

    def _publish(self, items: list[_Item]) -> list[str]:
        """Publish a burst and wait for its confirms; returns the task ids confirmed."""
        try:
            errors = self.broker.publish_all([item.message for item in items])
        except Exception as exc:  # a bug: keep the thread alive, the rows stay pending
            logger.exception("the sender failed")
            errors = [PublishError(repr(exc))] * len(items)
        confirmed: list[str] = []
        for item, error in zip(items, errors, strict=True):
            item.error = error
            target = item.message.queue
            if item.done is not None:
                self._probing.discard(target)
            if error is None:
                confirmed.append(item.task_id)
                self._proven.add(target)
                self._unconfirmed.discard(target)
            elif not isinstance(error, _FINAL):
                # A mismatch is answered at once, so its senders keep waiting (and
                # raising it); anything else may hold every caller for a timeout.
                self._unconfirmed.add(target)
            if isinstance(error, _FINAL):
                # A message refused on its own (issue 15, item 3) is set aside like a
                # mismatch: failed with its reason; the batch's others went.
                self._fail(item.task_id, error)
                if item.done is None:  # a waiting sender raises it
                    logger.error("job %s failed: %s", item.task_id, error)
            elif error is not None and item.done is None:  # a waiting sender says it
                stays_pending(item.task_id, error)
            if item.done is not None:
                item.done.set()
        return confirmed

    def _fail(self, task_id: str, error: BrokerError) -> None:
        # No publish to that queue can succeed until someone fixes it.
        try:
            self.store.fail_unhandleable(task_id, str(error))
        except Exception as exc:
            logger.warning("job %s: could not record %s (%r)", task_id, error, exc)

    def _mark(self, task_ids: list[str]) -> None:
        # A second try goes through another connection (the pool drops one the server
        # closed, as in a restart); marking a row already queued changes nothing.
        for last_try in (False, True):
            try:
                self.store.mark_queued_many(task_ids)
                return
            except Exception as exc:
                if last_try:
                    logger.warning(
                        "%d confirmed job(s) not marked queued (%r): they stay pending,"
                        " and the reconciler publishes them again (the claim runs each"
                        " once)",
                        len(task_ids),
                        exc,
                    )


def stays_pending(task_id: str, error: BaseException) -> None:
    """Log a committed row whose message was not published or not confirmed. The row is
    the job: a worker's reconciler publishes rows left ``pending`` longer than
    ``pending_timeout``, so the job is not lost with its message."""
    logger.warning("job %s stays pending, to be published later: %s", task_id, error)


#: This process's senders, paused around a fork.
_senders: weakref.WeakSet[Sender] = weakref.WeakSet()


def _pause_senders() -> None:
    for sender in list(_senders):
        sender._pause()


def _resume_senders() -> None:
    for sender in list(_senders):
        sender._resume()


os.register_at_fork(before=_pause_senders, after_in_parent=_resume_senders)
