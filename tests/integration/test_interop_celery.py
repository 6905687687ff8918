"""Interop with real Celery 5.x on RabbitMQ: a Celery client's jobs run on a heretic worker,
and a heretic client's jobs run on a Celery worker.

``test_messages.py`` covers hand-built Celery-protocol messages; here the other side is the
real ``celery`` package: its client (``send_task``, ``.delay()``, a chain) and its worker
process (``python -m celery -A ... worker``). Services backend only: Celery's AMQP transport
and heretic's job table must meet on the same RabbitMQ (and PostgreSQL for the rows).

A queue heretic has declared carries dead-letter arguments, and RabbitMQ refuses to declare
the same queue again without them (406), which is what a Celery client or worker does by
default. So the Celery side declares its queue the way heretic does, through its
``task_queues`` setting, with the queue heretic's broker builds; the Celery *code* (tasks,
``send_task``, ``.delay()``) is unchanged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import AMQP_URL, wait_for, wait_queued

from heretic_kombu import shared_task, states

pytestmark = [
    pytest.mark.services,
    pytest.mark.parametrize("backend", ["services"], indirect=True),
]


@shared_task(name="interop.write_file")
def write_file(path, text):
    """Declared on the heretic side; run by the Celery worker of the second test."""
    Path(path).write_text(text, encoding="utf-8")
    return text


@pytest.fixture
def celery_client(app, backend) -> Iterator[object]:
    """An ordinary Celery client on the test's queue (declared with heretic's arguments)."""
    celery = pytest.importorskip("celery")
    client = celery.Celery("legacy_service", broker=AMQP_URL, set_as_current=False)
    client.conf.update(
        task_default_queue=backend.queue,
        task_queues=[app.broker.queue(backend.queue)],
        task_serializer="json",
        accept_content=["json"],
    )
    yield client
    client.close()


def test_celery_client_send_task_and_delay_run_on_a_heretic_worker(
    app, backend, start_worker, celery_client
):
    start_worker()

    @celery_client.task(name="jobs_project.add")
    def add(x, y):  # the Celery service's own declaration: its body never runs here
        raise AssertionError("run by the heretic worker, not in the client")

    sent = celery_client.send_task("jobs_project.add", args=(20, 22))
    delayed = add.delay(1, 2)

    assert app.AsyncResult(sent.id).get(timeout=30) == 42
    assert app.AsyncResult(delayed.id).get(timeout=30) == 3
    for result, args, value in ((sent, [20, 22], 42), (delayed, [1, 2], 3)):
        job = app.store.get(result.id)
        assert job.status == states.SUCCEEDED
        assert job.task_name == "jobs_project.add"
        assert job.payload == {"args": args, "kwargs": {}}
        assert job.queue_name == backend.queue
        assert job.attempts == 1
        assert app.AsyncResult(result.id).result == value


def test_celery_client_chain_runs_on_a_heretic_worker(app, backend, start_worker, celery_client):
    start_worker()
    add = celery_client.signature("jobs_project.add")
    result = (add.clone(args=(1, 2)) | add.clone(args=(10,))).apply_async()

    assert app.AsyncResult(result.id).get(timeout=30) == 13
    last, first = app.store.get(result.id), app.store.get(result.parent.id)
    assert first.status == last.status == states.SUCCEEDED
    assert last.payload == {"args": [3, 10], "kwargs": {}}
    assert last.parent_id == first.task_id


CELERY_PROJECT = '''
"""A Celery project consuming the queue heretic publishes to."""
import os
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

QUEUE = os.environ["INTEROP_QUEUE"]
app = Celery("celery_side", broker=os.environ["INTEROP_BROKER"])
app.conf.update(
    task_default_queue=QUEUE,
    task_queues=[
        Queue(QUEUE, Exchange(QUEUE, "direct"), routing_key=QUEUE, queue_arguments=ARGUMENTS)
    ],
    broker_connection_retry_on_startup=True,
)


@app.task(name="interop.write_file")
def write_file(path, text):
    Path(path).write_text("celery wrote: " + text, encoding="utf-8")
    return text
'''


@pytest.fixture
def celery_worker(app, backend, tmp_path) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``celery worker`` (solo pool) consuming the test's queue."""
    pytest.importorskip("celery")
    project = tmp_path / "celery_side.py"
    arguments = app.broker.queue(backend.queue).queue_arguments
    project.write_text(
        textwrap.dedent(CELERY_PROJECT).replace("ARGUMENTS)", f"{arguments!r})"),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERETIC_")}
    env.update(
        INTEROP_QUEUE=backend.queue,
        INTEROP_BROKER=AMQP_URL,
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])),
    )
    log_path = tmp_path / "celery-worker.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_side", "worker", "-P", "solo"]
            + ["-Q", backend.queue, "-l", "info", "-n", f"interop-{uuid.uuid4().hex[:6]}@%h"]
            + ["--without-gossip", "--without-mingle", "--without-heartbeat"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
            start_new_session=True,
        )

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"celery worker exited with {process.returncode}:\n{log_path.read_text()}")
        return " ready." in log_path.read_text(encoding="utf-8", errors="replace")

    try:
        wait_for(ready, 45, f"celery worker to start (log: {log_path})")
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def test_job_enqueued_by_heretic_runs_on_a_celery_worker(app, backend, tmp_path, celery_worker):
    target = tmp_path / "written-by-celery.txt"

    result = write_file.delay(str(target), "hello from heretic")

    wait_for(target.exists, 30, "the Celery worker to run the job")
    wait_for(lambda: target.read_text(encoding="utf-8"), 5, "the file's content")
    assert target.read_text(encoding="utf-8") == "celery wrote: hello from heretic"
    # Celery does not know heretic's table: the row keeps the status it had when the broker
    # confirmed the message, `queued`, and its AsyncResult stays PENDING.
    job = wait_queued(app, result.id)
    assert job.attempts == 0
    assert result.state == "PENDING"
