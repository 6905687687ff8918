"""Canvas end to end: chain, group, chord, links and errbacks, on real workers.

Each case applies a workflow from this process and checks what a Celery user sees
(results, ``GroupResult``, ``ChordError``) and what heretic adds: every step is a row,
found by its lineage columns.
"""

from __future__ import annotations

import canvas_tasks as ct
import jobs_project
import pytest
from helpers import wait_for

from heretic_kombu import exceptions, states
from heretic_kombu.canvas import chain, chord, group


def rows_of(app, root_id):
    return [j for j in app.store.list(limit=500) if j.root_id == root_id]


def test_chain_passes_each_result_on_and_records_lineage(app, start_worker):
    start_worker()
    result = (jobs_project.add.s(2, 2) | jobs_project.add.s(4) | ct.mul.s(10)).apply_async()
    assert result.get(timeout=30) == 80
    assert result.parent.get(timeout=5) == 8
    assert result.parent.parent.get(timeout=5) == 4
    first = app.store.get(result.parent.parent.id)
    second = app.store.get(result.parent.id)
    third = app.store.get(result.id)
    assert second.parent_id == first.task_id and third.parent_id == second.task_id
    assert {first.root_id, second.root_id, third.root_id} == {first.task_id}
    assert second.payload == {"args": [4, 4], "kwargs": {}}
    assert [j.task_name for j in sorted(rows_of(app, first.task_id), key=lambda j: j.id)] == [
        "jobs_project.add",
        "jobs_project.add",
        "canvas_tasks.mul",
    ]


def test_immutable_signature_ignores_the_parent_result(app, start_worker):
    start_worker()
    result = chain(jobs_project.add.s(1, 1), ct.mul.si(3, 3)).apply_async()
    assert result.get(timeout=30) == 9


def test_a_failing_step_stops_the_chain_and_calls_its_errback(app, start_worker):
    start_worker()
    workflow = chain(jobs_project.add.s(1, 1), ct.explode.s(), ct.mul.s(2))
    workflow.link_error(ct.errback_seen.s())
    result = workflow.apply_async()
    failing = result.parent
    with pytest.raises(ValueError, match=r"exploded with \[2\]"):
        failing.get(timeout=30)
    errbacks = wait_for(
        lambda: [c for c in failing.children if c.name == ct.errback_seen.name], 30, "errback"
    )
    assert errbacks[0].get(timeout=30) == f"errback got {failing.id}"
    # As Celery: the step after the failure never runs, and is failed with the same error,
    # so waiting on the chain raises it rather than waiting forever.
    with pytest.raises(ValueError, match=r"exploded with \[2\]"):
        result.get(timeout=30)
    never = app.store.get(result.id)
    assert never.status == states.FAILED and never.attempts == 0
    assert len(never.attempt_logs) == 1 and "not run: an earlier step" in never.attempt_logs[0]
    assert never.parent_id == failing.id


def test_group_returns_a_group_result(app, start_worker):
    start_worker()
    result = group(jobs_project.add.s(i, i) for i in range(6)).apply_async()
    assert result.get(timeout=30) == [0, 2, 4, 6, 8, 10]
    assert result.ready() and result.successful() and not result.failed()
    assert result.completed_count() == 6
    assert result.join(timeout=5) == [0, 2, 4, 6, 8, 10]
    members = [app.store.get(r.id) for r in result.results]
    assert {m.group_id for m in members} == {result.id}
    assert all(m.status == states.SUCCEEDED for m in members)


def test_group_with_a_failure(app, start_worker):
    start_worker()
    result = group(jobs_project.add.s(1, 1), ct.explode.s(7)).apply_async()
    with pytest.raises(ValueError):
        result.get(timeout=30)
    wait_for(result.ready, 30, "both jobs to finish")
    assert result.failed() and not result.successful() and result.completed_count() == 1
    assert result.get(timeout=5, propagate=False)[0] == 2


def test_chord_body_runs_exactly_once_with_racing_workers(app, start_worker, backend, monkeypatch):
    # Each worker reserves one message per slot, short jobs or not, so that the header
    # spreads over the three: a worker that reserved many could take it all alone.
    monkeypatch.setenv("HERETIC_SHORT_JOB_PREFETCH_MULTIPLIER", "1")
    for _ in range(3):
        start_worker("--prefetch-multiplier", "1", concurrency=2)
    size = 30
    result = chord((ct.jittery.s(i) for i in range(size)), ct.collect.s(label="race")).apply_async()
    assert result.get(timeout=60) == list(range(size))
    runs = backend.events_path.with_name("chord-bodies.txt").read_text().split()
    assert runs == ["race"]
    body = app.store.get(result.id)
    header = [app.store.get(r.id) for r in result.parent.results]
    assert {h.group_id for h in header} == {result.parent.id}
    assert body.parent_id in {h.task_id for h in header}
    assert len({h.worker for h in header}) > 1  # the header really was spread out


