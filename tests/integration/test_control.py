"""Runtime controls with real workers: revoke (and terminate), time limits, Reject,
Ignore and rate_limit, on the embedded default and on PostgreSQL + RabbitMQ."""

from __future__ import annotations

import os
import signal

import jobs_project
import pytest
from helpers import wait_for, wait_queued

from heretic_kombu import states
from heretic_kombu.exceptions import Reject, TaskRevokedError, TimeLimitExceeded


def row(app, result):
    return app.store.get(result.id)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def dead_letters(app, queue):
    """Messages waiting in `queue`.dead (declared as heretic declares it)."""
    with app.broker.connect() as conn:
        channel = conn.default_channel
        try:
            _, count, _ = app.broker.dead_queue(queue)(channel).queue_declare()
        except conn.channel_errors as exc:
            if "NOT_FOUND" in str(exc):  # Redis keeps no empty queues
                return 0
            raise
    return int(count)


def revoked_events(backend, task_id):
    return [e for e in backend.events("task_revoked") if e["task_id"] == task_id]


# -- revoke --------------------------------------------------------------------------


def test_a_countdown_job_revoked_before_it_is_due_never_runs(app, backend, start_worker, tmp_path):
    start_worker()
    started, done = tmp_path / "started", tmp_path / "done"
    revoked = jobs_project.sleep_then_touch.apply_async((0, str(started), str(done)), countdown=1)
    assert app.control.revoke(revoked.id) == {revoked.id: "revoked"}
    # A job due at the same time shows the scheduler went past the revoked one.
    witness = jobs_project.add.apply_async((1, 1), countdown=1)
    assert witness.get(timeout=30) == 2
    with pytest.raises(TaskRevokedError, match="revoked"):
        revoked.get(timeout=10)
    job = row(app, revoked)
    assert job.status == states.REVOKED and job.error == "revoked" and job.attempts == 0
    assert len(job.attempt_logs) == 1 and "revoked by app.control.revoke" in job.attempt_logs[0]
    assert revoked.state == "REVOKED"
    assert not started.exists()


def test_a_revoked_job_whose_message_is_queued_is_dropped_by_the_worker(
    app, backend, start_worker, tmp_path
):
    started, done = tmp_path / "started", tmp_path / "done"
    revoked = jobs_project.sleep_then_touch.delay(0, str(started), str(done))
    wait_queued(app, revoked.id)
    revoked.revoke()  # AsyncResult.revoke, no worker running
    assert app.broker.queue_size(backend.queue) == 1  # the message is still queued
    start_worker()
    # The worker receives the message, finds nothing to claim, acks it and says so.
    events = wait_for(lambda: revoked_events(backend, revoked.id), 30, "task_revoked")
    assert events[0]["terminated"] is False and events[0]["expired"] is False
    assert jobs_project.add.delay(2, 2).get(timeout=30) == 4
    wait_for(lambda: app.broker.queue_size(backend.queue) == 0, 30, "an empty queue")
    job = row(app, revoked)
    assert job.status == states.REVOKED and job.attempts == 0 and job.worker is None
    assert not started.exists()


def test_revoke_without_terminate_lets_a_running_job_finish(app, start_worker, tmp_path):
    start_worker()
    started, done = tmp_path / "started", tmp_path / "done"
    result = jobs_project.sleep_then_touch.delay(1, str(started), str(done))
    wait_for(started.exists, 30, "the job to start")
    assert app.control.revoke(result.id) == {result.id: "running"}
    assert result.get(timeout=30) == "slept"
    job = row(app, result)
    assert job.status == states.SUCCEEDED and done.exists() and job.error is None
    # The request is in the history (invariant 8), then the attempt's own line.
    assert "revoke requested by app.control.revoke" in job.attempt_logs[0]
    assert len(job.attempt_logs) == 2 and "succeeded" in job.attempt_logs[1]
    # Revoking a finished job changes nothing.
    assert app.control.revoke(result.id) == {result.id: "finished"}
    assert row(app, result).status == states.SUCCEEDED


