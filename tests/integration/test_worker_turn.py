"""The worker's turn on PostgreSQL and RabbitMQ: the record of ended attempts and the
claim of arrived messages as one statement (JobStore.record_and_claim), and the acks of
a turn in as few frames as their delivery tags allow (Subscription.ack_many)."""

from __future__ import annotations

import time

import jobs_project
import pytest
import sqlalchemy as sa
from helpers import wait_for, wait_queued

from heretic_kombu import states
from heretic_kombu.store import Attempt, AttemptResult

ON_SERVICES = [pytest.param("services", marks=pytest.mark.services)]


@pytest.mark.parametrize("backend", ON_SERVICES, indirect=True)
def test_one_statement_records_claims_and_announces(app, backend):
    store = app.store
    ids = [jobs_project.add.delay(i, i).id for i in range(4)]
    for task_id in ids:
        wait_queued(app, task_id, timeout=5)
    answers, claimed = store.record_and_claim([], ids[:2], "w1")
    assert answers == [] and set(claimed) == set(ids[:2])
    for task_id in ids[:2]:  # the row as it is now, every column
        assert claimed[task_id] == store.get(task_id)
    assert claimed[ids[0]].args == [0, 0] and claimed[ids[0]].attempts == 1

    listener = store.listen()
    ended = [
        Attempt(ids[0], 1, AttemptResult(states.SUCCEEDED, "done", result="0")),
        Attempt(ids[1], 2, AttemptResult(states.SUCCEEDED, "stale")),  # not the current attempt
    ]
    # ids[0] is recorded and not claimed again by the same statement; ids[2] is claimed.
    answers, claimed = store.record_and_claim(ended, [ids[0], ids[2]], "w1")
    assert answers == [[], None]
    assert set(claimed) == {ids[2]}
    assert listener is not None and listener.wait(ids[0], 5)
    done = store.get(ids[0])
    assert done.status == states.SUCCEEDED and done.result == 0
    assert done.attempt_logs == ["done"] and done.finished_at is not None
    assert store.get(ids[1]).status == states.STARTED  # the stale attempt changed nothing
    assert store.get(ids[3]).status == states.QUEUED
    # Invariant 3: a redelivered message of a finished (or running) job claims nothing.
    assert store.record_and_claim([], [ids[0], ids[2]], "w2") == ([], {})
    assert store.get(ids[0]) == done


@pytest.mark.parametrize("backend", ON_SERVICES, indirect=True)
def test_ack_many_acks_exactly_the_deliveries_given(app, backend):
    for i in range(6):
        jobs_project.add.delay(i, 0)
    received = []
    subscription = app.broker.subscribe([backend.queue], received.append, 6)
    try:
        deadline = time.monotonic() + 10
        while len(received) < 6 and time.monotonic() < deadline:
            subscription.drain(0.2)
        assert len(received) == 6
        first, second, third, fourth, fifth, sixth = received
        subscription.ack(second)
        # One multiple ack up to third (second, acked already, is no hole), then fifth
        # alone: fourth is still held, so no multiple ack may cover fifth.
        subscription.ack_many([first, third, fifth])
    finally:
        subscription.close()
    # Closing the connection gives back what was not acked: fourth and sixth only (an
    # ack of an unknown or settled tag would have closed the channel: all six back).
    assert app.broker.queue_size(backend.queue) == 2


@pytest.mark.parametrize("backend", ON_SERVICES, indirect=True)
def test_a_worker_killed_before_its_outcome_commits_leaves_the_message_to_redeliver(
    app, backend, start_worker, tmp_path
):
    """Invariant 2: a message is acked only after its outcome is committed. The test
    holds the job's row locked so the worker's record waits, kills the worker there,
    and the message must be back in the queue: had the ack gone before the commit, the
    job would live on only in its ``started`` row, until its lease ran out."""
    marker = tmp_path / "started"
    result = jobs_project.slow.delay(0.2, str(marker))
    first = start_worker()
    wait_for(marker.exists, 30, "the job to start")
    url = backend.database_url.replace("postgresql://", "postgresql+psycopg2://")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as holder, engine.connect() as watcher:
            watcher.execution_options(isolation_level="AUTOCOMMIT")  # fresh views each time
            holder.execute(
                sa.text("SELECT 1 FROM heretic_jobs WHERE task_id = :id FOR UPDATE"),
                {"id": result.id},
            )
            # The job ends; the worker's statement recording it waits for the row lock.
            blocked = sa.text(
                "SELECT pid FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            wait_for(lambda: watcher.execute(blocked).first() is not None, 30, "the record")
            first.kill()
            # The statement dies with its client (autocommit: it never commits).
            for (pid,) in watcher.execute(blocked):
                watcher.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            holder.rollback()
    finally:
        engine.dispose()
    assert app.store.get(result.id).status == states.STARTED  # the outcome was lost
    # ...and the message, never acked, is back in the queue for the next worker.
    wait_for(lambda: app.broker.queue_size(backend.queue) == 1, 10, "the message back")
    start_worker()
    assert result.get(timeout=30) == 0.2
    job = app.store.get(result.id)
    assert job.status == states.SUCCEEDED and job.attempts == 2
    assert "lost" in job.attempt_logs[0] and "succeeded" in job.attempt_logs[1]


@pytest.mark.parametrize("backend", ON_SERVICES, indirect=True)
def test_a_job_that_ends_while_a_turn_waits_keeps_its_lease(app, backend, start_worker, tmp_path):
    """A job whose outcome waits for the next turn is still this worker's: its lease is
    renewed and no reconciler takes it for lost, however long the turn before takes
    (here a row lock holds it 5 s, over three leases of 1.5 s)."""
    first, second = tmp_path / "first", tmp_path / "second"
    start_worker(concurrency=2)
    early = jobs_project.slow.delay(0.5, str(first))
    late = jobs_project.slow.delay(1.0, str(second))
    wait_for(lambda: first.exists() and second.exists(), 30, "both jobs to start")
    url = backend.database_url.replace("postgresql://", "postgresql+psycopg2://")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as holder:
            # The early job's record waits on this lock; the late job ends meanwhile.
            holder.execute(
                sa.text("SELECT 1 FROM heretic_jobs WHERE task_id = :id FOR UPDATE"),
                {"id": early.id},
            )
            time.sleep(5)
            holder.rollback()
    finally:
        engine.dispose()
    assert early.get(timeout=30) == 0.5 and late.get(timeout=30) == 1.0
    job = app.store.get(late.id)
    assert job.status == states.SUCCEEDED and job.attempts == 1, job.attempt_logs
    assert len(job.attempt_logs) == 1 and "lost" not in job.attempt_logs[0]
