"""Shared fixtures: the two backends every integration case runs on, and real workers.

``backend`` is parametrised over the embedded default (SQLite files + heretic's SQLite
broker, in ``tmp_path``) and the real services (PostgreSQL and RabbitMQ on 127.0.0.1).
Without the services those cases skip with the reason; with
``HERETIC_REQUIRE_SERVICES=1`` (set by ``.ci/run``) the skip becomes a failure, so CI
always exercises them.

Workers are real ``heretic worker`` processes started through the CLI, and are always
stopped by the fixture (SIGTERM, then SIGKILL after a bounded wait).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (  # noqa: E402 - tests/ must be importable first
    AMQP_URL,
    PG_ADMIN_URL,
    REDIS_URL,
    Backend,
    WorkerProcess,
    delete_queues,
    require_services,
)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A PostgreSQL database of the test session's own, dropped at the end."""
    require_services()
    import psycopg2

    name = f"heretic_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


#: Test modules whose cases also run on the Redis broker: the ones about delivery (the
#: broker's part). The others (CLI, search, dashboard, beat...) test the database side,
#: which the broker does not change, so their Redis runs are deselected to keep the
#: suite's time in check; `HERETIC_TEST_ALL_BACKENDS=1` runs them all.
REDIS_MODULES = {
    "test_lifecycle",
    "test_messages",
    "test_sending",
    "test_canvas",
    "test_control",
    "test_scheduler",
    "test_transaction",
    "test_compat_billing",
    "test_hostile_values",
    "test_bad_rows",
    "test_intake",
    "test_bad_input",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    every_backend = os.environ.get("HERETIC_TEST_ALL_BACKENDS") == "1"
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        # ``@pytest.mark.not_on("services")``: a case that cannot exist on that backend
        # (not one that is skipped there): it is not collected for it at all.
        impossible = any(backend in mark.args for mark in item.iter_markers("not_on"))
        off_redis = backend == "redis" and module not in REDIS_MODULES and not every_backend
        (dropped if impossible or off_redis else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def redis_broker() -> Iterator[str]:
    """The tests' Redis database, emptied before and after the session."""
    require_services(redis=True)
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(
    params=[
        "embedded",
        pytest.param("services", marks=pytest.mark.services),
        pytest.param("redis", marks=pytest.mark.services),  # PostgreSQL + a Redis broker
    ]
)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    for key in list(os.environ):
        if key.startswith("HERETIC_") and key != "HERETIC_REQUIRE_SERVICES":
            monkeypatch.delenv(key)
    queue = f"t_{uuid.uuid4().hex[:10]}"
    if request.param == "embedded":
        chosen = Backend(
            "embedded",
            f"sqlite:///{tmp_path}/jobs.sqlite3",
            f"sqlite:///{tmp_path}/broker.sqlite3",
            queue,
            tmp_path / "events.jsonl",
        )
    else:
        database = request.getfixturevalue("pg_database")
        _truncate(database)
        broker = (
            AMQP_URL if request.param == "services" else request.getfixturevalue("redis_broker")
        )
        chosen = Backend(request.param, database, broker, queue, tmp_path / "events.jsonl")
    for key, value in {
        "HERETIC_DATABASE_URL": chosen.database_url,
        "HERETIC_BROKER_URL": chosen.broker_url,
        "HERETIC_DEFAULT_QUEUE": chosen.queue,
        "HERETIC_SCHEDULER_INTERVAL": "0.2",
        # Short leases so that lost jobs are found within a test's patience.
        "HERETIC_HEARTBEAT_INTERVAL": "0.25",
        "HERETIC_LEASE_TIMEOUT": "1.5",
        "HERETIC_PENDING_TIMEOUT": "2",
        "HERETIC_TEST_EVENTS": str(chosen.events_path),
    }.items():
        monkeypatch.setenv(key, value)
    yield chosen
    if chosen.name == "services":
        delete_queues(chosen.queue)


def _truncate(database_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg2://"))
    with engine.begin() as conn:
        if sa.inspect(conn).has_table("heretic_jobs"):
            conn.exec_driver_sql("TRUNCATE heretic_jobs")
    engine.dispose()


@pytest.fixture
def app(backend: Backend) -> Iterator[Any]:
    """An app configured from the backend's environment; shared tasks bind to it."""
    import jobs_project  # noqa: F401 - registers the shared tasks first

    from heretic_kombu import Heretic

    application = Heretic("tests")
    yield application
    application.close()


@pytest.fixture
def start_worker(backend: Backend, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real workers; every one is stopped when the test ends."""
    started: list[WorkerProcess] = []

    def start(*args: str, pool: str = "prefork", concurrency: int = 2) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started) + 1}.log"
        worker = WorkerProcess(
            ["-P", pool, "-c", str(concurrency), "-n", f"w{len(started) + 1}@%h", *args],
            log,
            tmp_path,
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            try:
                worker.process.send_signal(signal.SIGTERM)
                worker.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)  # any orphaned pool child
