"""A thread's publishing connection, with asynchronous publisher confirms.

A batch of messages is written to the channel without waiting, then the connection is
read once until the broker has confirmed (acked) or refused (nacked) each of them, or
the timeout passed. Each thread publishes on a connection of its own (py-amqp
connections are not thread-safe): :class:`~heretic_kombu.broker.core.Broker` keeps one
:class:`Publisher` per thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from kombu.messaging import Producer
from kombu.transport.virtual import Transport as VirtualTransport

from .. import protocol
from .topology import CONNECT_RETRY, Outgoing, Topology, release_quietly

logger = logging.getLogger("heretic_kombu.broker")


class Publisher:
    """One thread's publishing connection, its channel in confirm mode.

    RabbitMQ numbers the messages published on a channel in confirm mode 1, 2, 3… and
    acks (or nacks) them by number, often many at once (``multiple``); py-amqp hands
    those frames to the channel's ``basic_ack``/``basic_nack`` callbacks while the
    connection is read. The embedded transport and Redis have no confirms: a publish
    that returned is accepted.
    """

    def __init__(self, broker: Topology) -> None:
        self.broker = broker
        self.pid = os.getpid()
        self.connection = broker.connect()
        try:
            self.connection.ensure_connection(**CONNECT_RETRY)
            channel: Any = self.connection.default_channel
            self.confirms = not isinstance(self.connection.transport, VirtualTransport)
            if self.confirms:
                channel.confirm_select()
                channel.events["basic_ack"].add(self._on_ack)
                channel.events["basic_nack"].add(self._on_nack)
        except BaseException:
            release_quietly(self.connection)
            raise
        self.producer = Producer(channel)
        self.declared: set[str] = set()
        #: True once a send completed on this connection.
        self.worked = False
        self._published = 0  # messages published on the channel: the last delivery tag
        self._first = 1  # delivery tag of the current send's first message
        self._answers: list[bool | None] = []
        self._unanswered = 0
        self._low = 0  # every answer before this index is in

    def declare(self, queue: str) -> None:
        """Declare ``queue`` (and its dead-letter queue) once on this connection."""
        if queue not in self.declared:
            self.broker.declare(self.producer.channel, queue)
            self.declared.add(queue)

    def send(self, messages: Sequence[Outgoing], timeout: float) -> list[bool | None]:
        """Publish ``messages``, then read the connection until the broker answered for
        each or ``timeout`` seconds passed; per message ``True`` (acked), ``False``
        (nacked) or ``None`` (no answer in time)."""
        self._first, self._low = self._published + 1, 0
        self._answers = [None if self.confirms else True] * len(messages)
        self._unanswered = len(messages) if self.confirms else 0
        for message in messages:
            self.producer.publish(
                message.body,
                exchange=message.exchange,
                routing_key=message.routing_key,
                headers=message.headers,
                content_type=message.content_type,
                content_encoding=(
                    "utf-8" if message.content_type == protocol.CONTENT_TYPE else "binary"
                ),
                delivery_mode=2,
                priority=message.priority,
                correlation_id=message.correlation_id,
                timeout=timeout,  # a write to a stalled broker gives up too
            )
            self._published += 1
        deadline = time.monotonic() + timeout
        while self._unanswered:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self.connection.drain_events(timeout=remaining)
            except TimeoutError:
                break
        self.worked = True
        return self._answers

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._answer(delivery_tag, multiple, True)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._answer(delivery_tag, multiple, False)

    def _answer(self, delivery_tag: int, multiple: bool, ok: bool) -> None:
        last = delivery_tag - self._first  # index in the current send
        first = self._low if multiple else last
        for index in range(max(first, 0), min(last + 1, len(self._answers))):
            if self._answers[index] is None:
                self._answers[index] = ok
                self._unanswered -= 1
        if multiple:
            self._low = max(self._low, last + 1)

    def close(self, abrupt: bool = False) -> None:
        """Close the connection; ``abrupt`` drops the socket without the closing
        handshake (for a connection given up on, whose broker may not answer)."""
        if not abrupt:
            release_quietly(self.connection)
            return
        try:
            self.connection.collect()
        except Exception:
            logger.debug("dropping a broker connection failed", exc_info=True)


__all__ = ["Publisher"]
