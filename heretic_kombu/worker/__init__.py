"""The worker: consume loop, execution pools and the scheduler of due jobs."""

from __future__ import annotations

from .pool import POOLS, Pool
from .worker import Worker

__all__ = ["POOLS", "Pool", "Worker"]
