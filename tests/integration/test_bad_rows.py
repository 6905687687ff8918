"""One bad row never holds up the others (issue 15, items 1, 2, 3 and 12; DESIGN §4,
invariant 10). Rows are made bad with raw SQL, as an older version, another program or
a hand-written statement could leave them: the loops (the worker's turn, the
reconciler, the scheduler, search, ``jobs show``) set that row aside with its reason
and go on with the others."""

from __future__ import annotations

import datetime as dt

import jobs_project
import pytest
import sqlalchemy as sa
from helpers import run_heretic, wait_for, wait_queued

from heretic_kombu import states

heretic = run_heretic


def _sql(backend, statement, **params):
    engine = sa.create_engine(backend.database_url.replace("postgresql:", "postgresql+psycopg2:"))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement), params)
    finally:
        engine.dispose()


def _year_10000(backend):
    # 9999-12-31 23:30 at UTC-1, as .delay() once took it: year 10000 in UTC.
    if backend.database_url.startswith("postgresql"):
        return "'10000-01-01 00:30:00+00'"
    return "'10000-01-01 00:30:00.000000'"


def test_an_unreadable_row_is_set_aside_and_the_others_go_on(app, start_worker, backend):
    """A ``started`` row whose ``expires_at`` is year 10000 in UTC, next to a job lost
    with its worker: the reconciler still releases the lost one, which runs; the bad one
    is failed with its reason; ``jobs list`` lists the others and names it; ``jobs
    show`` says why it cannot show it (exit 1), not "no job"."""
    bad = jobs_project.add.delay(1, 1)
    lost = jobs_project.add.delay(2, 3)
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    bad_id = app.store.get(bad.id).id  # the row id: SQLite stores task ids as hex
    for result in (bad, lost):  # as if a worker had claimed them and died
        _sql(
            backend,
            "UPDATE heretic_jobs SET status = 'started', attempts = 1, updated_at = :ago"
            " WHERE id = :id",
            ago=long_ago,
            id=app.store.get(result.id).id,
        )
    _sql(
        backend,
        f"UPDATE heretic_jobs SET expires_at = {_year_10000(backend)} WHERE id = :id",
        id=bad_id,
    )
    start_worker()
    assert lost.get(timeout=40) == 5  # released by the reconciler and run
    engine = sa.create_engine(backend.database_url.replace("postgresql:", "postgresql+psycopg2:"))
    try:

        def set_aside():
            with engine.connect() as conn:
                row = conn.execute(
                    sa.text("SELECT id, status, error FROM heretic_jobs WHERE id = :id"),
                    {"id": bad_id},
                ).first()
            return row if row.status == states.FAILED else None

        row = wait_for(set_aside, 30, "the unreadable row to be set aside")
    finally:
        engine.dispose()
    print(f"\nunreadable row: {row.status}: {row.error}")
    assert "cannot be read" in row.error and "10000" in row.error
    listing = heretic("jobs", "list", "--limit", "10")
    assert listing.returncode == 0, listing.stderr
    assert lost.id in listing.stdout
    assert f"row {row.id} ({bad.id}, failed) cannot be read" in listing.stderr
    shown = heretic("jobs", "show", bad.id)
    assert shown.returncode == 1, (shown.returncode, shown.stdout, shown.stderr)
    assert "cannot be read" in shown.stderr and "no job" not in shown.stderr
    assert jobs_project.add.delay(4, 4).get(timeout=30) == 8  # the worker goes on


@pytest.mark.services
@pytest.mark.parametrize("backend", ["services", "redis"], indirect=True)  # SQLite: 64 bits
def test_a_turn_that_hits_a_data_error_sets_that_job_aside_and_goes_on(app, start_worker, backend):
    """A row whose ``attempts`` already holds the integer column's largest value (written
    by hand, or by an older version: a Celery message carrying such a count is now
    refused at the edge): its claim makes ``attempts`` overflow. Before: "database
    unavailable" for ever, every later job stuck, SIGTERM ignored. Now that job is set
    aside (failed with the reason, message dead-lettered) and the worker goes on."""
    stuck = jobs_project.add.delay(1, 1)  # no worker yet: its message waits in the queue
    wait_queued(app, stuck.id)
    _sql(
        backend,
        "UPDATE heretic_jobs SET attempts = 2147483647, max_attempts = 2147483647"
        " WHERE task_id = :task_id",
        task_id=stuck.id,
    )
    worker = start_worker()
    after = [jobs_project.add.delay(i, i) for i in range(5)]
    assert [r.get(timeout=30) for r in after] == [0, 2, 4, 6, 8]
    row = wait_for(
        lambda: (job := app.store.get(stuck.id)) is not None and job.status != "queued" and job,
        30,
        "the overflowing job to be set aside",
    )
    print(f"\noverflowing job: {row.status}: {row.error}")
    assert row.status == states.FAILED and "claimed" in row.error
    assert worker.terminate(timeout=30) == 0


@pytest.mark.services
@pytest.mark.parametrize("backend", ["services"], indirect=True)  # RabbitMQ refuses it
def test_an_unpublishable_due_row_is_failed_and_the_others_are_published(
    app, start_worker, backend
):
    """A due row whose priority RabbitMQ cannot take (300, written by hand) among
    countdown jobs: they all run, and the bad one is failed once with the reason."""
    bad = jobs_project.add.apply_async((0, 0), countdown=1)
    bad_id = app.store.get(bad.id).id
    _sql(backend, "UPDATE heretic_jobs SET priority = 300 WHERE id = :id", id=bad_id)
    results = [jobs_project.add.apply_async((i, 1), countdown=1) for i in range(20)]
    worker = start_worker()
    assert [r.get(timeout=40) for r in results] == [i + 1 for i in range(20)]
    row = wait_for(
        lambda: (job := app.store.get(bad.id)).status == states.FAILED and job,
        30,
        "the unpublishable row to be failed",
    )
    print(f"\nunpublishable row: {row.status}: {row.error}")
    assert "cannot be published" in row.error
    assert worker.log().count(bad.id) <= 2  # once, not once per tick


@pytest.mark.services
@pytest.mark.parametrize("backend", ["services"], indirect=True)
def test_jobs_show_with_the_database_down_is_an_error_not_no_job(app, backend):
    """Item 12: with PostgreSQL unreachable, ``jobs show <existing id>`` is one line,
    exit 1 (before: "no job", exit 3)."""
    job = jobs_project.add.delay(1, 1)
    down = heretic(
        "jobs",
        "show",
        job.id,
        env={"HERETIC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"},
    )
    assert down.returncode == 1, (down.returncode, down.stderr)
    assert "no job" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr
