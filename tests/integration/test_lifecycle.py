"""The job lifecycle end to end, on the embedded default and on PostgreSQL + RabbitMQ.

Each case enqueues from this process and runs the jobs in real `heretic worker`
processes, then checks what a user sees: results, exceptions, states, and the row.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
import uuid

import jobs_project
import pytest
from helpers import unreachable_broker_url, wait_for, wait_queued

from heretic_kombu import exceptions, states


def row(app, result):
    return app.store.get(result.id)


def failed_events(backend, task_id):
    """The job_failed events of one job (fired by the worker just after its commit)."""
    return [e for e in backend.events("job_failed") if e["task_id"] == task_id]


def test_result_round_trip_and_the_row(app, start_worker):
    start_worker()
    result = jobs_project.add.delay(2, 3)
    assert result.get(timeout=30) == 5
    assert result.state == "SUCCESS" and result.successful() and result.ready()
    job = row(app, result)
    assert job.status == states.SUCCEEDED
    assert job.task_name == "jobs_project.add"
    assert job.payload == {"args": [2, 3], "kwargs": {}}
    assert job.result == 5 and job.attempts == 1
    assert len(job.attempt_logs) == 1 and "succeeded" in job.attempt_logs[0]
    assert job.worker.startswith("w1@") and job.started_at <= job.finished_at
    echo = jobs_project.echo.delay(
        {
            "when": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc),
            "id": uuid.UUID(int=7),
            "text": "héllo \\u0000",
        }
    )
    assert echo.get(timeout=30) == {
        "when": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc),
        "id": uuid.UUID(int=7),
        "text": "héllo \\u0000",
    }


def test_request_context_inside_the_task(app, start_worker):
    start_worker()
    result = jobs_project.whoami.delay()
    info = result.get(timeout=30)
    assert info == {"id": result.id, "retries": 0, "args": [], "hostname": info["hostname"]}
    assert info["hostname"].startswith("w1@")


def test_exception_comes_back_with_its_type_and_message(app, start_worker):
    start_worker()
    builtin = jobs_project.fail.delay("boom")
    with pytest.raises(ValueError, match="^boom$"):
        builtin.get(timeout=30)
    custom = jobs_project.charge.delay(42)
    with pytest.raises(jobs_project.PaymentDeclined, match="card declined for 42"):
        custom.get(timeout=30)
    assert custom.state == "FAILURE" and custom.failed()
    assert "PaymentDeclined: card declined for 42" in custom.traceback
    job = row(app, custom)
    assert job.status == states.FAILED and job.attempts == 1
    assert job.error == "PaymentDeclined: card declined for 42"
    assert "failed: PaymentDeclined" in job.attempt_logs[0]


def test_propagate_false_returns_the_exception(app, start_worker):
    start_worker()
    result = jobs_project.fail.delay("quiet")
    value = result.get(timeout=30, propagate=False)
    assert isinstance(value, ValueError) and str(value) == "quiet"
    assert isinstance(result.result, ValueError)


def test_get_times_out_with_celerys_exception(app):
    result = jobs_project.add.delay(1, 1)  # no worker runs
    with pytest.raises(exceptions.TimeoutError):
        result.get(timeout=0.3)
    assert result.state == "PENDING"
    wait_queued(app, result.id)


def test_retries_with_backoff_then_success(app, start_worker, backend):
    start_worker()
    result = jobs_project.flaky.delay(3)
    assert result.get(timeout=30) == "ok on attempt 3"
    job = row(app, result)
    assert job.status == states.SUCCEEDED and job.attempts == 3 and job.max_attempts == 4
    assert [line.split(": ", 1)[1].split(" ", 1)[0] for line in job.attempt_logs] == [
        "failed:",
        "failed:",
        "succeeded",
    ]
    assert "ConnectionError: attempt 1 failed; retry at" in job.attempt_logs[0]
    failed = backend.events("job_failed")
    assert [e["attempts"] for e in failed if e["task_id"] == result.id] == [1, 2]
    assert all(e["status"] == states.RETRYING for e in failed)


def test_retries_exhausted(app, start_worker, backend):
    start_worker()
    auto = jobs_project.always_down.delay()
    with pytest.raises(ConnectionError, match="service down"):
        auto.get(timeout=30)
    job = row(app, auto)
    assert job.status == states.FAILED and job.attempts == 3  # max_retries=2: three runs
    assert len(job.attempt_logs) == 3
    # job_failed fires in the worker just after the commit that .get() saw.
    wait_for(lambda: len(failed_events(backend, auto.id)) == 3, 15, "the last job_failed")
    statuses = [e["status"] for e in failed_events(backend, auto.id)]
    assert statuses == [states.RETRYING, states.RETRYING, states.FAILED]

    bare = jobs_project.retry_without_exc.delay()
    with pytest.raises(exceptions.MaxRetriesExceededError):
        bare.get(timeout=30)
    assert row(app, bare).attempts == 2


def test_countdown_and_eta_are_not_run_early(app, start_worker):
    start_worker()
    sent = time.time()
    by_countdown = jobs_project.add.apply_async((1, 2), countdown=2)
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)
    by_eta = jobs_project.add.apply_async((3, 4), eta=eta)
    assert row(app, by_countdown).status == states.SCHEDULED
    assert by_countdown.state == "PENDING"
    time.sleep(1.0)
    assert row(app, by_countdown).status == states.SCHEDULED
    assert row(app, by_eta).status == states.SCHEDULED
    assert by_countdown.get(timeout=30) == 3 and by_eta.get(timeout=30) == 7
    assert row(app, by_countdown).started_at.timestamp() >= sent + 2
    assert row(app, by_eta).started_at >= eta


def test_expired_job_never_runs_and_is_revoked(app, start_worker):
    past = jobs_project.add.apply_async((1, 1), expires=0.2)
    scheduled = jobs_project.add.apply_async((1, 1), countdown=0.5, expires=0.3)
    time.sleep(0.6)
    start_worker()
    for result in (past, scheduled):
        with pytest.raises(exceptions.TaskRevokedError):
            result.get(timeout=30)
        assert result.state == "REVOKED"
        job = row(app, result)
        assert job.status == states.REVOKED and job.attempts == 0 and job.started_at is None


def test_row_status_at_every_step(app, start_worker, tmp_path):
    marker = tmp_path / "started"
    result = jobs_project.slow.delay(1.5, str(marker))
    assert row(app, result).status in (states.PENDING, states.QUEUED)  # until confirmed
    wait_queued(app, result.id)
    assert result.state == "PENDING"
    start_worker()
    wait_for(marker.exists, 30, "the job to start")
    assert row(app, result).status == states.STARTED and result.state == "STARTED"
    assert result.get(timeout=30) == 1.5
    assert row(app, result).status == states.SUCCEEDED

    retried = jobs_project.flaky.apply_async((2,))
    wait_for(
        lambda: row(app, retried).status in (states.RETRYING, states.SUCCEEDED),
        30,
        "the first attempt to fail",
    )
    assert retried.get(timeout=30) == "ok on attempt 2"


def test_non_json_arguments_fail_at_delay_and_write_nothing(app, backend):
    with pytest.raises(exceptions.EncodeError):
        jobs_project.echo.delay(object())
    with pytest.raises(exceptions.EncodeError):
        jobs_project.echo.delay("nul \x00 byte")
    with pytest.raises(exceptions.EncodeError):
        jobs_project.echo.delay(float("nan"))
    assert app.store.list() == []
    assert app.broker.queue_size(backend.queue) == 0


def test_original_heretic_api_process_enqueue_and_events(app, start_worker, backend):
    start_worker()
    ok = app.enqueue("report.build", {"customer": "acme"})
    assert ok.get(timeout=30) == {"customer": "acme", "attempt": 1}
    bad = app.enqueue("report.build", {"customer": "globex", "fail": True}, max_attempts=3)
    with pytest.raises(RuntimeError, match="report for globex failed"):
        bad.get(timeout=60)
    job = row(app, bad)
    assert job.status == states.FAILED and job.attempts == 3 and job.max_attempts == 3
    assert job.payload == {"args": [{"customer": "globex", "fail": True}], "kwargs": {}}
    wait_for(lambda: len(failed_events(backend, bad.id)) == 3, 15, "the last job_failed")
    failed = failed_events(backend, bad.id)
    assert [e["attempts"] for e in failed] == [1, 2, 3]
    assert failed[-1]["status"] == states.FAILED


def test_prefork_child_death_is_a_lost_attempt_then_failure(app, start_worker):
    worker = start_worker()
    result = jobs_project.die.delay()
    with pytest.raises(exceptions.WorkerLostError):
        result.get(timeout=30)
    job = row(app, result)
    assert job.attempts == 2 and job.status == states.FAILED  # max_retries=1
    assert all("lost" in line for line in job.attempt_logs)
    assert jobs_project.add.delay(1, 2).get(timeout=30) == 3  # the pool replaced the child
    assert worker.process.poll() is None


def test_worker_sigkilled_mid_job_runs_it_again_on_a_new_worker(app, start_worker, tmp_path):
    marker = tmp_path / "started"
    first = start_worker()
    result = jobs_project.slow.delay(1.0, str(marker))
    wait_for(marker.exists, 30, "the job to start")
    first.kill()
    marker.unlink()
    second = start_worker()
    assert result.get(timeout=60) == 1.0
    job = row(app, result)
    assert job.status == states.SUCCEEDED and job.attempts == 2
    assert len(job.attempt_logs) == 2
    assert "attempt 1 on w1@" in job.attempt_logs[0] and "lost" in job.attempt_logs[0]
    assert "attempt 2 on w2@" in job.attempt_logs[1] and "succeeded" in job.attempt_logs[1]
    assert second.process.poll() is None


def test_sigterm_finishes_running_jobs_and_loses_nothing(app, start_worker, tmp_path):
    marker = tmp_path / "started"
    results = [jobs_project.slow.delay(0.5, str(marker)) for _ in range(12)]
    first = start_worker(concurrency=2)
    wait_for(marker.exists, 30, "a job to start")
    # More jobs claimed than the pool runs at once: some wait in the pool for a slot.
    # (A broker that delivers one message at a time could otherwise be stopped with
    # only the running pair claimed, and there would be nothing to hand back.)
    wait_for(
        lambda: [row(app, r).status for r in results].count(states.STARTED) > 2,
        30,
        "more jobs claimed than run at once",
    )
    assert first.terminate(timeout=30) == 0
    log = first.log()
    assert "warm shutdown" in log
    rows = [row(app, r) for r in results]
    statuses = [job.status for job in rows]
    assert states.STARTED not in statuses  # running jobs were finished and recorded
    assert statuses.count(states.SUCCEEDED) >= 1
    # Jobs claimed with the prefetch but not started were handed back, uncounted.
    assert "handed back" in log
    waiting = [job for job in rows if job.status != states.SUCCEEDED]
    assert waiting and all(job.status == states.QUEUED for job in waiting)
    assert all(job.attempts == 0 and job.worker is None for job in waiting)
    start_worker(concurrency=2)
    assert [r.get(timeout=60) for r in results] == [0.5] * 12
    assert all(row(app, r).attempts == 1 for r in results)  # nothing ran twice


def test_second_signal_exits_at_once_and_the_job_is_redelivered(app, start_worker, tmp_path):
    marker = tmp_path / "started"
    result = jobs_project.slow.delay(3, str(marker))
    first = start_worker()
    wait_for(marker.exists, 30, "the job to start")
    first.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(timeout=10) == 1  # did not wait for the 3 s job
    start_worker()
    assert result.get(timeout=60) == 3
    assert row(app, result).attempts == 2


def test_worker_consumes_only_its_queues(app, start_worker, backend):
    mail = f"{backend.queue}_mail"
    start_worker("-Q", f"{mail},{backend.queue}")
    to_mail = jobs_project.add.apply_async((1, 1), queue=mail)
    to_default = jobs_project.add.apply_async((2, 2))
    assert to_mail.get(timeout=30) == 2 and to_default.get(timeout=30) == 4
    assert row(app, to_mail).queue_name == mail
    other = jobs_project.add.apply_async((3, 3), queue=f"{backend.queue}_other")
    with pytest.raises(exceptions.TimeoutError):
        other.get(timeout=1.0)
    assert row(app, other).status == states.QUEUED
    if backend.name == "services":
        from helpers import delete_queues

        for name in (mail, f"{backend.queue}_other"):
            delete_queues(name)


def test_job_survives_a_publish_that_fails_after_commit(
    app, start_worker, backend, monkeypatch, tmp_path
):
    monkeypatch.setenv("HERETIC_BROKER_URL", unreachable_broker_url(backend, tmp_path))
    from heretic_kombu import Heretic

    producer = Heretic("unreachable")
    try:
        result = jobs_project.add.delay(1, 2)  # accepted: its row is committed
        assert producer.store.get(result.id).status == states.PENDING
        assert result.state == "PENDING"
    finally:
        producer.close()
    monkeypatch.setenv("HERETIC_BROKER_URL", backend.broker_url)
    worker = start_worker()
    assert app.AsyncResult(result.id).get(timeout=30) == 3  # the reconciler published it
    assert app.store.get(result.id).attempts == 1
    assert "left pending will be published" in worker.log()


def test_job_of_a_vanished_worker_is_found_by_its_expired_lease(app, start_worker):
    import sqlalchemy as sa

    from heretic_kombu.store import jobs

    result = jobs_project.add.apply_async((4, 4), countdown=3600)  # no message anywhere
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    with app.store.engine.begin() as conn:  # as if a worker claimed it, then vanished
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.task_id == result.id)
            .values(
                status="started",
                attempts=1,
                worker="ghost@nowhere",
                updated_at=long_ago,
                started_at=long_ago,
            )
        )
    if app.store.is_postgresql:  # the trigger stamps updated_at; set it back behind its back
        with app.store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE heretic_jobs DISABLE TRIGGER USER")
            conn.execute(
                sa.update(jobs).where(jobs.c.task_id == result.id).values(updated_at=long_ago)
            )
            conn.exec_driver_sql("ALTER TABLE heretic_jobs ENABLE TRIGGER USER")
    start_worker()
    assert result.get(timeout=30) == 8
    job = row(app, result)
    assert job.attempts == 2 and len(job.attempt_logs) == 2
    assert "attempt 1 on ghost@nowhere: lost: no heartbeat since" in job.attempt_logs[0]
    assert "succeeded" in job.attempt_logs[1]


def test_a_long_job_keeps_its_lease_and_runs_once(app, start_worker, tmp_path):
    start_worker(pool="solo")  # the solo pool blocks the main loop while the job runs
    start_worker(pool="solo")
    result = jobs_project.slow.delay(4.0)  # longer than the 1.5 s lease
    assert result.get(timeout=30) == 4.0
    job = row(app, result)
    assert job.attempts == 1 and len(job.attempt_logs) == 1


def test_huge_and_deep_payloads_are_handled_or_refused_clearly(app, start_worker):
    start_worker()
    big = "x" * (10 * 1024 * 1024)  # 10 MB
    result = jobs_project.echo.delay(big)
    assert result.get(timeout=60) == big
    nested: list = []
    for _ in range(1000):
        nested = [nested]
    with pytest.raises(exceptions.EncodeError, match="cannot encode as JSON"):
        jobs_project.echo.delay(nested)
    shallow: list = []
    for _ in range(100):
        shallow = [shallow]
    assert jobs_project.echo.delay(shallow).get(timeout=30) == shallow
    assert len(app.store.list()) == 2  # the refused one left no row


def test_worker_and_task_signals_fire_in_the_right_processes(app, start_worker, backend):
    worker = start_worker(concurrency=2)  # prefork
    result = jobs_project.add.delay(1, 1)
    assert result.get(timeout=30) == 2
    assert [e["event"] for e in backend.events("worker_ready")] == ["worker_ready"]
    children = {e["pid"] for e in backend.events("worker_process_init")}
    assert len(children) == 2 and worker.pid not in children
    postrun = [e for e in backend.events("task_postrun") if e["task_id"] == result.id]
    assert [(e["state"], e["task"]) for e in postrun] == [("SUCCESS", "jobs_project.add")]
    assert postrun[0]["pid"] in children  # task signals fire in the pool process


def test_update_state_shows_progress_while_running(app, start_worker, tmp_path):
    marker, release = tmp_path / "running", tmp_path / "release"
    start_worker()
    result = jobs_project.progress.delay(str(marker), str(release))
    wait_for(marker.exists, 30, "the job to report progress")
    assert result.state == "PROGRESS" and result.info == {"done": 1, "of": 2}
    assert row(app, result).status == states.STARTED
    release.write_text("go")
    assert result.get(timeout=30) == "done"
    assert result.state == "SUCCESS" and result.info == "done"


def test_expected_errors_in_throws_are_failures_logged_at_info(app, start_worker):
    import canvas_tasks

    worker = start_worker()
    result = canvas_tasks.reserve.delay("socks")
    with pytest.raises(canvas_tasks.OutOfStock, match="no socks left"):
        result.get(timeout=30)
    assert app.store.get(result.id).status == states.FAILED
    line = wait_for(
        lambda: [ln for ln in worker.log().splitlines() if result.id in ln and "failed" in ln],
        10,
        "the failure's log line",
    )[0]
    assert "INFO" in line and "ERROR" not in line


def test_a_10_mb_payload_runs_and_1000_deep_nesting_is_refused(app, start_worker):
    start_worker()
    big = "x" * (10 * 1024 * 1024)
    result = jobs_project.echo.delay(big)
    assert result.get(timeout=60) == big
    deep: list = []
    node = deep
    for _ in range(1000):
        node.append([])
        node = node[0]
    with pytest.raises(exceptions.EncodeError, match="recursion"):
        jobs_project.echo.delay(deep)
    assert [j.task_id for j in app.store.list()] == [result.id]  # nothing half-written


def test_prefetch_grows_while_jobs_are_short_and_shrinks_for_long_ones(app, start_worker):
    # Two slots: prefetch 2 x 4 as configured, 2 x 64 while jobs take a few ms.
    worker = start_worker(concurrency=2)
    assert "prefetch 8" in worker.log()
    quick = [jobs_project.add.delay(i, i) for i in range(30)]
    assert [r.get(timeout=30) for r in quick] == [2 * i for i in range(30)]
    wait_for(lambda: "prefetch 128 (jobs take" in worker.log(), 15, "the short-job prefetch")
    slow = [jobs_project.slow.delay(0.3) for _ in range(4)]
    assert [r.get(timeout=30) for r in slow] == [0.3] * 4
    wait_for(lambda: "prefetch 8 (jobs take" in worker.log(), 15, "the configured prefetch")


def test_a_turn_claims_and_records_alike_in_one_statement_or_one_transaction(app):
    """The worker's turn that only claims, or only records, is one statement (on
    PostgreSQL, autocommit on the driver); one that does both is a transaction. The rows
    and answers are the same either way, and a stale attempt or a taken job is refused."""
    from heretic_kombu import serialization
    from heretic_kombu.store import Attempt, AttemptResult, NewJob

    store = app.store
    store.ensure_schema()
    parent = str(uuid.uuid4())
    new = [
        NewJob(
            task_id=str(uuid.uuid4()),
            task_name="t",
            queue_name="q",
            payload=serialization.dumps({"args": [i], "kwargs": {"k": "v"}}),
            max_attempts=2,
            parent_id=parent,
        )
        for i in range(3)
    ]
    store.insert_plan(new)
    first, second, third = (job.task_id for job in new)

    def done(task_id, attempt):
        line = f"attempt {attempt} done"
        result = serialization.RawJSON('{"ok": 1}')
        return Attempt(task_id, attempt, AttemptResult(states.SUCCEEDED, line, result=result))

    answers, claimed = store.record_and_claim([], [first], "w")  # claim alone
    assert answers == [] and list(claimed) == [first]
    job = claimed[first]
    assert (job.status, job.attempts, job.worker, job.parent_id) == ("started", 1, "w", parent)
    assert (job.args, job.kwargs) == ([0], {"k": "v"})
    assert store.record_and_claim([], [first], "w")[1] == {}  # taken: nothing to claim

    # Both in one turn: a transaction.
    answers, claimed = store.record_and_claim([done(first, 1)], [second, third], "w")
    assert answers == [[]] and sorted(claimed) == sorted([second, third])
    assert all(isinstance(j.task_id, str) and j.status == "started" for j in claimed.values())

    # Record alone, with a stale attempt beside a current one.
    answers, _ = store.record_and_claim([done(second, 1), done(third, 7)], [], "w")
    assert answers == [[], None]
    for task_id in (first, second):
        row_now = store.get(task_id)
        assert (row_now.status, row_now.result, row_now.attempt_logs) == (
            "succeeded",
            {"ok": 1},
            ["attempt 1 done"],
        )
        assert store.status_of(task_id) == "succeeded"
    assert store.get(third).status == "started"
    assert store.get(str(uuid.uuid4())) is None and store.status_of(str(uuid.uuid4())) is None
