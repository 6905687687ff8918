"""Periodic tasks: ``heretic beat`` and ``worker -B`` fire beat_schedule entries as job rows,
each due time exactly once, however many beats run, and across restarts.

Beats and workers are real processes started through the CLI, on both backends; every
one is stopped (SIGTERM, then SIGKILL) before the test ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import PROJECTS, Backend, wait_for

from heretic_kombu import Heretic
from heretic_kombu.beat import Beat, firing_id
from heretic_kombu.exceptions import ConfigurationError
from heretic_kombu.schedules import crontab, schedule
from heretic_kombu.store import BeatStore, EntrySpec, Firing, Job, utcnow
from heretic_kombu.store.tables import beat_entries

TASK = "beat_project.beat_tick"
SECOND = dt.timedelta(seconds=1)


class BeatProcess:
    """A ``heretic beat`` started through the CLI, as a user runs it."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "heretic_kombu.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"beat exited with {self.process.returncode}:\n{self.log()}")
            return "beat: starting" in self.log()

        wait_for(ready, 30, f"beat to start (log: {self.log_path})")

    def terminate(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"beat did not stop within {timeout}s after SIGTERM:\n{self.log()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def prefix(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> str:
    """This test's entry names start with its queue's name (unique): tests share databases."""
    monkeypatch.setenv("BEAT_TEST_PREFIX", backend.queue)
    monkeypatch.setenv("BEAT_TEST_EVERY", "1")
    return backend.queue


@pytest.fixture
def start_beat(
    backend: Backend, tmp_path: Path, prefix: str
) -> Iterator[Callable[..., BeatProcess]]:
    """Start real ``heretic beat`` processes; every one is stopped when the test ends."""
    started: list[BeatProcess] = []

    def start(*args: str, wait: bool = True, **env_overrides: str) -> BeatProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECTS), env.get("PYTHONPATH")]))
        env.update(env_overrides)
        log = tmp_path / f"beat-{len(started) + 1}.log"
        beat = BeatProcess(["beat", "-A", "beat_project", "-l", "info", *args], log, tmp_path, env)
        started.append(beat)
        if wait:
            beat.wait_ready()
        return beat

    yield start
    for beat in started:
        if beat.process.poll() is None:
            try:
                beat.process.send_signal(signal.SIGTERM)
                beat.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                beat.kill()


def _fired(app: Heretic, entry: str) -> list[Job]:
    """The job rows the entry fired, oldest due time first."""
    rows = app.store.list(task_name=TASK, limit=1000)
    return sorted((r for r in rows if r.args and r.args[0] == entry), key=lambda r: r.eta)


def _state(app: Heretic, entry: str) -> Any:
    return next(e for e in BeatStore(app.store).entries() if e.name == entry)


def _assert_each_due_time_fired_once(app: Heretic, entry: str, every: dt.timedelta) -> list[Job]:
    rows = _fired(app, entry)
    etas = [r.eta for r in rows]
    assert len(etas) == len(set(etas)), f"a due time was fired twice: {etas}"
    for row in rows:  # the task id is derived from entry and due time, in every beat
        assert row.task_id == firing_id(entry, row.eta)
    for earlier, later in zip(etas, etas[1:], strict=False):
        # The next due time counts from the previous firing: never two in one period.
        assert later - earlier >= every, f"two firings within one period: {earlier}, {later}"
    assert _state(app, entry).total_run_count == len(rows)
    return rows


# -- real processes ------------------------------------------------------------------------


def test_beat_process_fires_entries_that_a_worker_runs(
    app: Heretic, prefix: str, start_beat: Callable[..., BeatProcess], start_worker: Any
) -> None:
    entry = f"{prefix}-every"
    start_worker("-A", "beat_project", pool="threads")
    beat = start_beat()
    wait_for(
        lambda: len([r for r in _fired(app, entry) if r.status == "succeeded"]) >= 3,
        30,
        "three firings run by the worker",
    )
    assert beat.terminate() == 0
    assert "beat: stopped" in beat.log()
    rows = _assert_each_due_time_fired_once(app, entry, SECOND)
    done = [r for r in rows if r.status == "succeeded"]
    assert done[0].result == {"entry": entry, "n": 1}
    assert done[0].priority == 3 and done[0].expires_at is not None  # the entry's options
    assert all(r.queue_name == app.settings.default_queue for r in rows)
    state = _state(app, entry)
    assert state.task_name == TASK and state.schedule == "every 1 seconds"
    # Never run before, an interval entry first fires one period after beat saw it.
    assert rows[0].eta == state.created_at + SECOND


def test_three_beats_at_once_fire_each_due_time_exactly_once(
    app: Heretic, prefix: str, start_beat: Callable[..., BeatProcess]
) -> None:
    entry = f"{prefix}-every"
    beats = [start_beat(wait=False) for _ in range(3)]  # all three race from the start
    for beat in beats:
        beat.wait_ready()
    time.sleep(4)
    for beat in beats:
        assert beat.terminate() == 0
    rows = _assert_each_due_time_fired_once(app, entry, SECOND)
    assert len(rows) >= 2
    # Each firing is a normal job: sent to the broker, waiting for a worker.
    assert {r.status for r in rows} == {"queued"}


def test_restart_keeps_last_run_at_and_an_overdue_entry_fires_once(
    app: Heretic, prefix: str, start_beat: Callable[..., BeatProcess]
) -> None:
    entry = f"{prefix}-every"
    first = start_beat()
    wait_for(lambda: len(_fired(app, entry)) >= 2, 30, "two firings")
    assert first.terminate() == 0
    before = _state(app, entry)
    assert before.last_run_at is not None and before.total_run_count >= 2
    time.sleep(3.5)  # three periods and more go by without a beat
    restarted_at = utcnow()
    start_beat()
    wait_for(
        lambda: _state(app, entry).total_run_count > before.total_run_count,
        30,
        "the overdue firing",
    )
    late = next(r for r in _fired(app, entry) if r.eta > before.last_run_at)
    # Due one period after the run recorded before the restart: last_run_at was kept.
    assert late.eta == before.last_run_at + SECOND
    assert late.task_id == firing_id(entry, late.eta)
    # The lateness is in the row: sent well after its due time.
    assert late.created_at - late.eta > dt.timedelta(seconds=2)
    # Once, not once per missed period: no firing is due inside the downtime.
    missed = [
        r.eta for r in _fired(app, entry) if before.last_run_at + SECOND < r.eta < restarted_at
    ]
    assert missed == []
    _assert_each_due_time_fired_once(app, entry, SECOND)


def test_worker_with_beat_flag_fires_and_runs_the_entries(
    app: Heretic, prefix: str, start_worker: Any
) -> None:
    entry = f"{prefix}-every"
    worker = start_worker("-A", "beat_project", "-B", pool="threads")
    wait_for(
        lambda: len([r for r in _fired(app, entry) if r.status == "succeeded"]) >= 2,
        30,
        "two firings run by the worker -B",
    )
    assert worker.terminate() == 0
    assert "beat: stopped" in worker.log()
    _assert_each_due_time_fired_once(app, entry, SECOND)


def test_beat_with_a_bad_entry_exits_1_naming_it(
    prefix: str, start_beat: Callable[..., BeatProcess]
) -> None:
    beat = start_beat(wait=False, BEAT_TEST_BAD="1")
    assert beat.process.wait(timeout=30) == 1
    assert f"Error: beat_schedule entry '{prefix}-bad'" in beat.log()
    assert "a schedule must be a crontab" in beat.log()


# -- in-process: the schedule's life across restarts --------------------------------------


def _entries_of(app: Heretic) -> dict[str, Any]:
    return {e.name: e for e in BeatStore(app.store).entries()}


def test_changed_schedule_keeps_last_run_and_removed_entries_stay_unfired(
    app: Heretic, prefix: str
) -> None:
    name, other = f"{prefix}-a", f"{prefix}-b"
    first = Beat(
        app,
        schedule={
            name: {"task": "add", "schedule": 0.2, "args": (1, 2)},
            other: {"task": "add", "schedule": 0.2, "args": (3, 4)},
        },
    )
    wait_for(
        lambda: first.tick() is not None and _entries_of(app)[name].total_run_count >= 1,
        10,
        "a firing",
    )
    ran = _entries_of(app)[name]
    assert ran.last_run_at is not None and ran.schedule == "every 0.2 seconds"

    # Next start: the entry's schedule changed, the other entry is gone from the config.
    second = Beat(app, schedule={name: {"task": "add", "schedule": 3600, "args": (1, 2)}})
    assert second.tick() > 1  # the next firing is an hour after the last run
    entries = _entries_of(app)
    assert entries[name].last_run_at == ran.last_run_at
    assert entries[name].total_run_count == ran.total_run_count
    assert entries[name].schedule == "every 3600 seconds"
    gone = entries[other]
    time.sleep(0.3)  # longer than the removed entry's period
    second.tick()
    assert _entries_of(app)[other] == gone  # still there, not fired


