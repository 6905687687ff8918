"""Broker: kombu topology, confirmed publishing, consuming and dead letters.

Per queue ``q`` heretic declares a durable direct exchange ``q`` bound to a durable
queue ``q`` (Celery's own default topology, so Celery clients and workers interoperate),
whose ``x-dead-letter-exchange`` routes rejected messages to the durable queue
``q.dead``. On RabbitMQ, rejecting without requeue dead-letters a message; on transports
that ignore those arguments (the embedded default, Redis) heretic copies the message to
``q.dead`` itself before acking it, so the behaviour is the same everywhere.

Publishing uses RabbitMQ's publisher confirms asynchronously: a batch of messages is
written to the channel without waiting, then the connection is read once until the
broker has confirmed (acked) or refused (nacked) each of them, or ``confirm_timeout``
passed (:meth:`Broker.publish_all`). Each thread publishes on a connection of its own
(py-amqp connections are not thread-safe).

Nothing outside this package touches kombu: the worker sees :class:`Delivery` objects
and calls :class:`Subscription` methods.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer, Producer
from kombu.transport.virtual import Transport as VirtualTransport

from .. import protocol
from ..config import redact_url
from ..exceptions import BrokerError, ConfigurationError, PublishError, QueueMismatchError
from . import embedded

logger = logging.getLogger("heretic_kombu.broker")

DEAD_EXCHANGE = "heretic.dead"
DEAD_REASON_HEADER = "x-heretic-dead-reason"
# How a publishing connection is opened: a few quick retries, then the publish fails and
# the row stays pending for the reconciler (about 2 s in all when the broker is down).
_CONNECT_RETRY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 2}


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
    #: The :attr:`Subscription.generation` of the connection it arrived on.
    _generation: int = dataclasses.field(default=0, repr=False)


@dataclasses.dataclass
class Outgoing:
    """A message ready to publish, and where to."""

    body: bytes | str
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    priority: int | None
    correlation_id: str | None
    #: The work queue declared (with its dead-letter queue) before the first publish to it.
    queue: str
    content_type: str = protocol.CONTENT_TYPE


class Broker:
    """Connections, topology and publishing for one broker URL."""

    def __init__(
        self,
        url: str,
        *,
        transport_options: dict[str, Any] | None = None,
        confirm_timeout: float = 10.0,
        queue_max_priority: int | None = None,
        queue_type: str = "classic",
        delivery_limit: int | None = None,
    ) -> None:
        if queue_type == "quorum" and queue_max_priority is not None:
            raise ConfigurationError(
                "quorum queues have no message priorities: unset queue_max_priority"
                " or use queue_type='classic'"
            )
        self.url = url
        self.transport_options = dict(transport_options or {})
        self.confirm_timeout = confirm_timeout
        self.queue_max_priority = queue_max_priority
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self._local = threading.local()
        # Every thread's publisher, so close() can release them all: a thread that ends
        # leaves its thread-local connection behind, with its socket open.
        self._publishers: set[_Publisher] = set()
        self._connections_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Broker {redact_url(self.url)}>"

    # -- connections and topology -------------------------------------------

    def connect(self) -> Connection:
        """A new kombu connection (not yet connected) for this broker URL."""
        options = dict(self.transport_options)
        if self.url.startswith("sqlite:"):
            return Connection(self.url, transport=embedded.Transport, transport_options=options)
        # Publishers put their channel in confirm mode themselves and read the confirms
        # when they choose (_Publisher); py-amqp's confirm_publish would wait for each.
        options.pop("confirm_publish", None)
        return Connection(self.url, transport_options=options)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection opened now (one attempt), for a short piece of work. A broker that
        refuses us or cannot be reached raises one clear :class:`BrokerError`."""
        connection = self.connect()
        try:
            try:
                connection.connect()
            except Exception as exc:
                raise self.refusal(exc) or BrokerError(
                    f"cannot reach the broker at {redact_url(self.url)}: {exc}"
                ) from exc
            yield connection
        finally:
            _release_quietly(connection)

    def refusal(self, exc: BaseException) -> ConfigurationError | None:
        """The configuration error behind ``exc`` when the broker answered but refused
        us (a wrong password, a missing vhost): waiting will not mend it."""
        code = getattr(exc, "reply_code", None) or getattr(exc, "code", None)
        where = redact_url(self.url)
        if code == 403 or type(exc).__name__ == "AuthenticationError":
            return ConfigurationError(
                f"the broker at {where} refused the login ({exc}): check the user and"
                " password in the broker URL (HERETIC_BROKER_URL / broker_url)"
            )
        if code == 530:
            return ConfigurationError(
                f"the broker at {where} refused the connection ({exc}): does the vhost in"
                " the URL exist, and may this user use it?"
            )
        return None

    @property
    def dead_letters_natively(self) -> bool:
        """True when the broker routes rejected messages to ``q.dead`` by itself."""
        return self.url.startswith(("amqp:", "amqps:", "pyamqp:"))

    def queue(self, name: str) -> Queue:
        """The work queue ``name`` with its dead-letter arguments.

        With ``queue_type="quorum"`` it is a replicated quorum queue whose
        ``x-delivery-limit`` makes RabbitMQ dead-letter a message delivered that many
        times without an ack (a job that kills every worker it reaches), as a second
        guard beside heretic's own ``max_attempts``. Transports other than RabbitMQ
        ignore these arguments.
        """
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": DEAD_EXCHANGE,
            "x-dead-letter-routing-key": dead_queue_name(name),
        }
        if self.queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
            if self.delivery_limit is not None:
                arguments["x-delivery-limit"] = self.delivery_limit
        if self.queue_max_priority is not None:
            arguments["x-max-priority"] = self.queue_max_priority
        exchange = Exchange(name, type="direct", durable=True)
        return Queue(name, exchange, routing_key=name, durable=True, queue_arguments=arguments)

    def dead_queue(self, name: str) -> Queue:
        """The dead-letter queue of the work queue ``name``."""
        dead = dead_queue_name(name)
        exchange = Exchange(DEAD_EXCHANGE, type="direct", durable=True)
        return Queue(dead, exchange, routing_key=dead, durable=True)

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
                self.close_publisher(abrupt=True)
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

    def _publisher(self) -> _Publisher:
        """This thread's publisher, opened on first use (again after a fork)."""
        publisher: _Publisher | None = getattr(self._local, "publisher", None)
        if publisher is None or publisher.pid != os.getpid():
            publisher = self._local.publisher = _Publisher(self)
            with self._connections_lock:
                self._publishers.add(publisher)
        return publisher

    def close_publisher(self, abrupt: bool = False) -> None:
        """Close this thread's publishing connection (the next publish opens another)."""
        publisher: _Publisher | None = getattr(self._local, "publisher", None)
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
        return Subscription(self, list(queues), on_delivery, prefetch)

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
        broker: Broker,
        queues: list[str],
        on_delivery: Callable[[Delivery], None],
        prefetch: int,
    ) -> None:
        self.broker = broker
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
            _release_quietly(connection)
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
        self._consumers = []
        if connection is not None:
            _release_quietly(connection)


