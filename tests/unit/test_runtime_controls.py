"""Runtime controls without a worker: revoke on the row, time-limit options, signals'
names, soft time limits in-process, and Reject/Ignore in eager mode."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from heretic_kombu import Heretic, states
from heretic_kombu.config import Settings
from heretic_kombu.control import signal_name, terminate_signal, terminated_error
from heretic_kombu.exceptions import (
    ConfigurationError,
    Ignore,
    MaxRetriesExceededError,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    Terminated,
    TimeLimitExceeded,
    TimeoutError,
)
from heretic_kombu.execution import SUCCEEDED, execute

MakeApp = Callable[..., Heretic]


def test_celery_exception_names_are_importable_from_heretic_exceptions():
    for cls in (Retry, MaxRetriesExceededError, TimeoutError, TaskRevokedError, Terminated):
        assert issubclass(cls, Exception)
    reject = Reject("bad input", requeue=True)
    assert (reject.reason, reject.requeue, str(reject)) == ("bad input", True, "bad input")
    assert repr(reject) == "reject requeue=True: bad input"
    assert str(TimeLimitExceeded(30)) == "hard time limit (30s) exceeded"
    assert str(TimeLimitExceeded("as stored")) == "as stored"


def test_signal_names_as_celery_accepts_them():
    assert signal_name(None) == "SIGTERM"
    assert signal_name("KILL") == "SIGKILL"
    assert signal_name("sigusr1") == "SIGUSR1"
    assert signal_name(9) == "SIGKILL"
    for bad in ("SIGNOPE", "SIG_IGN", 999, True):
        with pytest.raises(ValueError):
            signal_name(bad)
    assert terminate_signal(terminated_error("SIGKILL")) == signal.SIGKILL
    assert terminate_signal("revoked") is None
    assert terminate_signal(None) is None


def test_revoke_of_jobs_that_have_not_started(make_app: MakeApp):
    app = make_app()

    @app.task(name="later")
    def later():
        return "ran"

    queued = later.delay()
    scheduled = later.apply_async(countdown=3600)
    outcome = app.control.revoke([queued.id, scheduled.id])
    assert outcome == {queued.id: "revoked", scheduled.id: "revoked"}
    for result in (queued, scheduled):
        row = app.store.get(result.id)
        assert row.status == states.REVOKED and row.error == "revoked"
        assert row.attempts == 0 and row.finished_at is not None
        assert row.attempt_logs[-1].endswith("revoked by app.control.revoke")
        assert result.state == "REVOKED" and result.ready()
        with pytest.raises(TaskRevokedError, match="revoked"):
            result.get(timeout=5)
    # A finished job is left alone, and says so; so is a job nobody sent.
    assert app.control.revoke(queued.id) == {queued.id: "finished"}
    assert len(app.store.get(queued.id).attempt_logs) == 1
    missing = "00000000-0000-4000-8000-000000000000"
    assert app.control.revoke(missing) == {missing: "missing"}
    with pytest.raises(ValueError):
        app.control.revoke("not-a-uuid")
    with pytest.raises(ValueError, match="unknown signal"):
        app.control.revoke(queued.id, terminate=True, signal="SIGNOPE")


def test_revoke_of_a_running_job(make_app: MakeApp):
    app = make_app()

    @app.task(name="long")
    def long():
        return None

    left = long.delay()
    killed = long.delay()
    for result in (left, killed):
        assert app.store.claim(result.id, "w@test") is not None
    assert app.control.revoke(left.id) == {left.id: "running"}
    assert app.store.get(left.id).status == states.STARTED
    assert app.control.terminate(killed.id, signal="KILL") == {killed.id: "terminated"}
    row = app.store.get(killed.id)
    assert row.status == states.REVOKED and row.error == "terminated (SIGKILL)"
    assert row.attempt_logs == [row.attempt_logs[0]]
    assert "attempt 1 on w@test: terminated (SIGKILL) by app.control.revoke" in row.attempt_logs[0]
    # What a worker's heartbeat asks: which of my claimed jobs were revoked? The one left
    # running is reported as requested (a worker that has not started it drops it).
    assert app.store.revoked_among([left.id, killed.id]) == {
        killed.id: "terminated (SIGKILL)",
        left.id: "revoke requested",
    }


def test_time_limit_options_are_checked_when_declared(make_app: MakeApp):
    app = make_app()

    @app.task(name="limited", time_limit=10, soft_time_limit=5)
    def limited():
        return None

    assert (limited.time_limit, limited.soft_time_limit) == (10, 5)
    with pytest.raises(ValueError, match="soft_time_limit .5. must be less than or equal"):
        app.task(name="x", time_limit=1, soft_time_limit=5)(lambda: None)
    with pytest.raises(ValueError, match="time_limit=0 must be a number of seconds"):
        app.task(name="y", time_limit=0)(lambda: None)


def test_time_limit_settings_use_celerys_keys():
    settings = Settings.build({"task_time_limit": 60, "task_soft_time_limit": "30"}, env={})
    assert (settings.time_limit, settings.soft_time_limit) == (60, 30.0)
    from_env = Settings.build({}, env={"HERETIC_TIME_LIMIT": "2.5"})
    assert from_env.time_limit == 2.5 and from_env.soft_time_limit is None
    with pytest.raises(ConfigurationError, match="HERETIC_SOFT_TIME_LIMIT"):
        Settings.build({}, env={"HERETIC_SOFT_TIME_LIMIT": "-1"})


def test_soft_time_limit_raises_inside_the_body_in_the_main_thread(make_app: MakeApp):
    app = make_app()

    @app.task(name="sleepy")
    def sleepy():
        try:
            time.sleep(5)
        except SoftTimeLimitExceeded as exc:
            return f"caught: {exc}"
        return "slept"

    call = {
        "task": "sleepy",
        "id": "00000000-0000-4000-8000-000000000001",
        "args": [],
        "kwargs": {},
        "retries": 0,
        "max_attempts": 1,
        "soft_time_limit": 0.2,
    }
    outcome = execute(app, call)
    assert outcome["status"] == SUCCEEDED
    assert outcome["result"] == '"caught: soft time limit (0.2s) exceeded"'
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # disarmed afterwards


def test_reject_and_ignore_in_eager_mode_use_celerys_states(make_app: MakeApp):
    app = make_app(task_always_eager=True)

    @app.task(name="rejects", autoretry_for=(Exception,))
    def rejects():
        raise Reject("no", requeue=False)

    @app.task(name="ignores", autoretry_for=(Exception,))
    def ignores():
        raise Ignore()

    rejected = rejects.delay()
    assert rejected.state == "REJECTED" and isinstance(rejected.result, Reject)
    ignored = ignores.delay()
    assert ignored.state == "IGNORED"
