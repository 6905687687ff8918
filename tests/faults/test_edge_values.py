"""One bad value, at the edge, never stalls what comes after it (issue 15, items 1-3).

Before, each value below was accepted (at ``.delay()``, or from a Celery client's
message) and then stopped a worker, every reconciler, or the scheduler of every worker.
Now it is refused where it enters: the caller gets ``InvalidValue`` with nothing
written, and a message is dead-lettered with the reason. Each scenario then pushes
ordinary jobs through real workers and prints the figure line.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import fault_tasks
import kombu
import pytest
from harness import SERVICES, SERVICES_AND_EMBEDDED
from helpers import wait_for

from heretic_kombu.exceptions import InvalidValue

#: 9999-12-31 23:30 at UTC-1: year 10000 in UTC.
YEAR_10000 = dt.datetime(9999, 12, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-1)))


def _attempt(call: Any) -> str:
    """What the caller saw: the refusal, or "accepted" if the call returned."""
    try:
        call()
    except InvalidValue as exc:
        return f"InvalidValue: {exc}"
    except Exception as exc:  # before: raw OverflowError/ValueError, or a broker error
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def _dead_letters(app: Any, queue: str) -> int:
    with app.broker.connect() as conn:
        dead = app.broker.dead_queue(queue)(conn.default_channel)
        return int(dead.queue_declare(passive=True)[1])


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_item1_a_message_whose_retries_overflow_attempts_is_dead_lettered(faults, backend):
    """A Celery client's message with retries=2**31 (one more than PostgreSQL's integer
    holds), then 50 ordinary jobs: all complete, and the worker stops on SIGTERM. Before,
    the worker retried "database unavailable" for ever and ignored SIGTERM."""
    app = faults.app()
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": "fault_tasks.record_run",
        "id": task_id,
        "root_id": task_id,
        "retries": 2**31,
        "timelimit": [None, None],
        "origin": "gen1@celery-client",
    }
    with app.broker.connect() as conn:
        channel = conn.default_channel
        app.broker.declare(channel, backend.queue)
        kombu.Producer(channel).publish(
            json.dumps([[0], {}, {}]),
            exchange=backend.queue,
            routing_key=backend.queue,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
        )
    worker = faults.start_worker(concurrency=2)
    ids = faults.submit(50, 0.0)
    faults.wait_terminal(len(ids), timeout=45)
    figure = faults.figure("edge: a message with retries=2**31, then 50 jobs", ids)
    assert figure.completed == 50
    assert app.store.get(task_id) is None  # no row for the refused message
    wait_for(lambda: _dead_letters(app, backend.queue) == 1, 10, "the message in the dead queue")
    worker.process.send_signal(15)
    try:
        code = worker.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker did not stop on SIGTERM")
    assert code == 0


@pytest.mark.parametrize("backend", SERVICES_AND_EMBEDDED, indirect=True)
def test_item2_a_date_out_of_range_is_refused_and_reconcilers_keep_working(
    faults, backend, tmp_path
):
    """expires and eta that are year 10000 in UTC, countdown=1e12/inf/nan: refused at the
    call with nothing written; 50 jobs then complete and `heretic jobs list` works.
    Before, the row could not be read back: every reconciler failed every 2 s, `jobs
    list` exited 2."""
    faults.app()  # the producer, configured from the environment
    seen = [
        _attempt(lambda: fault_tasks.record_run.apply_async((0,), expires=YEAR_10000)),
        _attempt(lambda: fault_tasks.record_run.apply_async((0,), eta=YEAR_10000)),
        _attempt(lambda: fault_tasks.record_run.apply_async((0,), countdown=1e12)),
        _attempt(lambda: fault_tasks.record_run.apply_async((0,), countdown=float("inf"))),
        _attempt(lambda: fault_tasks.record_run.apply_async((0,), countdown=float("nan"))),
    ]
    print("\n" + "\n".join(seen))
    faults.start_worker(concurrency=2)
    ids = faults.submit(50, 0.0)
    faults.wait_terminal(len(ids), timeout=45)
    faults.figure("edge: dates out of range refused, then 50 jobs", ids)
    listed = subprocess.run(
        [sys.executable, "-m", "heretic_kombu.cli", "jobs", "list", "--limit", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert listed.returncode == 0, listed.stderr
    assert all(s.startswith("InvalidValue") for s in seen), seen
    assert len(faults.rows()) == 50  # nothing written for the refused calls


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_item3_an_unpublishable_job_is_refused_and_countdowns_run_on_time(faults, backend):
    """apply_async(priority=256) and a 130 MiB argument (above RabbitMQ's default
    max_message_size of 128 MiB), then 100 countdown=2 jobs: all run, each within a few
    seconds of its due time. Before, both calls returned normally and none of the 100
    countdown jobs ran in 90 s ("101 due job(s) not published")."""
    app = faults.app()
    seen = [_attempt(lambda: fault_tasks.record_run.apply_async((0,), priority=256))]
    seen.append(_attempt(lambda: fault_tasks.record_run.delay("x" * (130 << 20))))
    print("\n" + "\n".join(s[:200] for s in seen))
    faults.start_worker(concurrency=4)
    sent = time.monotonic()
    ids = [fault_tasks.record_run.apply_async((n,), countdown=2).id for n in range(100)]
    faults.wait_terminal(len(ids), timeout=60)
    figure = faults.figure("edge: priority=256 and 130 MiB refused, then 100 countdown=2", ids)
    late = max(
        (row.started_at - row.eta).total_seconds()
        for row in (app.store.get(task_id) for task_id in ids)
    )
    print(f"latest start after its due time: {late:.1f} s ({time.monotonic() - sent:.1f} s)")
    assert figure.completed == 100
    assert late < 15
    assert seen[0].startswith("InvalidValue: priority (256) is out of range"), seen
    assert seen[1].startswith("InvalidValue: the message would be"), seen[1][:200]
    assert len(faults.rows()) == 100  # nothing written for the refused calls