def test_revoking_a_job_claimed_but_not_started_drops_it(app, backend, start_worker, tmp_path):
    # One slot: the worker claims the second job with its prefetch, but it waits.
    worker = start_worker(concurrency=1)
    started, done = tmp_path / "started", tmp_path / "done"
    waiting_started, waiting_done = tmp_path / "waiting_started", tmp_path / "waiting_done"
    running = jobs_project.sleep_then_touch.delay(2, str(started), str(done))
    wait_for(started.exists, 30, "the first job to start")
    waiting = jobs_project.sleep_then_touch.delay(0, str(waiting_started), str(waiting_done))
    wait_for(lambda: row(app, waiting).status == states.STARTED, 15, "the second job's claim")
    assert not waiting_started.exists()
    assert app.control.revoke(waiting.id) == {waiting.id: "running"}  # claimed: maybe running
    with pytest.raises(TaskRevokedError, match="revoked"):
        waiting.get(timeout=15)
    assert running.get(timeout=30) == "slept"  # the running one ran to its end
    job = row(app, waiting)
    assert job.status == states.REVOKED and job.error == "revoked"
    assert job.attempts == 0 and job.started_at is None  # it never ran
    assert "revoke requested by app.control.revoke" in job.attempt_logs[0]
    assert "dropped by w1@" in job.attempt_logs[1] and "before it started" in job.attempt_logs[1]
    events = wait_for(lambda: revoked_events(backend, waiting.id), 15, "task_revoked")
    assert events[0]["terminated"] is False
    assert not waiting_started.exists()
    assert "revoked before it started: dropped" in worker.log()


def test_terminate_kills_the_running_job_and_the_worker_carries_on(
    app, backend, start_worker, tmp_path
):
    worker = start_worker(concurrency=1)
    started, done = tmp_path / "started", tmp_path / "done"
    result = jobs_project.sleep_then_touch.delay(30, str(started), str(done))
    wait_for(started.exists, 30, "the job to start")
    child = int(started.read_text())
    result.revoke(terminate=True)  # SIGTERM, Celery's default
    job = row(app, result)
    assert job.status == states.REVOKED and job.error == "terminated (SIGTERM)"
    wait_for(lambda: process_gone(child), 15, f"pool process {child} to be killed")
    events = wait_for(lambda: revoked_events(backend, result.id), 15, "task_revoked")
    assert events[0]["terminated"] is True and events[0]["signum"] == signal.SIGTERM
    # One slot, so this runs only once the killed child has been replaced.
    assert jobs_project.add.delay(3, 4).get(timeout=30) == 7
    assert worker.process.poll() is None
    with pytest.raises(TaskRevokedError, match="terminated"):
        result.get(timeout=5)
    job = row(app, result)
    assert job.status == states.REVOKED and job.attempts == 1
    assert len(job.attempt_logs) == 1  # nothing more recorded for the killed attempt
    assert "terminated (SIGTERM) by app.control.revoke" in job.attempt_logs[0]
    assert not done.exists()
    assert "terminated (SIGTERM); the job stays revoked" in worker.log()


# -- time limits -----------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_soft_time_limit_is_raised_inside_the_task(app, start_worker, pool):
    start_worker(pool=pool)
    result = jobs_project.soft_limited.delay(20)
    assert result.get(timeout=30) == "soft limit caught: soft time limit (0.5s) exceeded"
    assert row(app, result).status == states.SUCCEEDED


def test_hard_time_limit_fails_the_job_without_retry(app, backend, start_worker, tmp_path):
    worker = start_worker(concurrency=1)
    done = tmp_path / "done"
    result = jobs_project.hard_limited.delay(30, str(done))
    with pytest.raises(TimeLimitExceeded, match=r"hard time limit \(1s\) exceeded"):
        result.get(timeout=30)
    job = row(app, result)
    # Celery: a hard time limit is a FAILURE, not retried (max_retries=3 notwithstanding).
    assert job.status == states.FAILED and job.attempts == 1
    assert job.error == "TimeLimitExceeded: hard time limit (1s) exceeded"
    assert "failed: TimeLimitExceeded: hard time limit (1s) exceeded" in job.attempt_logs[0]
    # job_failed fires in the worker just after the commit that .get() saw.
    failed = wait_for(lambda: backend.events("job_failed"), 15, "job_failed")
    assert [e["status"] for e in failed] == [states.FAILED]
    # The child was replaced: the one slot runs the next job.
    assert jobs_project.add.delay(1, 2).get(timeout=30) == 3
    assert worker.process.poll() is None
    assert not done.exists()


