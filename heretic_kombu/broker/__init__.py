"""The broker: kombu topology, publishing, consuming, dead letters; and the embedded transport."""

from __future__ import annotations

from .core import DEAD_EXCHANGE, DEAD_REASON_HEADER, Broker, Delivery, Subscription, dead_queue_name

__all__ = [
    "DEAD_EXCHANGE",
    "DEAD_REASON_HEADER",
    "Broker",
    "Delivery",
    "Subscription",
    "dead_queue_name",
]
