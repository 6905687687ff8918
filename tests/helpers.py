"""Helpers shared by the tests: service probes, bounded waits, real worker processes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = ROOT / "tests" / "projects"
REQUIRE_SERVICES = os.environ.get("HERETIC_REQUIRE_SERVICES") == "1"
PG_ADMIN_URL = os.environ.get(
    "HERETIC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("HERETIC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _own_redis_database(url: str) -> str:
    """``url`` with the database number of this test process: the URL's own number for a
    plain run, and one lower for each further pytest-xdist worker (gw0 keeps it, gw1 takes
    one less...), so parallel workers never empty each other's database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    base, _, number = url.rpartition("/")
    if not number.isdigit():
        return url
    if index > int(number):
        raise RuntimeError(f"{url}: too few Redis databases below it for xdist worker {worker}")
    return f"{base}/{int(number) - index}"


# A database number of the tests' own (per xdist worker, see above): it is emptied at the
# start and end of a session.
REDIS_URL = _own_redis_database(
    os.environ.get("HERETIC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
)

if str(PROJECTS) not in sys.path:
    sys.path.insert(0, str(PROJECTS))


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_queued(app: Any, task_id: str, timeout: float = 5.0) -> Any:
    """The row of ``task_id`` once it is ``queued``: a single ``.delay()`` returns before
    the broker's confirm, and the row is marked within a moment (heretic_kombu.sender)."""
    return wait_for(
        lambda: (row := app.store.get(task_id)) is not None and row.status == "queued" and row,
        timeout,
        f"job {task_id} to be queued",
    )


def services_unavailable(redis: bool = False) -> str | None:
    """Why PostgreSQL or RabbitMQ (or Redis) cannot be used, or ``None`` if they answer."""
    import kombu
    import psycopg2

    try:
        psycopg2.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"RabbitMQ not reachable at {AMQP_URL}: {exc}"
    if redis:
        import redis as redis_client

        try:
            redis_client.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
        except Exception as exc:
            return f"Redis not reachable at {REDIS_URL}: {exc}"
    return None


def require_services(redis: bool = False) -> None:
    reason = services_unavailable(redis)
    if reason is None:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (HERETIC_REQUIRE_SERVICES=1: a skip here is a failure)")
    pytest.skip(reason)


@dataclasses.dataclass
class Backend:
    """Where the test's jobs live: URLs, the test's own queue, and its event log."""

    name: str
    database_url: str
    broker_url: str
    queue: str
    events_path: Path

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Events the worker processes fired (job_error / job_failed), in order."""
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text(encoding="utf-8").splitlines()
        found = [json.loads(line) for line in lines if line.strip()]
        return [e for e in found if kind is None or e["event"] == kind]


def delete_queues(queue: str) -> None:
    import kombu

    with kombu.Connection(AMQP_URL) as conn:
        for name in (queue, f"{queue}.dead"):
            with contextlib.suppress(Exception):
                conn.default_channel.queue_delete(name)
            with contextlib.suppress(Exception):
                conn.default_channel.exchange_delete(name)


class WorkerProcess:
    """A ``heretic worker`` started through the CLI, as a user runs it."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECTS), env.get("PYTHONPATH")]))
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "heretic_kombu.cli",
                    "worker",
                    "-A",
                    "jobs_project",
                    "-l",
                    "info",
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        wait_for(self._ready, 30, f"worker to start (log: {log_path})")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log()}")
        return " ready: " in self.log()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (warm shutdown) and wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"worker did not stop within {timeout}s after SIGTERM:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the worker and its pool children."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def unreachable_broker_url(backend: Backend, tmp_path: Path) -> str:
    """A broker URL of ``backend``'s kind that nothing answers: a closed port for
    RabbitMQ, an SQLite file under a path that is a file, not a folder, otherwise."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("no broker can live here")
    if backend.name == "services":
        return "amqp://guest:guest@127.0.0.1:1//"
    return f"sqlite:///{blocked}/broker.sqlite3"


def declare_plain_queue(broker_url: str, name: str) -> None:
    """Declare queue ``name`` as a plain Celery setup would, without heretic's
    dead-letter arguments: heretic's own declaration of it then fails (406)."""
    import kombu

    with kombu.Connection(broker_url) as conn:
        kombu.Queue(name, kombu.Exchange(name, "direct"), routing_key=name)(
            conn.default_channel
        ).declare()


def celery_headers(task: str, task_id: str, job_id: int | None = None) -> dict[str, Any]:
    """The headers of a Celery protocol-v2 message for ``task`` (with heretic's row id)."""
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
    }
    if job_id is not None:
        headers["heretic_job_id"] = job_id
    return headers


def publish_message(app: Any, queue: str, body: str, headers: dict[str, Any]) -> None:
    """Publish a hand-built JSON message to ``queue``, as an unchanged Celery client would."""
    import kombu

    with app.broker.connect() as conn:
        channel = conn.default_channel
        app.broker.declare(channel, queue)
        kombu.Producer(channel).publish(
            body,
            exchange=queue,
            routing_key=queue,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
        )


def run_heretic(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``heretic ARGS`` as a user runs it, with the test projects importable."""
    environment = dict(os.environ, **(env or {}))
    environment["PYTHONPATH"] = str(PROJECTS)
    return subprocess.run(
        [sys.executable, "-m", "heretic_kombu.cli", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