class _Publisher:
    """One thread's publishing connection, its channel in confirm mode.

    RabbitMQ numbers the messages published on a channel in confirm mode 1, 2, 3… and
    acks (or nacks) them by number, often many at once (``multiple``); py-amqp hands
    those frames to the channel's ``basic_ack``/``basic_nack`` callbacks while the
    connection is read. The embedded transport and Redis have no confirms: a publish
    that returned is accepted.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.pid = os.getpid()
        self.connection = broker.connect()
        try:
            self.connection.ensure_connection(**_CONNECT_RETRY)
            channel: Any = self.connection.default_channel
            self.confirms = not isinstance(self.connection.transport, VirtualTransport)
            if self.confirms:
                channel.confirm_select()
                channel.events["basic_ack"].add(self._on_ack)
                channel.events["basic_nack"].add(self._on_nack)
        except BaseException:
            _release_quietly(self.connection)
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
            _release_quietly(self.connection)
            return
        try:
            self.connection.collect()
        except Exception:
            logger.debug("dropping a broker connection failed", exc_info=True)


def _release_quietly(connection: Connection) -> None:
    try:
        connection.release()
    except Exception:
        logger.debug("closing a broker connection failed", exc_info=True)


def _is_precondition_failed(exc: BaseException) -> bool:
    return getattr(exc, "reply_code", None) == 406 or getattr(exc, "code", None) == 406


def _mismatch_message(queue: Queue, exc: BaseException) -> str:
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
    "Outgoing",
    "Subscription",
    "dead_queue_name",
]
