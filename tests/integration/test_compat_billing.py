"""compat/billing: a Celery project run by `heretic worker -A billing` unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT

from heretic_kombu import states

COMPAT = ROOT / "compat"


@pytest.fixture
def billing(backend, monkeypatch, tmp_path):
    monkeypatch.delenv("HERETIC_DEFAULT_QUEUE")  # the project's task_default_queue applies
    monkeypatch.syspath_prepend(str(COMPAT))
    import billing.celery as module
    import billing.tasks  # noqa: F401

    module.app.conf.update(database_url=backend.database_url)  # resets cached settings
    env = {**os.environ, "PYTHONPATH": str(COMPAT)}
    with open(tmp_path / "billing-worker.log", "wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "heretic_kombu.cli",
                "-A",
                "billing",
                "worker",
                "-P",
                "threads",
                "-c",
                "2",
                "-Q",
                "billing,invoices",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        yield module.app
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        module.app.close()
        if backend.name == "services":
            from helpers import delete_queues

            delete_queues("billing")
            delete_queues("invoices")


def test_billing_project_runs_unchanged(billing):
    import billing.tasks as tasks

    assert billing.settings.default_queue == "billing"  # from celeryconfig's Celery key
    assert billing.settings.prefetch_multiplier == 1
    ok = tasks.charge.delay("acme", 500, fail_times=1)
    assert ok.get(timeout=30) == {"customer": "acme", "cents": 500, "attempt": 2}
    declined = tasks.charge.apply_async(("acme", 0))
    with pytest.raises(tasks.CardDeclined, match="refusing to charge 0 cents"):
        declined.get(timeout=30)
    inv = tasks.invoice.delay("acme", [{"cents": 100}, {"cents": 250}])
    assert inv.get(timeout=30) == {"customer": "acme", "total": 350, "invoice_id": inv.id}
    assert billing.store.get(inv.id).queue_name == "invoices"  # celeryconfig's task_routes
    assert tasks.settle.delay().get(timeout=30) == "gave up politely"
    job = billing.store.get(ok.id)
    assert job.queue_name == "billing" and job.status == states.SUCCEEDED
    assert job.attempts == 2
