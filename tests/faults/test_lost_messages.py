"""Issue 15, items 5 and 6: nothing the broker loses stays lost, and a message never
changes a job it cannot run. Each scenario prints the usual figure line."""

from __future__ import annotations

import json
import time

import pytest
from harness import SERVICES, SERVICES_AND_EMBEDDED
from helpers import celery_headers, publish_message, wait_for


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_rabbitmq_losing_its_queue_mid_run_loses_no_job(faults, backend):
    """The queue is deleted with its messages and declared again while 500 jobs are
    queued or running: the reconciler publishes the lost ones again."""
    faults.monkeypatch.setenv("HERETIC_QUEUED_TIMEOUT", "3")
    faults.monkeypatch.setenv("HERETIC_HEARTBEAT_INTERVAL", "1")
    faults.monkeypatch.setenv("HERETIC_LEASE_TIMEOUT", "10")
    app = faults.app()
    faults.start_worker(concurrency=4)
    submitted = faults.submit(500, 0.2)
    time.sleep(1.0)
    with app.broker.connect() as conn:  # the test's own queue only
        conn.default_channel.queue_delete(backend.queue)
    app.broker.queue_size(backend.queue)  # declared again, empty
    faults.wait_terminal(len(submitted), timeout=120)
    faults.figure("rabbitmq loses its queue mid-run", submitted, runs_once=False)


def _unknown_task_message(app, queue, task_id, job_id):
    headers = celery_headers("no.such.task", task_id, job_id)
    publish_message(app, queue, json.dumps([[0], {}, {}]), headers)


@pytest.mark.parametrize("backend", SERVICES_AND_EMBEDDED, indirect=True)
def test_unknown_task_messages_with_existing_ids_change_no_job(faults, backend):
    """A message naming a task no worker knows, carrying the id of a scheduled job and
    of a running job: both jobs end as they would have, each run once."""
    import fault_tasks

    app = faults.app()
    faults.start_worker(concurrency=2)
    scheduled = fault_tasks.record_run.apply_async((1, 0.0), countdown=4)
    running = fault_tasks.record_run.delay(2, 4.0)
    wait_for(lambda: app.jobs.get(running.id).status == "started", 30, "the job to start")
    for job in (scheduled, running):
        _unknown_task_message(app, backend.queue, job.id, app.jobs.get(job.id).id)
    faults.wait_terminal(2, timeout=60)
    figure = faults.figure("unknown-task messages with existing ids", [scheduled.id, running.id])
    assert figure.completed == 2
