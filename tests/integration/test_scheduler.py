"""Delayed jobs wait in the table and are published once, with several workers running."""

from __future__ import annotations

import re

import jobs_project

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
