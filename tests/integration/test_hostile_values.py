"""Hostile values on every backend: what no job, message or value may do to a worker
(DESIGN §4, invariants 9-11). Each case asserts what a user sees: the job's row, the
worker still taking jobs, and a warm shutdown that ends."""

from __future__ import annotations

import jobs_project
import pytest
from helpers import wait_for

from heretic_kombu import states


@pytest.mark.parametrize("pool", ["solo", "threads", "prefork"])
def test_an_exception_no_text_can_hold_fails_its_job_and_the_worker_goes_on(
    app, start_worker, pool
):
    worker = start_worker(pool=pool)
    sent = {kind: jobs_project.raise_hostile.delay(kind) for kind in ("nul", "surrogate", "str")}
    for kind, result in sent.items():
        row = wait_for(
            lambda result=result: (row := app.store.get(result.id)).status == states.FAILED and row,
            30,
            f"the {kind} job to fail",
        )
        assert row.error.startswith(("ValueError", "Unprintable")), row.error
        assert "\x00" not in row.error + (row.traceback or "")
        (row.error + (row.traceback or "")).encode("utf-8")
    with pytest.raises(ValueError, match="NUL"):
        sent["nul"].get(timeout=10)
    assert jobs_project.add.delay(2, 3).get(timeout=30) == 5  # the worker goes on
    assert worker.terminate(timeout=30) == 0  # and a warm shutdown ends
