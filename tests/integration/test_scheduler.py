"""Delayed jobs wait in the table and are published once, with several workers running."""

from __future__ import annotations

import re

import jobs_project
import kombu
import pytest
from helpers import declare_plain_queue, wait_for

from heretic_kombu import states


def test_each_due_job_is_published_once_by_several_workers(app, start_worker):
    workers = [start_worker(pool="threads", concurrency=4) for _ in range(3)]
    results = [jobs_project.add.apply_async((i, i), countdown=1) for i in range(40)]
    assert all(app.store.get(r.id).status == states.SCHEDULED for r in results)
    assert [r.get(timeout=60) for r in results] == [2 * i for i in range(40)]
    assert all(app.store.get(r.id).attempts == 1 for r in results)
    logs = "".join(w.log() for w in workers)
    published = sum(int(n) for n in re.findall(r"scheduler: published (\d+) due job", logs))
    assert published == 40
    assert len(re.findall(r"Task jobs_project\.add\[[^]]+\] received", logs)) == 40
    assert "message dropped" not in logs


@pytest.mark.parametrize(
    "backend", [pytest.param("services", marks=pytest.mark.services)], indirect=True
)
def test_a_due_job_that_cannot_be_published_does_not_hold_back_the_others(
    app, backend, start_worker
):
    # The queue of one due job exists with other arguments: RabbitMQ refuses it (406).
    legacy = f"{backend.queue}_legacy"
    declare_plain_queue(backend.broker_url, legacy)
    try:
        stuck = jobs_project.add.apply_async((1, 1), countdown=1, queue=legacy)
        fine = [jobs_project.add.apply_async((i, 2), countdown=1) for i in range(5)]
        worker = start_worker()
        assert [r.get(timeout=30) for r in fine] == [i + 2 for i in range(5)]
        wait_for(lambda: "not published" in worker.log(), 10, "the scheduler's warning")
        assert app.store.get(stuck.id).status == states.SCHEDULED  # tried again later
        # Each published job was marked queued once and ran once: none went out twice.
        logs = worker.log()
        assert sum(int(n) for n in re.findall(r"published (\d+) due job", logs)) == 5
        assert all(app.store.get(r.id).attempts == 1 for r in fine)
    finally:
        with kombu.Connection(backend.broker_url) as conn:
            conn.default_channel.queue_delete(legacy)
            conn.default_channel.exchange_delete(legacy)
