"""One bad row never holds up the others (issue 15, items 2 and 3): a row left by an
older version, another program or a hand-written statement, which the edge checks of
today would refuse, must not stall the reconciler or the scheduler of any worker."""

from __future__ import annotations

import datetime as dt
import time

import fault_tasks
import pytest
import sqlalchemy as sa
from harness import Faults
from helpers import delete_queues, wait_for


def _sql(faults: Faults, statement: str, **params: object) -> None:
    url = faults.backend.database_url.replace("postgresql://", "postgresql+psycopg2://")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement), params)
    finally:
        engine.dispose()


def _started_count(faults: Faults, ids: list[str]) -> int:
    wanted = set(ids)
    return sum(r["status"] == "started" and r["task_id"] in wanted for r in faults.rows())


@pytest.mark.parametrize("backend", ["services"], indirect=True)
def test_item_2_a_year_10000_row_does_not_stop_the_reconciler(faults: Faults) -> None:
    """A ``started`` row whose ``expires_at`` is year 10000 in UTC, then a worker
    SIGKILLed mid-run: the reconciler still releases the jobs it held, which complete."""
    app = faults.app()
    bad = fault_tasks.record_run.delay(-1)
    bad_id = app.store.get(bad.id).id
    ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    _sql(
        faults,
        "UPDATE heretic_jobs SET status = 'started', attempts = 1, updated_at = :ago,"
        " expires_at = '10000-01-01 00:30:00+00' WHERE id = :id",
        ago=ago,
        id=bad_id,
    )
    victim = faults.start_worker()
    submitted = faults.submit(20, pause=3.0)
    wait_for(lambda: _started_count(faults, submitted) >= 4, 30, "jobs to start")
    victim.kill()
    faults.start_worker()
    faults.wait_terminal(len(submitted) + 1, timeout=60)
    figure = faults.figure(
        "2. year-10000 row + worker SIGKILLed mid-run", submitted, runs_once=False
    )
    assert figure.completed == len(submitted)
    row = next(r for r in faults.rows() if r["task_id"] == bad.id)
    assert row["status"] == "failed", row


@pytest.mark.parametrize("backend", ["services"], indirect=True)
def test_item_3_an_unpublishable_due_row_does_not_stall_any_scheduler(
    faults: Faults, backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One due row RabbitMQ cannot take (priority 300, written by hand) and 100
    ``countdown=2`` jobs over two queues, served by two workers sharing the database:
    all 100 run; the bad one is failed with its reason."""
    other = f"{backend.queue}_b"
    app = faults.app()
    bad = fault_tasks.record_run.apply_async((-1,), countdown=1)
    _sql(
        faults, "UPDATE heretic_jobs SET priority = 300 WHERE id = :id", id=app.store.get(bad.id).id
    )
    faults.start_worker()
    monkeypatch.setenv("HERETIC_DEFAULT_QUEUE", other)
    faults.start_worker()
    try:
        submitted = [
            fault_tasks.record_run.apply_async(
                (n,), countdown=2, queue=backend.queue if n % 2 else other
            ).id
            for n in range(100)
        ]
        started = time.monotonic()
        faults.wait_terminal(len(submitted) + 1, timeout=90)
        print(f"\nsettled in {time.monotonic() - started:.1f} s")
        figure = faults.figure("3. one unpublishable due row, two queues", submitted)
        assert figure.completed == len(submitted)
        bad_row = app.store.get(bad.id)
        assert bad_row.status == "failed" and "cannot be published" in (bad_row.error or "")
    finally:
        delete_queues(other)
