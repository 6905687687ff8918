"""The `heretic` command line, run as a user runs it (a subprocess per command)."""

from __future__ import annotations

import dataclasses
import json
import time

import jobs_project
import pytest
from helpers import run_heretic

from heretic_kombu import states

heretic = run_heretic  # the command as a user runs it (tests/helpers.py)


def test_db_init_is_idempotent(backend):
    if backend.database_url.startswith("postgresql"):  # the session's database may have it
        import sqlalchemy as sa

        engine = sa.create_engine(
            backend.database_url.replace("postgresql:", "postgresql+psycopg2:")
        )
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS heretic_jobs, heretic_schema_version")
        engine.dispose()
    first = heretic("db", "init")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created: heretic_jobs")
    second = heretic("db", "init")
    assert second.returncode == 0 and second.stdout.startswith("already present")


def test_jobs_list_and_show(app, start_worker, backend):
    start_worker()
    ok = jobs_project.add.delay(1, 2)
    bad = jobs_project.fail.delay("nope")
    assert ok.get(timeout=30) == 3
    bad.get(timeout=30, propagate=False)

    table = heretic("-A", "jobs_project", "jobs", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "TASK", "ID", "TASK", "QUEUE"]
    assert any(bad.id in line and "failed" in line and "ValueError: nope" in line for line in lines)

    as_json = heretic("jobs", "list", "--status", "failed", "--json")
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["task_id"] for r in rows] == [bad.id]
    assert rows[0]["status"] == states.FAILED and rows[0]["queue_name"] == backend.queue

    by_task = heretic("jobs", "list", "--task", "jobs_project.add", "--json")
    assert [json.loads(line)["task_id"] for line in by_task.stdout.splitlines()] == [ok.id]
    none = heretic("jobs", "list", "--queue", "no-such-queue", "--json")
    assert none.returncode == 0 and none.stdout == ""

    shown = heretic("jobs", "show", bad.id)
    assert shown.returncode == 0
    assert "ValueError: nope" in shown.stdout and "attempt 1 on w1@" in shown.stdout
    assert "Traceback" in shown.stdout
    assert json.loads(heretic("jobs", "show", bad.id, "--json").stdout)["attempts"] == 1


def test_unknown_job_exits_3_and_bad_settings_exit_1(backend):
    missing = heretic("jobs", "show", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 3 and "no job" in missing.stderr
    garbage = heretic("jobs", "show", "'; DROP TABLE heretic_jobs; --")
    assert garbage.returncode == 3
    assert heretic("jobs", "list").returncode == 0  # the table is still there
    bad_pool = heretic("worker", "-A", "jobs_project", "-P", "gevent")
    assert bad_pool.returncode == 2 and "gevent" in bad_pool.stderr
    bad_env = heretic("jobs", "list", env={"HERETIC_PREFETCH_MULTIPLIER": "many"})
    assert bad_env.returncode == 1
    assert "HERETIC_PREFETCH_MULTIPLIER" in bad_env.stderr and "Traceback" not in bad_env.stderr


@pytest.mark.services
@pytest.mark.parametrize("backend", ["services"], indirect=True)  # URLs with passwords
def test_password_never_printed(backend):
    with_password = backend.database_url.replace("postgres@", "postgres:s3cr3t-pw@")
    result = heretic("db", "init", env={"HERETIC_DATABASE_URL": with_password})
    assert result.returncode == 0, result.stderr
    assert "s3cr3t-pw" not in result.stdout + result.stderr and "***" in result.stdout


@pytest.mark.parametrize("setting", ["HERETIC_DATABASE_URL", "HERETIC_BROKER_URL"])
def test_worker_that_cannot_start_exits_1_promptly(backend, tmp_path, setting):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the folder should be")
    started = time.monotonic()
    result = heretic(
        "worker", "-A", "jobs_project", "-c", "2", env={setting: f"sqlite:///{blocked}/x.sqlite3"}
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Error: cannot create the folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_help_names_every_setting_variable():
    from heretic_kombu.config import Settings, env_var

    shown = heretic("--help").stdout
    for field in dataclasses.fields(Settings):
        assert env_var(field.name) in shown.replace("\n", " ").replace("  ", " ")
    assert "HERETIC_CONCURRENCY" in heretic("worker", "--help").stdout


def test_celerys_scheduling_option_is_accepted_and_said_to_change_nothing(app, start_worker):
    # Procfiles often say `celery worker -O fair`: the same line must start a worker.
    worker = start_worker("-O", "fair")
    assert jobs_project.add.delay(2, 2).get(timeout=30) == 4
    assert "-O fair: accepted as Celery's, with no effect" in worker.log()


@pytest.mark.parametrize(
    "filters",
    [
        ["--since", "999999999w"],
        ["--since", "2900000d"],
        ["--until", "9999-12-31T23:30-01:00"],  # year 10000 in UTC
        ["--since", "0001-01-01T00:30+01:00"],  # year 0 in UTC
        ["--where", "kwargs.n>1e400"],  # infinity
        ["--where", 'kwargs.to="a\\u0000b"'],  # a NUL, which PostgreSQL's text cannot hold
        ["--payload", '{"kwargs": {"k\\u0000": 1}}'],
        ["--root", "not-a-task-id"],
    ],
)
def test_hostile_filters_are_usage_errors_in_one_line(backend, filters):
    done = heretic("-A", "jobs_project", "jobs", "list", *filters)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert done.stdout == ""


@pytest.mark.services
@pytest.mark.parametrize("backend", ["services"], indirect=True)
@pytest.mark.parametrize(
    ("broker", "said"),
    [
        ("amqp://guest:not-the-password@127.0.0.1:5672//", "refused the login"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "does the vhost in the URL exist"),
        ("amqp://guest:guest@127.0.0.1:1//", "cannot reach the broker"),
    ],
)
def test_a_broker_that_refuses_us_is_one_line_and_exit_1(backend, broker, said):
    for command in (["dead", "list"], ["worker", "-A", "jobs_project", "-P", "solo"]):
        if command[0] == "worker" and "cannot reach" in said:
            continue  # a worker waits for a broker that is down (it may come back)
        done = heretic(*command, env={"HERETIC_BROKER_URL": broker})
        assert done.returncode == 1, command
        assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert "not-the-password" not in done.stderr


@pytest.mark.services
@pytest.mark.parametrize("backend", ["services"], indirect=True)
@pytest.mark.parametrize(
    "url", ["postgres://postgres@127.0.0.1:5432/{db}", "db+postgresql://postgres@127.0.0.1/{db}"]
)
def test_database_urls_in_other_spellings_work(backend, url):
    database = backend.database_url.rsplit("/", 1)[1]
    done = heretic("jobs", "list", env={"HERETIC_DATABASE_URL": url.format(db=database)})
    assert done.returncode == 0, done.stderr
