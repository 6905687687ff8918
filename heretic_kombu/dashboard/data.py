"""What the dashboard pages and ``/metrics`` show, read through the app's own API.

Everything here calls ``app.jobs`` (the history), the job store's read methods and the
broker; no SQL is built here and nothing here knows about HTTP. Broker answers are
optional: a broker that cannot be reached shows as unknown counts, never as an error
page, because the table alone still tells most of the story.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from typing import TYPE_CHECKING, Any

from ..status import ALL_STATUSES, Status
from . import charts

if TYPE_CHECKING:
    from ..app import Heretic
    from ..store import Job
    from ..store.history import Stats

logger = logging.getLogger("heretic_kombu.dashboard")

#: A worker counts as seen if it touched a job this recently.
WORKER_WINDOW = dt.timedelta(minutes=5)
#: The window of the throughput chart and of the run-time figures.
RECENT = dt.timedelta(hours=1)
#: Statuses a job can be cancelled in (it has not started).
CANCELLABLE = (Status.PENDING, Status.SCHEDULED, Status.QUEUED, Status.RETRYING)
#: Statuses a job can be retried in.
RETRYABLE = (Status.FAILED, Status.REVOKED)
#: Statuses a job can be published again in, once the operator says its message is lost.
REQUEUABLE = (Status.QUEUED, Status.STARTED)
#: Most related jobs shown on a job's page (per kind of relation).
LINEAGE_LIMIT = 100


@dataclasses.dataclass(frozen=True)
class QueueRow:
    """One queue: unfinished jobs per status (table), ready messages and dead letters
    (broker; ``None`` when the broker did not answer)."""

    name: str
    counts: dict[str, int]
    ready: int | None
    dead: int | None


@dataclasses.dataclass(frozen=True)
class Worker:
    name: str
    last_seen: dt.datetime
    running: int


@dataclasses.dataclass(frozen=True)
class Overview:
    stats: Stats
    chart: charts.Chart
    tasks: list[str]
    statuses: list[str]  # the columns of the task × status table
    queues: list[QueueRow]
    workers: list[Worker]
    broker_error: str | None


@dataclasses.dataclass(frozen=True)
class Lineage:
    """The jobs related to one job (each list without the job itself)."""

    parent: Job | None
    root: Job | None
    children: list[Job]
    group: list[Job]
    workflow: list[Job]  # every job with the same root, oldest first


def known_queues(app: Heretic) -> list[str]:
    """The queues worth showing: every queue with a job in the table, and the default."""
    names = set(app.jobs.history.queue_names())
    names.add(app.settings.default_queue)
    return sorted(names)


def overview(app: Heretic, now: dt.datetime | None = None) -> Overview:
    """Everything on the overview page."""
    now = now or dt.datetime.now(dt.timezone.utc)
    stats = app.jobs.stats(now - RECENT)
    history = app.jobs.history
    tasks = sorted({task for task, _ in stats.counts})
    statuses = [str(s) for s in ALL_STATUSES if any((t, s) in stats.counts for t in tasks)]
    table = history.queue_counts()
    queues: list[QueueRow] = []
    broker_error: str | None = None
    for name in known_queues(app):
        ready = dead = None
        if broker_error is None:
            try:
                ready = app.broker.queue_size(name)
                dead = app.broker.queue_size(name, dead=True)
            except Exception as exc:  # the page still shows the table's side
                broker_error = f"{type(exc).__name__}: {exc}"
                logger.warning("dashboard: broker did not answer: %s", broker_error)
        queues.append(QueueRow(name, table.get(name, {}), ready, dead))
    workers = [
        Worker(name, last, running)
        for name, last, running in history.workers_seen(now - WORKER_WINDOW)
    ]
    chart = charts.throughput(stats.per_minute, now)
    return Overview(stats, chart, tasks, statuses, queues, workers, broker_error)


def lineage(app: Heretic, job: Job) -> Lineage:
    """Parent, root, children, group members and the whole workflow of ``job``."""
    parent = app.jobs.get(job.parent_id) if job.parent_id else None
    root = None
    if job.root_id and job.root_id != job.task_id:
        root = parent if parent and parent.task_id == job.root_id else app.jobs.get(job.root_id)
    children = app.store.children_of(job.task_id)[:LINEAGE_LIMIT]
    group: list[Job] = []
    if job.group_id:
        page = app.jobs.search(group_id=job.group_id, order_by="id", limit=LINEAGE_LIMIT + 1)
        group = [j for j in page.rows if j.task_id != job.task_id][:LINEAGE_LIMIT]
    workflow: list[Job] = []
    root_id = job.root_id or job.task_id
    page = app.jobs.search(root_id=root_id, order_by="id", limit=LINEAGE_LIMIT + 1)
    if len(page.rows) > 1 or (page.rows and page.rows[0].task_id != job.task_id):
        workflow = [j for j in page.rows if j.task_id != job.task_id][:LINEAGE_LIMIT]
    return Lineage(parent, root, children, group, workflow)


@dataclasses.dataclass(frozen=True)
class MetricsData:
    """What ``/metrics`` reports, gathered in one pass."""

    counts: dict[tuple[str, str], int]
    runtimes: dict[str, list[float]]
    queue_counts: dict[str, dict[str, int]]
    ready: dict[str, int]
    dead: dict[str, int]
    workers: int
    broker_up: bool


def metrics(app: Heretic, now: dt.datetime | None = None) -> MetricsData:
    """The figures behind ``/metrics``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    history = app.jobs.history
    stats = history.stats(now)  # the counts are all-time; nothing else of it is used
    runtimes = history.runtimes(now - RECENT)
    table = history.queue_counts()
    ready: dict[str, int] = {}
    dead: dict[str, int] = {}
    broker_up = True
    try:
        for name in known_queues(app):
            ready[name] = app.broker.queue_size(name)
            dead[name] = app.broker.queue_size(name, dead=True)
    except Exception as exc:
        logger.warning("dashboard: broker did not answer for /metrics: %s", exc)
        broker_up = False
    workers = len(history.workers_seen(now - WORKER_WINDOW))
    return MetricsData(stats.counts, runtimes, table, ready, dead, workers, broker_up)


def pretty(value: Any) -> str:
    """A JSON value indented for reading (the template escapes it)."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


__all__ = [
    "CANCELLABLE",
    "REQUEUABLE",
    "RETRYABLE",
    "Lineage",
    "MetricsData",
    "Overview",
    "QueueRow",
    "known_queues",
    "lineage",
    "metrics",
    "overview",
    "pretty",
]