def test_chord_header_failure_fails_the_body_and_calls_its_errback(app, start_worker):
    start_worker()
    body = ct.tsum.s()
    body.link_error(ct.errback_seen.s())
    result = chord([jobs_project.add.s(1, 1), ct.explode.s(5)], body).apply_async()
    with pytest.raises(ValueError, match="exploded"):  # the header's error first, as Celery
        result.get(timeout=30)
    with pytest.raises(exceptions.ChordError, match="Dependency .* raised ValueError"):
        result.get(timeout=30, follow_parents=False)
    row = app.store.get(result.id)
    assert row.status == states.FAILED and row.attempts == 0  # never ran
    assert "not run: chord header job" in row.attempt_logs[0]
    errback = wait_for(lambda: result.children, 30, "the body's errback")
    assert errback[0].get(timeout=30) == f"errback got {result.id}"


def test_chain_through_a_group_becomes_a_chord(app, start_worker):
    start_worker()
    workflow = chain(
        jobs_project.add.s(1, 1), group(jobs_project.add.s(1), ct.mul.s(3)), ct.tsum.s()
    )
    assert workflow.apply_async().get(timeout=30) == (2 + 1) + (2 * 3)


def test_link_and_link_error_options(app, start_worker):
    start_worker()
    result = jobs_project.add.apply_async((2, 3), link=ct.mul.s(10))
    assert result.get(timeout=30) == 5
    child = wait_for(lambda: result.children, 30, "the callback job")
    assert child[0].get(timeout=30) == 50
    failing = ct.explode.apply_async((1,), link_error=[ct.errback_seen.s()])
    with pytest.raises(ValueError):
        failing.get(timeout=30)
    errback = wait_for(lambda: failing.children, 30, "the errback job")
    assert errback[0].get(timeout=30) == f"errback got {failing.id}"


def test_starmap_and_chunks(app, start_worker):
    start_worker()
    assert jobs_project.add.starmap([(1, 2), (3, 4)]).apply_async().get(timeout=30) == [3, 7]
    chunks = jobs_project.add.chunks([(i, i) for i in range(5)], 2).apply_async()
    assert chunks.get(timeout=30) == [[0, 2], [4, 6], [8]]


def test_forget_clears_the_result_but_keeps_the_history(app, start_worker):
    start_worker()
    result = jobs_project.add.delay(20, 22)
    assert result.get(timeout=30) == 42
    result.forget()
    job = app.store.get(result.id)
    assert job.status == states.SUCCEEDED and job.result is None
    assert "result forgotten" in job.attempt_logs[-1]


def test_a_rolled_back_transaction_sends_no_group(app, backend):
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    engine = sa.create_engine(app.store.engine.url)
    with pytest.raises(RuntimeError), Session(engine) as session:
        with app.transaction(session):
            group(jobs_project.add.s(i, i) for i in range(3)).apply_async()
            raise RuntimeError("rollback")
    assert app.store.list() == []
    engine.dispose()


def test_a_header_job_that_kills_its_worker_fails_the_chord(app, start_worker):
    start_worker()
    result = chord([jobs_project.add.s(1, 1), jobs_project.die.s()], ct.tsum.s()).apply_async()
    with pytest.raises(exceptions.WorkerLostError):
        result.get(timeout=60)
    with pytest.raises(exceptions.ChordError, match="WorkerLostError"):
        result.get(timeout=5, follow_parents=False)


def test_a_chain_in_a_chord_header_failing_early_fails_the_chord(app, start_worker):
    start_worker()
    header = [jobs_project.add.s(1, 1), chain(ct.explode.s(1), jobs_project.add.s(1))]
    result = chord(header, ct.tsum.s()).apply_async()
    with pytest.raises(ValueError, match="exploded"):
        result.get(timeout=30)
    with pytest.raises(exceptions.ChordError, match="exploded"):
        result.get(timeout=5, follow_parents=False)


def test_a_chain_in_a_chord_header_counts_by_its_last_step(app, start_worker):
    start_worker()
    header = [jobs_project.add.s(1, 1), chain(jobs_project.add.s(2, 2), ct.mul.s(10))]
    assert chord(header, ct.collect.s(label="nested")).apply_async().get(timeout=30) == [2, 40]
