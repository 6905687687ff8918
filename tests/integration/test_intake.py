"""Issue 15, items 5, 6 and 8: what a worker takes in never changes a job it cannot run,
a message the broker lost is sent again, and a retried workflow step resumes its
workflow — on real workers, as a user sees it (rows, results, the CLI's exit code).
"""

from __future__ import annotations

import json

import canvas_tasks as ct
import jobs_project
import kombu
from helpers import celery_headers, publish_message, run_heretic, wait_for

from heretic_kombu import states
from heretic_kombu.canvas import chain, chord, group


def heretic(*args):
    return run_heretic("-A", "jobs_project", *args)


def publish_raw(app, queue, task, task_id, job_id):
    """A protocol-v2 message for ``task`` carrying the id (and row id) of a job."""
    publish_message(app, queue, json.dumps([[1], {}, {}]), celery_headers(task, task_id, job_id))


# -- item 6: a message never changes a job it cannot run ------------------------------


def test_unknown_task_message_with_a_scheduled_jobs_id_leaves_the_job(app, backend, start_worker):
    start_worker()
    scheduled = jobs_project.add.apply_async((20, 22), countdown=4)
    row = app.jobs.get(scheduled.id)
    publish_raw(app, backend.queue, "no.such.task", scheduled.id, row.id)
    assert wait_for(lambda: len(app.jobs.dead_letters()) == 1, 30, "the dead letter")
    assert app.jobs.get(scheduled.id).status == states.SCHEDULED  # untouched
    assert scheduled.get(timeout=30) == 42
    assert app.jobs.get(scheduled.id).attempts == 1
    reasons = [e["reason"] for e in backend.events("job_error")]
    assert len(reasons) == 1 and "unknown task 'no.such.task'" in reasons[0]
    assert "passed on 3 time(s)" in reasons[0]


def test_unknown_task_message_with_a_running_jobs_id_leaves_the_job(app, backend, start_worker):
    start_worker()
    running = jobs_project.slow.delay(3)
    wait_for(lambda: app.jobs.get(running.id).status == states.STARTED, 30, "the job to start")
    publish_raw(app, backend.queue, "no.such.task", running.id, app.jobs.get(running.id).id)
    assert wait_for(lambda: len(app.jobs.dead_letters()) == 1, 30, "the dead letter")
    assert app.jobs.get(running.id).status == states.STARTED
    running.get(timeout=30)
    row = app.jobs.get(running.id)
    assert row.status == states.SUCCEEDED and row.attempts == 1


# -- item 5: a message the broker lost is sent again ----------------------------------


def _lose_messages(app, queue):
    """The broker loses the queue's messages (as a broker restarted without its data)."""
    with app.broker.connect() as conn:
        app.broker.declare(conn.default_channel, queue)
        kombu.Queue(queue, channel=conn.default_channel).purge()


def test_jobs_retry_requeues_a_queued_job_whose_message_was_lost(app, backend, start_worker):
    lost = jobs_project.add.delay(1, 2)
    assert wait_for(lambda: app.jobs.get(lost.id).status == states.QUEUED, 10, "queued")
    _lose_messages(app, backend.queue)
    start_worker()
    refused = heretic("jobs", "retry", lost.id)
    assert refused.returncode == 2 and "--requeue" in refused.stderr
    done = heretic("jobs", "retry", "--requeue", lost.id)
    assert done.returncode == 0, done.stderr
    assert lost.get(timeout=30) == 3
    assert "requeued, its message was lost" in " ".join(app.jobs.get(lost.id).attempt_logs)


def test_reconciler_publishes_again_queued_jobs_whose_messages_were_lost(
    app, backend, start_worker, monkeypatch
):
    monkeypatch.setenv("HERETIC_QUEUED_TIMEOUT", "2")
    monkeypatch.setenv("HERETIC_HEARTBEAT_INTERVAL", "0.5")
    monkeypatch.setenv("HERETIC_LEASE_TIMEOUT", "5")
    waiting = [jobs_project.add.delay(n, 1) for n in range(5)]
    _lose_messages(app, backend.queue)
    worker = start_worker()
    assert [r.get(timeout=40) for r in waiting] == [n + 1 for n in range(5)]
    assert "will be published again" in worker.log()


# -- item 8: a retried workflow step resumes its workflow -----------------------------


def test_retrying_a_failed_first_chain_step_resumes_the_chain(app, start_worker, tmp_path):
    start_worker()
    marker = tmp_path / "fixed"
    result = chain(ct.needs_file.s(str(marker)), jobs_project.echo.s(), jobs_project.echo.s())()
    first = result.parent.parent
    wait_for(lambda: app.jobs.get(result.id) is not None, 30, "the chain to fail")
    assert app.jobs.get(first.id).status == states.FAILED
    # A step that never ran cannot be retried without its parent's result: refused.
    never = heretic("jobs", "retry", result.parent.id)
    assert never.returncode == 2 and "never ran" in never.stderr, never.stderr
    assert app.jobs.get(result.parent.id).status == states.FAILED
    marker.write_text("ok")
    retried = heretic("jobs", "retry", first.id)
    assert retried.returncode == 0, retried.stderr
    assert wait_for(lambda: app.jobs.get(result.id).status == states.SUCCEEDED, 30, "the chain")
    assert result.get(timeout=5) == "found"
    assert jobs_project.add.delay(2, 2).get(timeout=30) == 4  # the worker still works


def test_retrying_a_failed_chord_header_job_completes_the_chord(app, start_worker, tmp_path):
    start_worker()
    marker = tmp_path / "fixed"
    result = chord(group(ct.needs_file.s(str(marker)), jobs_project.echo.s("b")), ct.collect.s())()
    wait_for(lambda: app.jobs.get(result.id) is not None, 30, "the chord to fail")
    body = app.jobs.get(result.id)
    assert body.status == states.FAILED
    failed_header = body.parent_id  # the header job whose failure failed the body
    assert app.jobs.get(failed_header).status == states.FAILED
    refused = heretic("jobs", "retry", result.id)  # the body never ran
    assert refused.returncode == 2 and "never ran" in refused.stderr, refused.stderr
    marker.write_text("ok")
    retried = heretic("jobs", "retry", failed_header)
    assert retried.returncode == 0, retried.stderr
    assert wait_for(lambda: app.jobs.get(result.id).status == states.SUCCEEDED, 30, "the body")
    assert result.get(timeout=5) == ["b", "found"]
