"""The broker's topology and connections: what heretic declares, and how it connects.

Per queue ``q`` heretic declares a durable direct exchange ``q`` bound to a durable
queue ``q`` (Celery's own default topology, so Celery clients and workers interoperate),
whose ``x-dead-letter-exchange`` routes rejected messages to the durable queue
``q.dead``. On RabbitMQ, rejecting without requeue dead-letters a message; on transports
that ignore those arguments (the embedded default, Redis) heretic copies the message to
``q.dead`` itself before acking it, so the behaviour is the same everywhere.

Also here: the two message shapes the rest of the package sees (:class:`Delivery`
received, :class:`Outgoing` to publish), so that nothing outside ``broker/`` touches
kombu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from kombu.connection import Connection
from kombu.entity import Exchange, Queue

from .. import protocol
from ..config import redact_url
from ..exceptions import BrokerError, ConfigurationError, QueueMismatchError
from . import embedded

logger = logging.getLogger("heretic_kombu.broker")

DEAD_EXCHANGE = "heretic.dead"
DEAD_REASON_HEADER = "x-heretic-dead-reason"
# How a publishing connection is opened: a few quick retries, then the publish fails and
# the row stays pending for the reconciler (about 2 s in all when the broker is down).
CONNECT_RETRY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 2}


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


class Topology:
    """One broker URL: its connections, the queues heretic declares there, and what a
    refusal from it means."""

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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)}>"

    def connect(self) -> Connection:
        """A new kombu connection (not yet connected) for this broker URL."""
        options = dict(self.transport_options)
        if self.url.startswith("sqlite:"):
            return Connection(self.url, transport=embedded.Transport, transport_options=options)
        # Publishers put their channel in confirm mode themselves and read the confirms
        # when they choose (publisher.Publisher); py-amqp's confirm_publish would wait for each.
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
            release_quietly(connection)

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


def release_quietly(connection: Connection) -> None:
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
    "CONNECT_RETRY",
    "DEAD_EXCHANGE",
    "DEAD_REASON_HEADER",
    "Delivery",
    "Outgoing",
    "Topology",
    "dead_queue_name",
    "release_quietly",
]
