"""Broker: kombu topology, confirmed publishing, consuming and dead letters.

Per queue ``q`` heretic declares a durable direct exchange ``q`` bound to a durable
queue ``q`` (Celery's own default topology, so Celery clients and workers interoperate),
whose ``x-dead-letter-exchange`` routes rejected messages to the durable queue
``q.dead``. On RabbitMQ, rejecting without requeue dead-letters a message; on transports
that ignore those arguments (the embedded default, Redis) heretic copies the message to
``q.dead`` itself before acking it, so the behaviour is the same everywhere.

Nothing outside this package touches kombu: the worker sees :class:`Delivery` objects
and calls :class:`Subscription` methods.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import kombu
from kombu.transport.virtual import Transport as VirtualTransport

from .. import protocol
from ..config import redact_url
from ..exceptions import BrokerError, PublishError, QueueMismatchError
from . import embedded

logger = logging.getLogger("heretic_kombu.broker")

DEAD_EXCHANGE = "heretic.dead"
DEAD_REASON_HEADER = "x-heretic-dead-reason"
_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 2}


def dead_queue_name(queue: str) -> str:
    """The dead-letter queue of ``queue``."""
    return f"{queue}.dead"


@dataclasses.dataclass
class Delivery:
    """A received message, as the worker sees it."""

    queue: str
    body: bytes | str | None
    content_type: str | None
    headers: dict[str, Any]
    priority: int | None
    redelivered: bool
    _message: Any = dataclasses.field(repr=False)


class Broker:
    """Connections, topology and publishing for one broker URL."""

    def __init__(
        self,
        url: str,
        *,
        transport_options: dict[str, Any] | None = None,
        confirm_timeout: float = 10.0,
        queue_max_priority: int | None = None,
    ) -> None:
        self.url = url
        self.transport_options = dict(transport_options or {})
        self.confirm_timeout = confirm_timeout
        self.queue_max_priority = queue_max_priority
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<Broker {redact_url(self.url)}>"

    # -- connections and topology -------------------------------------------

    def connect(self) -> kombu.Connection:
        """A new kombu connection (not yet connected) for this broker URL."""
        options = dict(self.transport_options)
        if self.url.startswith("sqlite:"):
            return kombu.Connection(
                self.url, transport=embedded.Transport, transport_options=options
            )
        if self.url.startswith(("amqp:", "amqps:", "pyamqp:")):
            options.setdefault("confirm_publish", True)
        return kombu.Connection(self.url, transport_options=options)

    @property
    def dead_letters_natively(self) -> bool:
        """True when the broker routes rejected messages to ``q.dead`` by itself."""
        return self.url.startswith(("amqp:", "amqps:", "pyamqp:"))

    def queue(self, name: str) -> kombu.Queue:
        """The work queue ``name`` with its dead-letter arguments."""
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": DEAD_EXCHANGE,
            "x-dead-letter-routing-key": dead_queue_name(name),
        }
        if self.queue_max_priority is not None:
            arguments["x-max-priority"] = self.queue_max_priority
        exchange = kombu.Exchange(name, type="direct", durable=True)
        return kombu.Queue(
            name, exchange, routing_key=name, durable=True, queue_arguments=arguments
        )

    def dead_queue(self, name: str) -> kombu.Queue:
        """The dead-letter queue of the work queue ``name``."""
        dead = dead_queue_name(name)
        exchange = kombu.Exchange(DEAD_EXCHANGE, type="direct", durable=True)
        return kombu.Queue(dead, exchange, routing_key=dead, durable=True)

    def declare(self, channel: Any, name: str) -> None:
        """Declare queue ``name`` and its dead-letter queue on ``channel``.

        Raises:
            QueueMismatchError: RabbitMQ holds the queue with other arguments.
        """
        for queue in (self.dead_queue(name), self.queue(name)):
            try:
                queue(channel).declare()
            except Exception as exc:
                if _is_precondition_failed(exc):
                    raise QueueMismatchError(_mismatch_message(queue, exc)) from exc
                raise

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
        self._publish(
            body, headers, queue, queue, properties.get("priority"), properties["correlation_id"]
        )

    def publish_dead(self, delivery: Delivery, reason: str) -> None:
        """Copy a delivery to its queue's dead-letter queue, with the reason in a header."""
        headers = dict(delivery.headers or {})
        headers[DEAD_REASON_HEADER] = reason
        body = delivery.body if delivery.body is not None else b""
        self._publish(
            body,
            headers,
            DEAD_EXCHANGE,
            dead_queue_name(delivery.queue),
            delivery.priority,
            None,
            declare_queue=delivery.queue,
            content_type=delivery.content_type or "application/octet-stream",
        )

    def _publish(
        self,
        body: bytes | str,
        headers: dict[str, Any],
        exchange: str,
        routing_key: str,
        priority: int | None,
        correlation_id: str | None,
        *,
        declare_queue: str | None = None,
        content_type: str = protocol.CONTENT_TYPE,
    ) -> None:
        try:
            producer = self._producer()
            self._declare_once(producer.channel, declare_queue or routing_key)
            producer.publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
                content_type=content_type,
                content_encoding="utf-8" if content_type == protocol.CONTENT_TYPE else "binary",
                delivery_mode=2,
                priority=priority,
                correlation_id=correlation_id,
                retry=True,
                retry_policy=_PUBLISH_RETRY,
                timeout=self.confirm_timeout,
            )
        except QueueMismatchError:
            self._reset_producer()
            raise
        except Exception as exc:
            self._reset_producer()
            raise PublishError(f"publish to {routing_key!r} not confirmed: {exc!r}") from exc

    def _producer(self) -> kombu.Producer:
        local = self._local
        if getattr(local, "pid", None) != os.getpid() or getattr(local, "producer", None) is None:
            connection = self.connect()
            local.pid, local.connection = os.getpid(), connection
            local.producer = kombu.Producer(connection.default_channel)
            local.declared = set()
        return local.producer  # type: ignore[no-any-return]

    def _declare_once(self, channel: Any, queue: str) -> None:
        if queue not in self._local.declared:
            self.declare(channel, queue)
            self._local.declared.add(queue)

    def _reset_producer(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.producer = None
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            try:
                connection.release()
            except Exception:  # the connection is already broken; nothing to save
                logger.debug("closing a broken producer connection failed", exc_info=True)

    def close(self) -> None:
        """Close this thread's producer connection."""
        self._reset_producer()

    # -- consuming -------------------------------------------------------------

    def subscribe(
        self, queues: Iterable[str], on_delivery: Callable[[Delivery], None], prefetch: int
    ) -> Subscription:
        """Start consuming ``queues``; ``on_delivery`` is called from :meth:`Subscription.drain`."""
        return Subscription(self, list(queues), on_delivery, prefetch)

    def queue_size(self, name: str) -> int:
        """Messages ready in queue ``name`` (declares it if missing)."""
        with self.connect() as connection:
            channel = connection.default_channel
            self.declare(channel, name)
            try:
                _, count, _ = self.queue(name)(channel).queue_declare(passive=True)
            except connection.channel_errors as exc:
                # Redis keeps no empty queues: a declared queue with nothing in it is "missing".
                if "NOT_FOUND" in str(exc):
                    return 0
                raise
            return int(count)


class Subscription:
    """A consuming connection: receives deliveries, acks them, dead-letters them.

    Not thread-safe: use it from the thread that created it.
    """

    def __init__(
        self,
        broker: Broker,
        queues: list[str],
        on_delivery: Callable[[Delivery], None],
        prefetch: int,
    ) -> None:
        self.broker = broker
        self.queues = queues
        self._on_delivery = on_delivery
        self._prefetch = prefetch
        self._connection: kombu.Connection | None = None
        self._consumers: list[kombu.Consumer] = []
        self._open()

    def _open(self) -> None:
        connection = self.broker.connect()
        connection.ensure_connection(
            max_retries=None,
            interval_start=0.2,
            interval_step=0.5,
            interval_max=5,
            callback=self._log_reconnect,
        )
        channel = connection.default_channel
        for name in self.queues:
            self.broker.declare(channel, name)
        is_virtual = isinstance(connection.transport, VirtualTransport)
        # Positional: py-amqp and kombu's virtual channels name the third argument differently.
        channel.basic_qos(0, self._prefetch, not is_virtual)
        self._consumers = [
            kombu.Consumer(
                channel,
                [self.broker.queue(name)],
                no_ack=False,
                on_message=self._callback(name),
                auto_declare=False,
            )
            for name in self.queues
        ]
        for consumer in self._consumers:
            consumer.consume()
        self._connection = connection

    @staticmethod
    def _log_reconnect(exc: Exception, interval: float) -> None:
        logger.warning("broker unreachable (%r); retrying in %.1fs", exc, interval)

    def _callback(self, queue: str) -> Callable[[Any], None]:
        def on_message(message: Any) -> None:
            info = message.delivery_info or {}
            self._on_delivery(
                Delivery(
                    queue=queue,
                    body=message.body,
                    content_type=message.content_type,
                    headers=dict(message.headers or {}),
                    priority=(message.properties or {}).get("priority"),
                    redelivered=bool(info.get("redelivered")),
                    _message=message,
                )
            )

        return on_message

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for deliveries and hand them to the callback.

        A lost connection is reopened (with backoff); deliveries received on the old
        one can no longer be acked, and the broker will deliver them again.
        """
        assert self._connection is not None
        try:
            self._connection.drain_events(timeout=timeout)
        except TimeoutError:
            return
        except self._connection.connection_errors as exc:
            logger.warning("broker connection lost (%r); reconnecting", exc)
            self._discard_connection()
            self._open()

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge a delivery; ``False`` if its connection is gone (it will come again)."""
        try:
            delivery._message.ack()
            return True
        except Exception as exc:
            logger.warning("ack failed (%r); the broker will redeliver the message", exc)
            return False

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a delivery that can never be handled to its queue's dead-letter queue."""
        if self.broker.dead_letters_natively:
            delivery._message.reject(requeue=False)
            return
        # The transport would just drop a rejected message: keep a copy first.
        self.broker.publish_dead(delivery, reason)
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
        if connection is not None:
            try:
                connection.release()
            except Exception:
                logger.debug("closing the consumer connection failed", exc_info=True)


def _is_precondition_failed(exc: BaseException) -> bool:
    return getattr(exc, "reply_code", None) == 406 or getattr(exc, "code", None) == 406


def _mismatch_message(queue: kombu.Queue, exc: BaseException) -> str:
    arguments = getattr(queue, "queue_arguments", None) or {}
    wanted = ", ".join(f"{k}={v}" for k, v in arguments.items()) or "none"
    return (
        f"RabbitMQ already has a queue named {queue.name!r} declared with different arguments"
        f" (406 PRECONDITION_FAILED: {exc}). heretic_kombu declares it durable with arguments:"
        f" {wanted}. Either point heretic at another queue name, or drain the queue and delete"
        f" it (`rabbitmqctl delete_queue {queue.name}`) so heretic can declare it again."
    )


__all__ = [
    "DEAD_EXCHANGE",
    "DEAD_REASON_HEADER",
    "Broker",
    "BrokerError",
    "Delivery",
    "Subscription",
    "dead_queue_name",
]