def test_overdue_crontab_entry_fires_once_at_its_first_missed_minute(
    app: Heretic, prefix: str
) -> None:
    name = f"{prefix}-cron"
    beat = Beat(app, schedule={name: {"task": "add", "schedule": crontab(minute="*/5")}})
    beat.setup()
    # As if it last ran at a five-minute mark two hours ago and beat had been down since.
    last = (utcnow() - dt.timedelta(hours=2)).replace(second=0, microsecond=0)
    last -= dt.timedelta(minutes=last.minute % 5)
    with app.store.engine.begin() as conn:
        conn.execute(
            beat_entries.update().where(beat_entries.c.name == name).values(last_run_at=last)
        )
    beat.tick()
    beat.tick()
    rows = [r for r in app.store.list(task_name="add", limit=100) if r.eta is not None]
    fired = [r for r in rows if r.task_id == firing_id(name, r.eta)]
    assert [r.eta for r in fired] == [last + dt.timedelta(minutes=5)]
    assert _entries_of(app)[name].total_run_count == 1


def test_the_same_due_time_cannot_give_two_jobs_even_without_the_lock(
    app: Heretic, prefix: str
) -> None:
    # Two beats that decided on the same firing (as if the lock had not kept them apart).
    name = f"{prefix}-dup"
    store = BeatStore(app.store)
    store.sync([EntrySpec(name, "add", "every 60 seconds")])
    job = app.build_job("add", [1, 2], {}, task_id=firing_id(name, utcnow()))

    def plan(current: dict[str, Any], now: dt.datetime) -> list[Firing]:
        return [Firing(name, job, now)]

    first, _ = store.fire(plan)
    second, after = store.fire(plan)
    assert [r.task_id for r in first] == [job.task_id] and second == []
    assert after[name].total_run_count == 1
    assert [r.task_id for r in app.store.list(task_name="add", limit=1000)].count(job.task_id) == 1


def test_beat_schedule_is_read_under_celerys_key_names(backend: Backend) -> None:
    entry = {"task": "add", "schedule": dt.timedelta(minutes=1), "args": (1, 2)}

    old_style = Heretic("old")
    old_style.conf["CELERYBEAT_SCHEDULE"] = {"old": entry}
    assert [e.name for e in Beat(old_style).entries] == ["old"]

    class DjangoSettings:
        CELERY_BEAT_SCHEDULE = {"django": {**entry, "schedule": 30}}
        CELERY_TIMEZONE = "Europe/Paris"

    django_style = Heretic("django")
    django_style.config_from_object(DjangoSettings, namespace="CELERY")
    cron_style = Heretic("cron", timezone="Europe/Paris")
    cron_style.conf.beat_schedule = {"cron": {"task": "add", "schedule": crontab(hour=7)}}
    try:
        (only,) = Beat(django_style).entries
        assert only.name == "django" and only.schedule == schedule(30)
        (cron,) = Beat(cron_style).entries
        assert str(cron.schedule.tz) == "Europe/Paris"  # the app's Celery timezone
    finally:
        for application in (old_style, django_style, cron_style):
            application.close()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"schedule": 10}, "needs a task name"),
        ({"task": "add"}, "needs a 'schedule'"),
        ({"task": "add", "schedule": "*/5 * * * *"}, "a schedule must be a crontab"),
        ({"task": "add", "schedule": 10, "args": "12"}, "args must be a list or tuple"),
        ({"task": "add", "schedule": 10, "args": [object()]}, "cannot encode as JSON"),
        ({"task": "add", "schedule": 10, "every": 3}, "unknown keys ['every']"),
        ({"task": "add", "schedule": 10, "options": {"eta": 1}}, "unknown options ['eta']"),
        ({"task": "add", "schedule": 10, "options": {"serializer": "pickle"}}, "JSON only"),
    ],
)
def test_malformed_entries_are_refused_naming_the_entry(
    backend: Backend, entry: dict[str, Any], message: str
) -> None:
    application = Heretic("bad")
    try:
        with pytest.raises(ConfigurationError, match="beat_schedule entry 'e'") as caught:
            Beat(application, schedule={"e": entry})
        assert message in str(caught.value)
    finally:
        application.close()


def test_tables_are_created_by_beat_on_a_database_made_before_it(app: Heretic) -> None:
    app.store.ensure_schema()
    with app.store.engine.begin() as conn:
        beat_entries.drop(conn, checkfirst=True)
    Beat(app, schedule={"x": {"task": "add", "schedule": 60}}).setup()
    with app.store.engine.connect() as conn:
        assert sa.inspect(conn).has_table("heretic_beat_entries")
