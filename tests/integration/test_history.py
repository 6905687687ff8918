"""Searchable history: app.jobs.search, the operator's commands, and their CLI, on every backend."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import canvas_tasks as ct
import jobs_project
import pytest
from helpers import PROJECTS, wait_for, wait_queued

from heretic_kombu import states


def heretic(*args, input=None):
    env_python = [sys.executable, "-m", "heretic_kombu.cli", "-A", "jobs_project"]
    import os

    env = dict(os.environ, PYTHONPATH=str(PROJECTS))
    return subprocess.run(
        [*env_python, *args], capture_output=True, text=True, env=env, input=input, timeout=60
    )


@pytest.fixture
def orders(app):
    """Twelve queued jobs with varied arguments (no worker: they stay queued)."""
    results = []
    for i in range(12):
        who = "bob@example.com" if i % 3 == 0 else f"user{i}@example.com"
        results.append(jobs_project.echo.apply_async(kwargs={"value": {"to": who, "n": i}}))
    for i in range(3):
        results.append(jobs_project.add.apply_async((i, 100 * i)))
    for result in results:
        wait_queued(app, result.id)
    return results


def test_search_filters(app, orders):
    jobs = app.jobs
    assert jobs.count() == 15
    assert jobs.count(task="jobs_project.add") == 3
    assert jobs.count(status="queued") == 15 and jobs.count(status=["failed"]) == 0
    bob = jobs.search(payload={"kwargs": {"value": {"to": "bob@example.com"}}})
    assert sorted(j.kwargs["value"]["n"] for j in bob) == [0, 3, 6, 9]
    assert jobs.count(where=[("kwargs.value.to", "=", "bob@example.com")]) == 4
    assert jobs.count(where=["kwargs.value.n>=10"]) == 2
    assert jobs.count(where=["kwargs.value.n!=0", "kwargs.value.to=bob@example.com"]) == 3
    assert jobs.count(where=["args.1>=100"]) == 2
    # Types matter, as in JSON: the number 3 is not the string "3".
    assert jobs.count(where=['kwargs.value.n="3"']) == 0
    # A hostile value is only ever a bound parameter.
    assert jobs.count(where=[("kwargs.value.to", "=", "x' OR '1'='1")]) == 0
    assert jobs.count(since="1h") == 15 and jobs.count(until="1h") == 0
    assert jobs.count(since=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1)) == 0
    with pytest.raises(ValueError):
        jobs.search(where=["kwargs.x;DELETE FROM heretic_jobs=1"])


def test_keyset_pagination_visits_every_row_once(app, orders):
    for order in ("-id", "id", "-created_at", "created_at"):
        seen, cursor = [], None
        while True:
            page = app.jobs.search(limit=4, after=cursor, order_by=order)
            seen.extend(j.id for j in page)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == 15
        assert seen == sorted(seen, reverse=order.startswith("-"))


def test_error_search_retry_and_stats(app, start_worker, tmp_path):
    start_worker()
    marker = tmp_path / "fixed"
    failed = ct.needs_file.delay(str(marker))
    with pytest.raises(FileNotFoundError):
        failed.get(timeout=30)
    ok = jobs_project.add.delay(1, 1)
    assert ok.get(timeout=30) == 2
    assert [j.task_id for j in app.jobs.search(error_contains="IS MISSING")] == [failed.id]
    assert app.jobs.count(error_contains="100%_") == 0  # LIKE wildcards are literal
    marker.write_text("ok")
    result = heretic("jobs", "retry", "--status", "failed", "--task", ct.needs_file.name, "--yes")
    assert result.returncode == 0, result.stderr
    assert "retried 1 job(s)" in result.stdout
    assert wait_for(lambda: failed.state == "SUCCESS", 30, "the retried job")
    row = app.jobs.get(failed.id)
    assert row.attempts == 2 and "retried by operator" in row.attempt_logs[1]
    stats = app.jobs.stats("1h")
    assert stats.counts[(ct.needs_file.name, states.SUCCEEDED)] == 1
    assert stats.runtimes["jobs_project.add"][2] == 1
    assert sum(n for _, n, _ in stats.per_minute) >= 2
    out = heretic("jobs", "stats", "--json")
    assert out.returncode == 0, out.stderr
    assert {"task": "jobs_project.add", "status": "succeeded", "jobs": 1} in json.loads(out.stdout)[
        "counts"
    ]


def test_cli_list_filters_json_and_bad_input(app, orders):
    out = heretic("jobs", "list", "--where", "kwargs.value.to=bob@example.com", "--json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["payload"]["kwargs"]["value"]["n"] for r in lines) == [0, 3, 6, 9]
    table = heretic("jobs", "list", "--task", "jobs_project.add", "--limit", "2")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:3] == [
        "ID",
        "TASK",
        "ID",
    ]
    assert "more: --after " in table.stdout
    cursor = table.stdout.strip().splitlines()[-1].split()[-1]
    rest = heretic("jobs", "list", "--task", "jobs_project.add", "--after", cursor, "--json")
    assert len(rest.stdout.splitlines()) == 1
    for bad in (["--where", "kwargs.x LIKE 1"], ["--since", "yesterday"], ["--after", "zz"]):
        result = heretic("jobs", "list", *bad)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_cancel_purge_and_prune(app, orders):
    victim = orders[0]
    out = heretic("jobs", "cancel", victim.id)
    assert out.returncode == 0 and "revoked" in out.stdout, out.stdout + out.stderr
    assert app.jobs.get(victim.id).status == states.REVOKED
    assert heretic("jobs", "cancel", "00000000-0000-0000-0000-000000000000").returncode == 3
    # Purge deletes only finished jobs, after asking.
    declined = heretic("jobs", "purge", "--task", "jobs_project.echo", input="n\n")
    assert declined.returncode == 1 and app.jobs.count() == 15
    purged = heretic("jobs", "purge", "--task", "jobs_project.echo", "--yes")
    assert "deleted 1 job(s)" in purged.stdout, purged.stdout + purged.stderr
    assert app.jobs.count() == 14 and app.jobs.get(victim.id) is None
    # Prune: only finished jobs older than the cutoff; queued ones are never deleted.
    assert app.jobs.prune("0s") == 0
    app.jobs.cancel(orders[1].id)
    assert app.jobs.prune("1h") == 0 and app.jobs.prune("0s", batch_size=1) == 1
    pruned = heretic("prune", "--older-than", "30d", "--status", "succeeded")
    assert pruned.returncode == 0 and "deleted 0 job(s)" in pruned.stdout


def test_dead_letters_list_show_and_replay(app, backend, start_worker):
    worker = start_worker()
    lost = app.send_task("late.task", ["x"])  # no worker knows this task yet
    # The row is left as it is (issue 15, item 6); the message is dead-lettered.
    wait_for(lambda: len(app.jobs.dead_letters()) == 1, 30, "the dead-lettering")
    # Not run, not failed: still waiting for a worker that knows the task.
    assert app.jobs.get(lost.id).status in (states.PENDING, states.QUEUED)
    listed = heretic("dead", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(d["task_id"], d["task"]) for d in letters] == [(lost.id, "late.task")]
    assert "unknown task" in letters[0]["reason"] or "rejected" in letters[0]["reason"]
    shown = heretic("dead", "show", "1")
    assert shown.returncode == 0 and '"late.task"' in shown.stdout
    assert heretic("dead", "show", "7").returncode == 3
    # Deploy the task (a worker that knows it), then replay: the job runs, keeping its id.
    worker.terminate()
    start_worker("-A", "late_project")
    replayed = heretic("dead", "replay", lost.id)
    assert "replayed 1 dead letter(s)" in replayed.stdout, replayed.stdout + replayed.stderr
    assert lost.get(timeout=30) == "late x"
    assert "retried by dead-letter replay" in " ".join(app.jobs.get(lost.id).attempt_logs)
    assert app.jobs.dead_letters() == []


def test_workers_prune_old_finished_jobs_when_configured(app, start_worker, monkeypatch):
    monkeypatch.setenv("HERETIC_PRUNE_OLDER_THAN", "1s")
    monkeypatch.setenv("HERETIC_PRUNE_INTERVAL", "0.3")
    monkeypatch.setenv("HERETIC_PRUNE_STATUSES", "succeeded")
    worker = start_worker()
    done = jobs_project.add.delay(1, 1)
    assert done.get(timeout=30) == 2
    failed = ct.explode.delay(1)
    with pytest.raises(ValueError):
        failed.get(timeout=30)
    later = jobs_project.add.apply_async((2, 2), countdown=3600)
    wait_for(lambda: app.jobs.get(done.id) is None, 30, "the succeeded job to be pruned")
    assert app.jobs.get(failed.id).status == states.FAILED  # not in prune_statuses
    assert app.jobs.get(later.id).status == states.SCHEDULED  # unfinished: never pruned
    assert "pruned 1 succeeded job(s) older than 1s" in worker.log()


def test_bad_prune_settings_are_refused(monkeypatch):
    from heretic_kombu.config import Settings
    from heretic_kombu.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="prune_older_than"):
        Settings.build({"prune_older_than": "soon"}, env={})
    with pytest.raises(ConfigurationError, match="prune_statuses"):
        Settings.build({"prune_statuses": "succeeded,queued"}, env={})
