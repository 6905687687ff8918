"""The benchmark's task module, the same for every implementation but its import line.

``BENCH_IMPL`` picks the implementation: ``heretic`` (heretic_kombu), ``celery-db``
(Celery with the ``db+postgresql://`` result backend) or ``celery`` (Celery with no
result backend). ``BENCH_QUEUE``, ``BENCH_DATABASE`` and ``BENCH_MARKER`` come from the
runner.
"""

from __future__ import annotations

import os

IMPL = os.environ.get("BENCH_IMPL", "heretic")
BROKER = os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("BENCH_QUEUE", "bench")
DATABASE = os.environ.get("BENCH_DATABASE", "postgresql://postgres@127.0.0.1:5432/postgres")
MARKER = os.environ.get("BENCH_MARKER")  # a file each run appends a byte to (no backend)

if IMPL == "heretic":
    from heretic_kombu import Celery, group
else:
    from celery import Celery, group  # type: ignore[no-redef]

if IMPL == "heretic":
    app = Celery("bench", broker=BROKER, database_url=DATABASE)
elif IMPL == "celery-db":
    # psycopg2 spelled out: SQLAlchemy 2.1 would otherwise pick psycopg 3.
    backend = "db+" + DATABASE.replace("postgresql://", "postgresql+psycopg2://", 1)
    app = Celery("bench", broker=BROKER, backend=backend)
else:
    app = Celery("bench", broker=BROKER)
app.conf.task_default_queue = QUEUE
app.conf.task_serializer = app.conf.result_serializer = "json"
app.conf.accept_content = ["json"]
if IMPL != "heretic":
    app.conf.task_ignore_result = IMPL == "celery"
    app.conf.worker_hijack_root_logger = False
    app.conf.broker_connection_retry_on_startup = True

_marker = open(MARKER, "ab", buffering=0) if MARKER else None  # noqa: SIM115 - for the process


@app.task(name="bench.noop")
def noop(i=0):
    if _marker is not None:
        _marker.write(b".")
    return i


__all__ = ["app", "group", "noop"]