def test_per_call_time_limit_overrides_the_tasks(app, start_worker, tmp_path):
    start_worker(concurrency=1)
    done = tmp_path / "done"
    result = jobs_project.sleep_then_touch.apply_async(
        (30, str(tmp_path / "started"), str(done)), time_limit=1
    )
    with pytest.raises(TimeLimitExceeded, match=r"hard time limit \(1(\.0)?s\) exceeded"):
        result.get(timeout=30)
    assert row(app, result).workflow == {"timelimit": [1, None]}
    assert not done.exists()
    with pytest.raises(ValueError, match="positive seconds"):
        jobs_project.add.apply_async((1, 2), soft_time_limit=-1)


# -- Reject and Ignore -----------------------------------------------------------------


def test_reject_dead_letters_the_message_and_fails_the_job(app, backend, start_worker):
    start_worker()
    result = jobs_project.rejecting.delay("bad payload")
    with pytest.raises(Reject, match="bad payload"):
        result.get(timeout=30)
    job = row(app, result)
    assert job.status == states.FAILED and job.attempts == 1
    assert job.error == "Reject: bad payload"
    assert "rejected: bad payload; message dead-lettered" in job.attempt_logs[0]
    errors = wait_for(lambda: backend.events("job_error"), 30, "job_error")
    assert errors[0]["task_id"] == result.id and "bad payload" in errors[0]["reason"]
    wait_for(lambda: dead_letters(app, backend.queue) == 1, 30, "the message in the dead queue")


def test_reject_with_requeue_runs_the_job_again(app, backend, start_worker):
    start_worker()
    result = jobs_project.reject_first_attempt.delay()
    assert result.get(timeout=30) == "accepted on attempt 2"
    job = row(app, result)
    assert job.status == states.SUCCEEDED and job.attempts == 2
    assert "rejected: not yet; requeued" in job.attempt_logs[0]
    # Bounded: a job that always asks to be requeued fails after its attempts.
    stubborn = jobs_project.rejecting.delay("never", requeue=True)
    with pytest.raises(Reject, match="never"):
        stubborn.get(timeout=30)
    job = row(app, stubborn)
    assert job.status == states.FAILED and job.attempts == 3  # max_retries=2
    assert all("requeued" in line for line in job.attempt_logs[:2])
    assert "but all 3 attempt(s) are used" in job.attempt_logs[2]
    wait_for(lambda: dead_letters(app, backend.queue) == 1, 30, "a dead letter")


def test_ignore_ends_the_job_in_a_terminal_status(app, start_worker):
    start_worker()
    result = jobs_project.ignoring.delay()
    assert result.get(timeout=30) is None
    job = row(app, result)
    assert job.status == states.IGNORED and job.finished_at is not None
    assert result.state == "IGNORED"
    assert "ignored (the task raised Ignore)" in job.attempt_logs[0]
    # The message was acked: the worker goes on.
    assert jobs_project.add.delay(1, 1).get(timeout=30) == 2


# -- rate_limit ------------------------------------------------------------------------


def test_rate_limit_spreads_a_tasks_jobs_and_does_not_slow_others(app, start_worker):
    start_worker(concurrency=4)
    limited = [jobs_project.limited.delay(i) for i in range(6)]
    other = jobs_project.add.delay(20, 22)
    assert other.get(timeout=30) == 42
    assert [r.get(timeout=60) for r in limited] == list(range(6))
    starts = sorted(row(app, r).started_at for r in limited)
    # "2/s" with Celery's bucket (one token, refilled every 0.5 s): at least 2.5 s from
    # the first start to the sixth; asserted loosely as a lower bound.
    assert (starts[-1] - starts[0]).total_seconds() >= 2.0
    # The other task was not held behind the rate-limited ones.
    assert row(app, other).finished_at < starts[-1]
