"""The prefork pool sends each busy process its next job ahead (heretic_kombu.worker.pool).

Each test queues its jobs before the worker starts, so the worker claims them in one
turn and the pool holds one of them ahead, in a busy process's pipe; what a user sees
must be what it would be if the job had waited in the worker: a revoke still drops it,
it does not wait behind a long job while a process is idle, and a process that dies
does not take it down too.
"""

from __future__ import annotations

import jobs_project
from helpers import wait_for, wait_queued

from heretic_kombu import states


def row(app, result):
    return app.store.get(result.id)


def queue_before_the_worker(app, *signatures):
    results = [signature.delay() for signature in signatures]
    for result in results:
        wait_queued(app, result.id)
    return results


def test_a_job_held_ahead_and_revoked_never_runs(app, start_worker, tmp_path):
    started, done = tmp_path / "started", tmp_path / "done"
    ahead_started, ahead_done = tmp_path / "ahead_started", tmp_path / "ahead_done"
    running, ahead = queue_before_the_worker(
        app,
        jobs_project.sleep_then_touch.s(1.5, str(started), str(done)),
        jobs_project.sleep_then_touch.s(0, str(ahead_started), str(ahead_done)),
    )
    worker = start_worker(concurrency=1)
    wait_for(started.exists, 30, "the first job to start")
    wait_for(lambda: row(app, ahead).status == states.STARTED, 15, "the second job's claim")
    assert app.control.revoke(ahead.id) == {ahead.id: "running"}  # claimed: maybe running
    assert running.get(timeout=30) == "slept"
    job = wait_for(
        lambda: (job := row(app, ahead)).status == states.REVOKED and job, 15, "the drop"
    )
    assert job.attempts == 0 and job.started_at is None
    assert "revoked before it started: dropped" in worker.log()
    # The process goes on to the next job, past the one it was sent and told to skip.
    assert jobs_project.add.delay(2, 3).get(timeout=30) == 5
    assert not ahead_started.exists()


def test_a_short_job_does_not_wait_behind_a_long_one_while_a_process_is_idle(
    app, start_worker, tmp_path
):
    marker = tmp_path / "long_started"
    long, *short = queue_before_the_worker(
        app, jobs_project.slow.s(6, str(marker)), *[jobs_project.add.s(i, i) for i in range(3)]
    )
    start_worker(concurrency=2)
    # One short job was sent ahead to the process that runs the long one; the other
    # process, idle once its own short jobs are done, must take it over.
    assert [result.get(timeout=5) for result in short] == [0, 2, 4]
    assert row(app, long).status == states.STARTED
    assert all(row(app, result).attempts == 1 for result in short)
    assert long.get(timeout=30) == 6


def test_a_process_that_dies_hands_on_the_job_it_was_sent_ahead(app, start_worker):
    dying, ahead = queue_before_the_worker(app, jobs_project.die.s(), jobs_project.add.s(4, 5))
    worker = start_worker(concurrency=1)
    assert ahead.get(timeout=30) == 9
    job = row(app, ahead)
    assert job.status == states.SUCCEEDED and job.attempts == 1
    assert len(job.attempt_logs) == 1 and "lost" not in job.attempt_logs[0]
    wait_for(lambda: row(app, dying).attempts == 2, 30, "the dying job's second attempt")
    assert all("lost" in line for line in row(app, dying).attempt_logs)
    assert worker.process.poll() is None
