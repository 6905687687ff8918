"""``/metrics``: the job table and the queues in Prometheus' text exposition format.

Every figure is read when Prometheus scrapes (nothing is kept in this process), so
several dashboards, or a dashboard restarted, report the same numbers:

===============================  =========  ==============================================
name                             type       what
===============================  =========  ==============================================
heretic_jobs                     gauge      rows in heretic_jobs, labels ``task``, ``status``
heretic_job_runtime_seconds      histogram  run time of the jobs that succeeded or failed in
                                            the last hour, label ``task``
heretic_queue_jobs               gauge      unfinished rows, labels ``queue``, ``status``
heretic_queue_ready_messages     gauge      messages ready in the broker queue, ``queue``
heretic_dead_letters             gauge      messages in ``<queue>.dead``, label ``queue``
heretic_workers_seen             gauge      workers that touched a job in the last 5 minutes
heretic_broker_up                gauge      1 if the broker answered this scrape, else 0
===============================  =========  ==============================================

The run-time histogram describes a sliding window (the last hour), so its buckets can
go down between scrapes: compare them over time with ``max_over_time`` or read them as
they are, not with ``rate()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest

from .data import MetricsData

#: The text format ``generate_latest`` writes (0.0.4), named here so that the header
#: does not change with the library's idea of "latest".
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Run-time bucket bounds in seconds: from fast no-op jobs to hour-long batch jobs.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class _Snapshot:
    """A collector over one :class:`MetricsData` (what ``generate_latest`` reads)."""

    def __init__(self, data: MetricsData) -> None:
        self.data = data

    def collect(self) -> Iterator[Any]:
        data = self.data
        jobs = GaugeMetricFamily(
            "heretic_jobs", "Rows in heretic_jobs per task and status.", labels=["task", "status"]
        )
        for (task, status), n in sorted(data.counts.items()):
            jobs.add_metric([task, status], n)
        yield jobs

        runtime = HistogramMetricFamily(
            "heretic_job_runtime_seconds",
            "Run time of the jobs that succeeded or failed in the last hour, per task.",
            labels=["task"],
        )
        for task, values in sorted(data.runtimes.items()):
            runtime.add_metric([task], _buckets(values), sum_value=sum(values))
        yield runtime

        queued = GaugeMetricFamily(
            "heretic_queue_jobs",
            "Unfinished rows in heretic_jobs per queue and status.",
            labels=["queue", "status"],
        )
        for queue, counts in sorted(data.queue_counts.items()):
            for status, n in sorted(counts.items()):
                queued.add_metric([queue, status], n)
        yield queued

        ready = GaugeMetricFamily(
            "heretic_queue_ready_messages",
            "Messages ready in the broker queue.",
            labels=["queue"],
        )
        for queue, n in sorted(data.ready.items()):
            ready.add_metric([queue], n)
        yield ready

        dead = GaugeMetricFamily(
            "heretic_dead_letters", "Messages in the queue's dead-letter queue.", labels=["queue"]
        )
        for queue, n in sorted(data.dead.items()):
            dead.add_metric([queue], n)
        yield dead

        yield GaugeMetricFamily(
            "heretic_workers_seen",
            "Workers that claimed, heartbeated or finished a job in the last 5 minutes.",
            value=data.workers,
        )
        yield GaugeMetricFamily(
            "heretic_broker_up",
            "1 if the broker answered during this scrape, else 0.",
            value=1 if data.broker_up else 0,
        )


def render(data: MetricsData) -> bytes:
    """The exposition text for ``data``."""
    return generate_latest(_Snapshot(data))


def _buckets(values: list[float]) -> list[tuple[str, float]]:
    """Cumulative bucket counts, ending with ``+Inf`` (every value)."""
    found = [(_bound(bound), float(sum(v <= bound for v in values))) for bound in BUCKETS]
    found.append(("+Inf", float(len(values))))
    return found


def _bound(value: float) -> str:
    return repr(float(value))


__all__ = ["BUCKETS", "CONTENT_TYPE", "render"]
