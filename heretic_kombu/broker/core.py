"""The broker: confirmed publishing and consuming for one broker URL.

:class:`Broker` is the :class:`~heretic_kombu.broker.topology.Topology` of one URL (its
connections and the queues it declares) plus publishing: each thread publishes on a
:class:`~heretic_kombu.broker.publisher.Publisher` of its own, writing a batch without
waiting and then reading the broker's confirms once (:meth:`Broker.publish_all`).
Consuming is a :class:`~heretic_kombu.broker.subscription.Subscription`.

Nothing outside this package touches kombu: the worker sees :class:`Delivery` objects
and calls :class:`Subscription` methods.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import protocol
from ..exceptions import BrokerError, MessageRefused, PublishError, QueueMismatchError
from .publisher import Publisher
from .subscription import Subscription
from .topology import (
    DEAD_EXCHANGE,
    DEAD_REASON_HEADER,
    Delivery,
    Outgoing,
    Topology,
    dead_queue_name,
)

logger = logging.getLogger("heretic_kombu.broker")


class Broker(Topology):
    """Connections, topology and publishing for one broker URL."""

    def __init__(self, url: str, **options: Any) -> None:
        """``options`` are :class:`Topology`'s (transport options, confirm timeout,
        queue priorities, type and delivery limit)."""
        super().__init__(url, **options)
        self._local = threading.local()
        # Every thread's publisher, so close() can release them all: a thread that ends
        # leaves its thread-local connection behind, with its socket open.
        self._publishers: set[Publisher] = set()
        self._connections_lock = threading.Lock()

    # -- publishing ------------------------------------------------------------

    def publish(self, message: protocol.TaskMessage, queue: str) -> None:
        """Publish ``message`` to ``queue`` and wait for the broker's confirm.

        Raises:
            PublishError: the message could not be published or was not confirmed.
            QueueMismatchError: the queue exists with other arguments.
        """
        self.publish_encoded(*protocol.encode(message), queue)

    def publish_encoded(
        self, body: str, headers: dict[str, Any], properties: dict[str, Any], queue: str
    ) -> None:
        """Publish what :func:`protocol.encode` produced (see :meth:`publish`)."""
        self._publish_one(self.task_message(body, headers, properties, queue))

    @staticmethod
    def task_message(
        body: str, headers: dict[str, Any], properties: dict[str, Any], queue: str
    ) -> Outgoing:
        """What :func:`protocol.encode` produced, addressed to the work queue ``queue``."""
        return Outgoing(
            body,
            headers,
            queue,
            queue,
            properties.get("priority"),
            properties["correlation_id"],
            queue,
        )

    def publish_dead(self, delivery: Delivery, reason: str) -> None:
        """Copy a delivery to its queue's dead-letter queue, with the reason in a header."""
        headers = dict(delivery.headers or {})
        headers[DEAD_REASON_HEADER] = reason
        body = delivery.body if delivery.body is not None else b""
        self._publish_one(
            Outgoing(
                body,
                headers,
                DEAD_EXCHANGE,
                dead_queue_name(delivery.queue),
                delivery.priority,
                None,
                delivery.queue,
                content_type=delivery.content_type or "application/octet-stream",
            )
        )

    def publish_copy(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        """Publish a copy of a received delivery, with ``headers``, to its own queue (a
        message handed on to another consumer); waits for the broker's confirm."""
        body = delivery.body if delivery.body is not None else b""
        self._publish_one(
            Outgoing(
                body,
                headers,
                delivery.queue,
                delivery.queue,
                delivery.priority,
                headers.get("id") if isinstance(headers.get("id"), str) else None,
                delivery.queue,
                content_type=delivery.content_type or protocol.CONTENT_TYPE,
            )
        )

    def _publish_one(self, message: Outgoing) -> None:
        error = self.publish_all([message])[0]
        if error is not None:
            raise error

    def publish_all(self, messages: Sequence[Outgoing]) -> list[BrokerError | None]:
        """Publish ``messages`` on this thread's connection without waiting in between,
        then wait once, up to ``confirm_timeout``, for the broker to confirm them.

        Returns one entry per message: ``None`` once the broker confirmed it (on the
        transports without confirms, the embedded one and Redis: once the publish
        returned), else why not: :class:`QueueMismatchError` if RabbitMQ holds its queue
        with other arguments, :class:`PublishError` if it could not be published, was
        refused (nack) or was not confirmed in time. A connection that worked before may
        have been closed since (by the server, a proxy): what failed on it is published
        once more on a new one. A message may then reach its queue twice, which the
        claim (invariant 3) makes harmless.
        """
        outcomes: list[BrokerError | None] = [None] * len(messages)
        todo = list(range(len(messages)))
        may_retry = True
        while todo:
            publisher, queue = None, None
            try:
                publisher = self._publisher()
                for queue in dict.fromkeys(messages[i].queue for i in todo):
                    publisher.declare(queue)
                answers = publisher.send([messages[i] for i in todo], self.confirm_timeout)
            except QueueMismatchError as exc:
                self.close_publisher()  # RabbitMQ closed the channel with its 406
                for i in todo:
                    if messages[i].queue == queue:
                        outcomes[i] = exc
                todo = [i for i in todo if outcomes[i] is None]
                continue
            except Exception as exc:
                worked = publisher is not None and publisher.worked
                lost = publisher is None or _connection_lost(exc, publisher)
                self.close_publisher(abrupt=True)
                if not lost:
                    # The broker is there but a message was refused (it cannot be
                    # encoded, or the broker closed the channel over it): publish them
                    # one by one, so that only that one is refused and the others go.
                    self._one_by_one(messages, todo, outcomes, exc)
                    break
                if worked and may_retry:
                    may_retry = False
                    continue
                for i in todo:
                    error = PublishError(f"publish to {messages[i].routing_key!r} failed: {exc!r}")
                    error.__cause__ = exc
                    outcomes[i] = error
                break
            for i, answer in zip(todo, answers, strict=True):
                if answer is False:
                    outcomes[i] = PublishError("the broker refused the message (nack)")
                elif answer is None:
                    outcomes[i] = PublishError(f"not confirmed within {self.confirm_timeout}s")
            if None in answers:
                # Its late answers would be taken for the next messages': start afresh.
                self.close_publisher(abrupt=True)
            break
        return outcomes

    def _one_by_one(
        self,
        messages: Sequence[Outgoing],
        todo: list[int],
        outcomes: list[BrokerError | None],
        exc: Exception,
    ) -> None:
        """After ``exc`` (not a lost connection) on a batch: each message of ``todo``
        alone; one that fails alone the same way is :class:`MessageRefused`."""
        if len(todo) == 1:
            (i,) = todo
            refused = MessageRefused(
                f"the broker cannot take the message to {messages[i].routing_key!r}: {exc!r}"
            )
            refused.__cause__ = exc
            outcomes[i] = refused
            return
        for i in todo:
            outcomes[i] = self.publish_all([messages[i]])[0]

    def _publisher(self) -> Publisher:
        """This thread's publisher, opened on first use (again after a fork)."""
        publisher: Publisher | None = getattr(self._local, "publisher", None)
        if publisher is None or publisher.pid != os.getpid():
            publisher = self._local.publisher = Publisher(self)
            with self._connections_lock:
                self._publishers.add(publisher)
        return publisher

    def close_publisher(self, abrupt: bool = False) -> None:
        """Close this thread's publishing connection (the next publish opens another)."""
        publisher: Publisher | None = getattr(self._local, "publisher", None)
        self._local.publisher = None
        if publisher is not None and publisher.pid == os.getpid():
            with self._connections_lock:
                self._publishers.discard(publisher)
            publisher.close(abrupt)

    def close(self) -> None:
        """Close the publishing connections this process opened, in every thread."""
        self.close_publisher()
        with self._connections_lock:
            mine = [p for p in self._publishers if p.pid == os.getpid()]
            self._publishers.clear()
        for publisher in mine:
            publisher.close()

    # -- consuming -------------------------------------------------------------

    def subscribe(
        self, queues: Iterable[str], on_delivery: Callable[[Delivery], None], prefetch: int
    ) -> Subscription:
        """Start consuming ``queues``; ``on_delivery`` is called from :meth:`Subscription.drain`."""
        return Subscription(self, list(queues), on_delivery, prefetch, self.publish_dead)

    def queue_size(self, name: str, dead: bool = False) -> int:
        """Messages ready in queue ``name``, or in its dead-letter queue with ``dead``
        (declares the pair if missing). Counting takes no message."""
        with self.connection() as connection:
            channel = connection.default_channel
            self.declare(channel, name)
            queue = self.dead_queue(name) if dead else self.queue(name)
            try:
                _, count, _ = queue(channel).queue_declare(passive=True)
            except connection.channel_errors as exc:
                # Redis keeps no empty queues: a declared queue with nothing in it is "missing".
                if "NOT_FOUND" in str(exc):
                    return 0
                raise
            return int(count)


__all__ = [
    "DEAD_EXCHANGE",
    "DEAD_REASON_HEADER",
    "Broker",
    "BrokerError",
    "Delivery",
    "Outgoing",
    "Subscription",
    "dead_queue_name",
]


def _connection_lost(exc: BaseException, publisher: Publisher) -> bool:
    """Whether ``exc`` says the connection to the broker broke (rather than that the
    broker, still there, refused what was sent)."""
    lost: tuple[type[BaseException], ...] = (
        OSError,
        TimeoutError,
        *publisher.connection.connection_errors,
    )
    return isinstance(exc, lost)
