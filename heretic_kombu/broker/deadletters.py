"""Reading and replaying a queue's dead letters (``heretic dead list|show|replay``).

Dead letters sit in ``<queue>.dead`` (see :mod:`.core`). Reading them takes each
message without acknowledging it and then closes the connection, which returns every
message to the queue untouched: listing changes nothing. Replaying takes the chosen
messages, hands each to the caller (who republishes the job), and acks it only after
that succeeded, so a failed replay leaves the message where it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .core import DEAD_REASON_HEADER, Broker, dead_queue_name


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One message in a dead-letter queue."""

    position: int  # 1-based, in queue order at the time it was read
    queue: str  # the work queue it was dead-lettered from
    task_id: str | None
    task: str | None
    reason: str | None
    content_type: str | None
    headers: dict[str, Any]
    body: bytes | str | None

    @property
    def body_text(self) -> str:
        """The body as text (bytes that are not UTF-8 shown with escapes)."""
        if self.body is None:
            return ""
        if isinstance(self.body, bytes):
            return self.body.decode("utf-8", errors="backslashreplace")
        return self.body


class DeadLetters:
    """The dead-letter queue of one work queue."""

    def __init__(self, broker: Broker, queue: str) -> None:
        self.broker = broker
        self.queue = queue

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """The first ``limit`` dead letters, left in the queue."""
        found: list[DeadLetter] = []
        with self.broker.connection() as connection:
            channel = connection.channel()
            self.broker.declare(channel, self.queue)
            dead = self.broker.dead_queue(self.queue)(channel)
            while len(found) < limit:
                message = dead.get(no_ack=False)  # never decoded: the raw body is shown
                if message is None:
                    break
                found.append(self._describe(len(found) + 1, message))
            # Closing without acking returns every message taken, in order.
            channel.close()
        return found

    def replay(
        self, select: Callable[[DeadLetter], bool], send: Callable[[DeadLetter], None]
    ) -> int:
        """For each dead letter that ``select`` picks, call ``send`` (which republishes
        the job) and then ack it; the others stay. Returns how many were replayed."""
        replayed = 0
        with self.broker.connection() as connection:
            channel = connection.channel()
            self.broker.declare(channel, self.queue)
            dead = self.broker.dead_queue(self.queue)(channel)
            position = 0
            while True:
                message = dead.get(no_ack=False)
                if message is None:
                    break
                position += 1
                letter = self._describe(position, message)
                if select(letter):
                    send(letter)
                    message.ack()
                    replayed += 1
            channel.close()  # returns the messages not replayed
        return replayed

    def _describe(self, position: int, message: Any) -> DeadLetter:
        headers = dict(message.headers or {})
        reason = headers.get(DEAD_REASON_HEADER)
        if reason is None and headers.get("x-death"):  # dead-lettered by RabbitMQ
            death = headers["x-death"][0]
            reason = f"rejected by a worker ({death.get('reason', 'rejected')})"
        task_id = headers.get("id")
        task = headers.get("task")
        return DeadLetter(
            position=position,
            queue=self.queue,
            task_id=task_id if isinstance(task_id, str) else None,
            task=task if isinstance(task, str) else None,
            reason=reason if isinstance(reason, str) else None,
            content_type=message.content_type,
            headers=headers,
            body=message.body,
        )


__all__ = ["DeadLetter", "DeadLetters", "dead_queue_name"]
