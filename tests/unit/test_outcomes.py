"""The worker's outcome decisions, alone: a pool's report in, what the row gets out."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import pytest

from heretic_kombu import execution, states
from heretic_kombu.execution import Outcome
from heretic_kombu.status import Status
from heretic_kombu.store import Job
from heretic_kombu.worker.outcomes import (
    Ending,
    attempt_result,
    ignored_result,
    lost_attempt,
    rejection,
)

NOW = dt.datetime(2024, 5, 17, 12, 30, 0, 250000, tzinfo=dt.timezone.utc)
STAMP = "2024-05-17T12:30:00.250000Z"


def make_job(attempts: int = 1, max_attempts: int = 3, **fields: Any) -> Job:
    values: dict[str, Any] = {
        "id": 7,
        "task_id": "7f0c2d3e-0000-4000-8000-000000000007",
        "task_name": "proj.add",
        "queue_name": "celery",
        "status": states.STARTED,
        "payload": {"args": [1, 2], "kwargs": {"z": 3}},
        "attempt_logs": [],
        "attempts": attempts,
        "max_attempts": max_attempts,
        "created_at": NOW,
        "updated_at": NOW,
        "last_attempted_at": NOW,
        "eta": None,
        "expires_at": None,
        "priority": None,
        "result": None,
        "error": None,
        "traceback": None,
        "parent_id": None,
        "root_id": None,
        "group_id": None,
        "worker": "w1@host",
        "started_at": NOW,
        "finished_at": None,
    }
    values.update(fields)
    return Job(**values)


def failure_report(status: str, **extra: Any) -> dict[str, Any]:
    report = {
        "status": status,
        "exc": {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"},
        "error": "ValueError: boom",
        "traceback": "Traceback ...\nValueError: boom\n",
        "runtime": 0.5,
    }
    report.update(extra)
    return report


def test_old_constant_names_are_the_enum_spelled_as_the_row_statuses() -> None:
    assert execution.SUCCEEDED is Outcome.SUCCEEDED
    assert execution.RETRY == states.RETRYING == Status.RETRYING == "retrying"  # one spelling
    assert [m.value for m in Outcome] == [
        "succeeded",
        "retrying",
        "failed",
        "lost",
        "rejected",
        "ignored",
    ]
    assert f"{Outcome.LOST}" == "lost" and str(Outcome.IGNORED) == "ignored"
    assert json.dumps({"status": Outcome.FAILED}) == '{"status": "failed"}'


def test_report_is_read_once_into_a_frozen_typed_ending() -> None:
    ending = Ending.from_report(
        {"status": "retrying", "when": "2024-05-17T13:00:00+00:00", "runtime": None}
    )
    assert ending.status is Outcome.RETRY
    assert ending.when == dt.datetime(2024, 5, 17, 13, 0, tzinfo=dt.timezone.utc)
    assert ending.runtime == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        ending.status = Outcome.FAILED  # type: ignore[misc]
    with pytest.raises(ValueError):
        Ending.from_report({"status": "queued"})  # a row status, not an outcome


def test_success_records_the_value_and_runtime() -> None:
    ending = Ending.from_report({"status": "succeeded", "result": "[1, 2]", "runtime": 0.0125})
    result = attempt_result(make_job(), ending, now=NOW, worker="w2@host")
    assert result.status == states.SUCCEEDED
    assert result.result == "[1, 2]"
    assert result.log_line == f"{STAMP} attempt 1 on w2@host: succeeded in 0.013s"
    assert result.eta is None and result.error is None


def test_success_with_ignored_result_stores_no_value() -> None:
    ending = Ending.from_report({"status": "succeeded", "result": None})
    assert attempt_result(make_job(), ending, now=NOW, worker="w").result is None


def test_retry_with_countdown_is_due_that_many_seconds_later() -> None:
    ending = Ending.from_report(failure_report("retrying", when=30))
    result = attempt_result(make_job(attempts=1, max_attempts=3), ending, now=NOW, worker="w")
    assert result.status == states.RETRYING
    assert result.eta == NOW + dt.timedelta(seconds=30)
    assert result.log_line.endswith(
        "failed: ValueError: boom; retry at 2024-05-17T12:30:30.250000Z"
    )
    assert result.error == "ValueError: boom"
    assert result.traceback == "Traceback ...\nValueError: boom\n"
    assert json.loads(result.result or "null")["exc_type"] == "ValueError"
    assert result.max_attempts is None and result.payload is None


def test_retry_with_eta_and_new_arguments_and_max_retries() -> None:
    eta = dt.datetime(2024, 5, 18, 9, 0, tzinfo=dt.timezone.utc)
    report = failure_report("retrying", when=eta.isoformat(), max_retries=5, args=[10], kwargs=None)
    result = attempt_result(make_job(), Ending.from_report(report), now=NOW, worker="w")
    assert result.eta == eta
    assert result.max_attempts == 6  # max_retries=5: six attempts in all
    # Only the arguments the retry changed are replaced.
    assert json.loads(result.payload or "null") == {"args": [10], "kwargs": {"z": 3}}


def test_failure_is_final() -> None:
    ending = Ending.from_report(failure_report("failed"))
    result = attempt_result(make_job(attempts=1, max_attempts=3), ending, now=NOW, worker="w")
    assert result.status == states.FAILED
    assert result.eta is None
    assert result.log_line == f"{STAMP} attempt 1 on w: failed: ValueError: boom"


def test_lost_attempt_with_attempts_left_retries_now() -> None:
    ending = Ending.from_report({"status": "lost", "error": "worker process 9 exited"})
    result = attempt_result(make_job(attempts=2, max_attempts=3), ending, now=NOW, worker="w")
    assert result.status == states.RETRYING
    assert result.eta == NOW
    assert result.error == "WorkerLostError: worker process 9 exited"
    assert result.log_line.endswith("lost: worker process 9 exited; retry now")


def test_lost_last_attempt_fails_the_job() -> None:
    ending = Ending.from_report({"status": "lost", "error": "worker process 9 exited"})
    result = attempt_result(make_job(attempts=3, max_attempts=3), ending, now=NOW, worker="w")
    assert result.status == states.FAILED
    assert result.eta is None
    assert result.log_line == f"{STAMP} attempt 3 on w: lost: worker process 9 exited"
    assert "WorkerLostError" in (result.error or "")


def test_reject_and_ignore_are_not_decided_as_ordinary_endings() -> None:
    with pytest.raises(AssertionError):
        attempt_result(make_job(), Ending(Outcome.IGNORED), now=NOW, worker="w")


def test_ignore_ends_the_job_ignored() -> None:
    result = ignored_result(make_job(attempts=2), now=NOW, worker="w")
    assert result.status == states.IGNORED
    assert result.log_line == f"{STAMP} attempt 2 on w: ignored (the task raised Ignore)"
    assert result.result is None and result.error is None


def test_reject_with_requeue_and_attempts_left_requeues_now() -> None:
    report = failure_report("rejected", requeue=True, reason="not yet")
    decided = rejection(
        make_job(attempts=1, max_attempts=2), Ending.from_report(report), now=NOW, worker="w"
    )
    assert decided.requeued and decided.dead_letter_reason is None
    assert decided.result.status == states.RETRYING
    assert decided.result.eta == NOW
    assert decided.result.log_line.endswith("rejected: not yet; requeued")


def test_reject_with_requeue_on_the_last_attempt_fails_and_dead_letters() -> None:
    report = failure_report("rejected", requeue=True, reason="not yet")
    decided = rejection(
        make_job(attempts=2, max_attempts=2), Ending.from_report(report), now=NOW, worker="w"
    )
    assert not decided.requeued
    assert decided.result.status == states.FAILED
    why = "rejected with requeue, but all 2 attempt(s) are used"
    assert decided.result.log_line.endswith(f"{why}: not yet; message dead-lettered")
    assert decided.dead_letter_reason == f"task proj.add {why}: not yet"


def test_reject_without_requeue_fails_and_dead_letters() -> None:
    report = failure_report("rejected", requeue=False, reason="")
    decided = rejection(
        make_job(attempts=1, max_attempts=5), Ending.from_report(report), now=NOW, worker="w"
    )
    assert not decided.requeued
    assert decided.result.status == states.FAILED
    assert decided.result.traceback == "Traceback ...\nValueError: boom\n"
    assert decided.reason == "rejected"  # no reason given
    assert decided.dead_letter_reason == "task proj.add rejected: rejected"


def test_attempt_lost_with_its_worker() -> None:
    again = lost_attempt(make_job(attempts=1, max_attempts=2), "no heartbeat", now=NOW)
    assert again.line == f"{STAMP} attempt 1 on w1@host: lost: no heartbeat"
    assert again.give_up is None
    last = lost_attempt(make_job(attempts=2, max_attempts=2, worker=None), "died", now=NOW)
    assert last.line == f"{STAMP} attempt 2 on ?: lost: died"
    assert last.give_up is not None and last.give_up.status == states.FAILED
    assert last.give_up.error == "WorkerLostError: worker None lost the last allowed attempt: died"
