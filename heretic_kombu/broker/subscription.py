"""Consuming: a connection that receives deliveries, acks them and dead-letters them,
and reconnects by itself when the connection is lost."""

from __future__ import annotations

import collections
import logging
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

from kombu.connection import Connection
from kombu.messaging import Consumer
from kombu.transport.virtual import Transport as VirtualTransport

from ..exceptions import QueueMismatchError
from .topology import Delivery, Topology, release_quietly

logger = logging.getLogger("heretic_kombu.broker")


class Subscription:
    """A consuming connection: receives deliveries, acks them, dead-letters them.

    When the connection or its channel is lost (network cut, server restart, RabbitMQ
    closing it, a consumer_timeout), :meth:`drain` reopens it with backoff, declares the
    topology again and consumes again. The broker redelivers whatever was unacked on the
    lost connection; deliveries received before the loss are no longer *live*
    (:meth:`is_live`): acking or rejecting them is skipped, never an error.

    Not thread-safe: use it from the thread that created it.
    """

    #: Longest pause between two reconnection attempts, in seconds.
    max_backoff = 5.0

    def __init__(
        self,
        broker: Topology,
        queues: list[str],
        on_delivery: Callable[[Delivery], None],
        prefetch: int,
        publish_dead: Callable[[Delivery, str], None],
    ) -> None:
        self.broker = broker
        #: Copies a delivery to its dead-letter queue, on transports that do not.
        self._publish_dead = publish_dead
        self.queues = queues
        self._on_delivery = on_delivery
        self._prefetch = prefetch
        self._shared_qos = False
        self._connection: Connection | None = None
        self._consumers: list[Consumer] = []
        #: Bumped at every (re)connection; a delivery carries the one it arrived on.
        self.generation = 0
        #: How many times the connection was lost and opened again.
        self.reconnects = 0
        self._backoff = 0.0
        self._next_attempt = 0.0
        #: RabbitMQ numbers a channel's deliveries 1, 2, 3…, and ``basic.ack`` with
        #: ``multiple`` acks every one up to a number (see :meth:`ack_many`). To know how
        #: far that may go: the delivery tags not settled yet (acked or rejected) in
        #: arrival order, and the tags settled while an older one was not.
        self._ack_multiple = False
        self._unsettled: collections.deque[int] = collections.deque()
        self._settled: set[int] = set()
        self._open(wait=True)

    @property
    def connected(self) -> bool:
        """True while the consuming connection is open."""
        return self._connection is not None

    def _open(self, wait: bool = False) -> None:
        """Connect, declare the queues, set the prefetch and consume.

        With ``wait`` (at start), retry until the broker answers; otherwise one attempt,
        and the caller decides when to try again.
        """
        connection = self.broker.connect()
        try:
            connection.ensure_connection(
                max_retries=None if wait else 1,
                interval_start=0.2,
                interval_step=0.5,
                interval_max=self.max_backoff,
                errback=self._log_reconnect,
            )
            channel = connection.default_channel
            for name in self.queues:
                self.broker.declare(channel, name)
            is_virtual = isinstance(connection.transport, VirtualTransport)
            # RabbitMQ's "global" prefetch is one limit for the channel's consumers of all
            # queues; quorum queues refuse it (540), so there it is per consumer.
            self._shared_qos = not is_virtual and self.broker.queue_type != "quorum"
            # Positional: py-amqp and kombu's virtual channels name the third argument
            # differently.
            channel.basic_qos(0, self._prefetch, self._shared_qos)
            # kombu's virtual transports (embedded, Redis) ignore ``multiple``.
            self._ack_multiple = not is_virtual
            self._unsettled.clear()  # the tags of a new channel start at 1 again
            self._settled.clear()
            consumers = [
                Consumer(
                    channel,
                    [self.broker.queue(name)],
                    no_ack=False,
                    on_message=self._callback(name, self.generation + 1),
                    auto_declare=False,
                )
                for name in self.queues
            ]
            for consumer in consumers:
                consumer.consume()
        except BaseException as exc:
            release_quietly(connection)
            refusal = self.broker.refusal(exc)
            if refusal is not None:
                raise refusal from exc
            raise
        self._consumers = consumers
        self._connection = connection
        self.generation += 1

    def set_prefetch(self, count: int) -> None:
        """Change how many unacked messages the broker may send (kept across reconnects)."""
        self._prefetch = count
        if self._connection is None:
            return  # the reconnection sets it
        lost: tuple[type[BaseException], ...] = (OSError, *self._recoverable_errors())
        try:
            self._connection.default_channel.basic_qos(0, count, self._shared_qos)
        except lost as exc:  # the next drain reconnects, with this prefetch
            logger.warning("broker connection lost (%r); reconnecting", exc)
            self._discard_connection()

    @staticmethod
    def _log_reconnect(exc: Exception, interval: float) -> None:
        logger.warning("broker unreachable (%r); retrying in %.1fs", exc, interval)

    def _callback(self, queue: str, generation: int) -> Callable[[Any], None]:
        def on_message(message: Any) -> None:
            info = message.delivery_info or {}
            if self._ack_multiple:
                self._unsettled.append(message.delivery_tag)
            self._on_delivery(
                Delivery(
                    queue=queue,
                    body=message.body,
                    content_type=message.content_type,
                    headers=dict(message.headers or {}),
                    priority=(message.properties or {}).get("priority"),
                    redelivered=bool(info.get("redelivered")),
                    _message=message,
                    _generation=generation,
                )
            )

        return on_message

    def drain(self, timeout: float, wake: int | None = None) -> None:
        """Wait up to ``timeout`` seconds for deliveries and hand them all to the
        callback: the first one waited for, then every one already received (up to the
        prefetch count), so that the worker can claim them in one statement.

        ``wake``, a file descriptor (a pipe's read end), ends the wait early when it
        becomes readable, where the transport allows it (:attr:`can_wake`): the worker's
        pool writes to it when a job ends. The caller empties it.

        A lost connection (or channel) is reopened with backoff, the topology declared
        again and consuming resumed. While the broker cannot be reached, this returns
        after ``timeout`` so the caller can go on recording outcomes in the database.
        """
        if self._connection is None:
            self._reconnect(timeout)
            return
        lost: tuple[type[BaseException], ...] = (OSError, *self._recoverable_errors())
        try:
            if wake is not None and not self._broker_readable(timeout, wake):
                return  # woken, or nothing came
            self._connection.drain_events(timeout=timeout)
            self._drain_ready()
        except TimeoutError:
            return
        except lost as exc:
            logger.warning("broker connection lost (%r); reconnecting", exc)
            self._discard_connection()
            self._backoff = 0.0
            self._next_attempt = 0.0
            self._reconnect(0.0)

    def _drain_ready(self) -> None:
        """Handle the deliveries already received, up to the prefetch count (one per
        ``drain_events`` call), without waiting. Asked not to wait, py-amqp sets the
        socket's timeout to 0 before each frame it reads and back after (a system call
        each, three frames a message); set to 0 here once for them all, it is left
        alone."""
        assert self._connection is not None
        sock = self._socket()
        previous = sock.gettimeout() if sock is not None else None
        if sock is not None:
            sock.settimeout(0)
        try:
            for _ in range(self._prefetch):
                self._connection.drain_events(timeout=0)
        finally:
            if sock is not None:
                sock.settimeout(previous)

    @property
    def can_wake(self) -> bool:
        """Whether :meth:`drain` can be woken through its ``wake`` descriptor: on a plain
        TCP connection to RabbitMQ (py-amqp), whose socket can be waited on alongside."""
        return self._socket() is not None

    def _socket(self) -> Any:
        """The py-amqp TCP socket of the connection, if there is one to wait on."""
        if self._connection is None or self._connection.transport_cls not in ("amqp", "pyamqp"):
            return None
        transport = getattr(self._connection.connection, "transport", None)
        if type(transport).__name__ != "TCPTransport":  # TLS may hold decrypted bytes
            return None
        return getattr(transport, "sock", None)

    def _broker_readable(self, timeout: float, wake: int) -> bool:
        """Wait until the broker's socket or ``wake`` is readable; ``True`` if the broker
        may have sent something (or cannot be waited on this way)."""
        sock = self._socket()
        if sock is None:
            return True
        if self._connection.connection.transport._read_buffer:  # type: ignore[union-attr]
            return True  # a frame already partly read: no need to wait
        readable, _, _ = select.select([sock, wake], [], [], timeout)
        return sock in readable

    def _recoverable_errors(self) -> tuple[type[BaseException], ...]:
        connection = self._connection
        if connection is None:
            return ()
        return tuple(connection.connection_errors) + tuple(connection.channel_errors)

    def _reconnect(self, timeout: float) -> None:
        now = time.monotonic()
        if now < self._next_attempt:
            time.sleep(max(0.0, min(timeout, self._next_attempt - now)))
            return
        try:
            self._open()
        except QueueMismatchError:
            raise  # a configuration error: no reconnection can fix it
        except Exception as exc:
            self._backoff = min(self.max_backoff, max(0.2, self._backoff * 2))
            self._next_attempt = time.monotonic() + self._backoff
            logger.warning("broker unreachable (%r); reconnecting in %.1fs", exc, self._backoff)
            return
        self._backoff = 0.0
        self.reconnects += 1
        logger.warning("broker connection restored; consuming %s again", ",".join(self.queues))

    def is_live(self, delivery: Delivery) -> bool:
        """True if ``delivery`` came on the current connection, so it can still be acked."""
        return self._connection is not None and delivery._generation == self.generation

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge a delivery; ``False`` if its connection is gone (it will come again)."""
        if not self.is_live(delivery):
            logger.info("ack skipped: the delivery's connection is gone; the broker redelivers")
            return False
        try:
            delivery._message.ack()
        except Exception as exc:
            logger.warning("ack failed (%r); the broker will redeliver the message", exc)
            return False
        self._settle(delivery)
        return True

    def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge several deliveries, as :meth:`ack` would each, in fewer frames.

        On RabbitMQ, one ``basic.ack`` with ``multiple`` acks every delivery of the
        channel up to a tag. It is sent for the highest tag of ``deliveries`` below which
        every delivery is either one of ``deliveries`` or already settled: so it acks
        exactly those, never a delivery still held (running, waiting, rate limited).
        The ones past the first gap (a delivery older than them is still held) are acked
        one by one. With the in-order completions of a busy worker, that is one frame
        for the whole batch instead of one per message.
        """
        live = {d._message.delivery_tag: d for d in deliveries if self.is_live(d)}
        if not self._ack_multiple or len(live) < 2:
            for delivery in deliveries:
                self.ack(delivery)
            return
        if len(live) < len(deliveries):
            logger.info("ack skipped: the delivery's connection is gone; the broker redelivers")
        last = None
        for tag in self._unsettled:  # oldest first
            if tag in live:
                last = tag
            elif tag not in self._settled:
                break  # still held: the multiple ack must stop below it
        if last is not None:
            try:
                live[last]._message.ack(multiple=True)
            except Exception as exc:
                logger.warning("ack failed (%r); the broker will redeliver the messages", exc)
                return
            for tag in [tag for tag in live if tag <= last]:
                self._settle(live.pop(tag))
        for delivery in live.values():
            self.ack(delivery)

    def _settle(self, delivery: Delivery) -> None:
        """Note that ``delivery`` was acked or rejected (for :meth:`ack_many`)."""
        if not self._ack_multiple:
            return
        unsettled, settled = self._unsettled, self._settled
        settled.add(delivery._message.delivery_tag)
        while unsettled and unsettled[0] in settled:
            settled.discard(unsettled.popleft())

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a delivery that can never be handled to its queue's dead-letter queue.

        A delivery whose connection is gone is left alone: the broker delivers it again,
        and it is dead-lettered then.
        """
        if not self.is_live(delivery):
            logger.info("dead-lettering skipped: the delivery's connection is gone")
            return
        if self.broker.dead_letters_natively:
            try:
                delivery._message.reject(requeue=False)
            except Exception as exc:
                logger.warning("reject failed (%r); the broker will redeliver the message", exc)
            else:
                self._settle(delivery)
            return
        # The transport would just drop a rejected message: keep a copy first.
        self._publish_dead(delivery, reason)
        self.ack(delivery)

    def cancel(self) -> None:
        """Stop receiving new deliveries; unacked ones stay with this connection."""
        for consumer in self._consumers:
            try:
                consumer.cancel()
            except Exception:
                logger.debug("cancelling a consumer failed", exc_info=True)

    def close(self) -> None:
        """Close the connection; the broker redelivers whatever was not acked."""
        self._discard_connection()

    def _discard_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._consumers = []
        if connection is not None:
            release_quietly(connection)


__all__ = ["Subscription"]
