"""Signatures as data (Celery's partial-application rules and dict shape), planning
without a database, and the canvas run eagerly (``task_always_eager``)."""

from __future__ import annotations

import json

import pytest

from heretic_kombu import Celery, chain, chord, group, signature
from heretic_kombu.canvas import Lineage, Signature, plan
from heretic_kombu.exceptions import EncodeError


@pytest.fixture
def app(isolated_env):
    application = Celery("canvas_unit")

    @application.task
    def add(x, y):
        return x + y

    @application.task
    def tsum(values):
        return sum(values)

    @application.task
    def fail(*args):
        raise KeyError("nope")

    @application.task
    def seen(task_id):
        return task_id

    application.add, application.tsum, application.fail, application.seen = add, tsum, fail, seen
    yield application
    application.close()


def test_partial_arguments_are_prepended_and_kwargs_merged(app):
    sig = app.add.s(2).set(countdown=5)
    clone = sig.clone((1,), {"z": 3}, queue="q")
    assert clone.args == [1, 2] and clone.kwargs == {"z": 3}
    assert clone.options == {"countdown": 5, "queue": "q"}
    assert sig.args == [2] and sig.options == {"countdown": 5}  # the original is untouched


def test_immutable_signature_keeps_its_arguments(app):
    sig = app.add.si(1, 1)
    assert sig.immutable and sig.clone((99,)).args == [1, 1]


def test_signature_is_celerys_dict_and_round_trips_as_json(app):
    sig = app.add.s(1, y=2).set(queue="math")
    data = json.loads(json.dumps(sig))
    assert data == {
        "task": app.add.name,
        "args": [1],
        "kwargs": {"y": 2},
        "options": {"queue": "math"},
        "subtask_type": None,
        "immutable": False,
        "chord_size": None,
    }
    again = signature(data, app=app)
    assert isinstance(again, Signature) and again == sig


def test_composites_round_trip_through_their_dicts(app):
    workflow = chain(app.add.s(1, 1), group(app.add.s(1), app.add.s(2)), app.tsum.s())
    again = signature(json.loads(json.dumps(workflow)), app=app)
    assert isinstance(again, chain)
    assert isinstance(again.tasks[1], group) and len(again.tasks[1].tasks) == 2
    body = chord([app.add.s(1, 1)], app.tsum.s())
    rebuilt = signature(json.loads(json.dumps(body)), app=app)
    assert isinstance(rebuilt, chord) and len(rebuilt.header) == 1
    assert rebuilt.body.name == app.tsum.name


def test_pipe_builds_a_flat_chain(app):
    workflow = app.add.s(1, 1) | app.add.s(2) | (app.add.s(3) | app.add.s(4))
    assert isinstance(workflow, chain) and len(workflow.tasks) == 4


def test_unknown_signature_type_is_refused(app):
    with pytest.raises(ValueError, match="unknown signature type"):
        signature({"task": "x", "subtask_type": "bogus", "kwargs": {}}, app=app)


def test_planning_a_chain_writes_only_the_first_step(app):
    planned, handle = plan(app, chain(app.add.s(1, 1), app.add.s(2), app.tsum.s()), Lineage())
    assert len(planned.jobs) == 1
    first = planned.jobs[0]
    workflow = json.loads(first.workflow)
    # Celery's order: the next step is popped from the end.
    assert [s["task"] for s in workflow["chain"]] == [app.tsum.name, app.add.name]
    assert handle.id == workflow["chain"][0]["options"]["task_id"]


def test_planning_a_chord_creates_its_counter(app):
    planned, handle = plan(app, chord([app.add.s(i, i) for i in range(3)], app.tsum.s()), Lineage())
    assert [c.total for c in planned.chords] == [3]
    group_ids = {j.group_id for j in planned.jobs}
    assert group_ids == {planned.chords[0].group_id}
    indexes = sorted(json.loads(j.workflow)["group_index"] for j in planned.jobs)
    assert indexes == [0, 1, 2]
    assert json.loads(planned.chords[0].body)["options"]["task_id"] == handle.id


def test_non_json_arguments_fail_before_anything_is_planned(app):
    with pytest.raises(EncodeError):
        plan(app, group(app.add.s(1, 1), app.add.s(object(), 1)), Lineage())


def test_chord_without_body_is_refused(app):
    with pytest.raises(ValueError, match="needs a body"):
        plan(app, chord([app.add.s(1, 1)]), Lineage())


def test_eager_canvas(app):
    app.conf.task_always_eager = True
    assert (app.add.s(1, 1) | app.add.s(10)).apply_async().get() == 12
    assert group(app.add.s(i, i) for i in range(3)).apply_async().get() == [0, 2, 4]
    assert chord([app.add.s(1, 1), app.add.s(2, 2)], app.tsum.s()).apply_async().get() == 6
    assert app.add.s(2, 2).apply().get() == 4


def test_eager_links(app):
    result = app.add.s(1, 2)
    result.link(app.add.s(10))
    assert result.apply().get() == 3
    failing = app.fail.s()
    failing.link_error(app.seen.s())
    outcome = failing.apply()
    assert outcome.failed() and isinstance(outcome.result, KeyError)


def test_eager_canvas_propagates_when_asked(app):
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    with pytest.raises(KeyError, match="nope"):
        (app.add.s(1, 1) | app.fail.s()).apply_async()
    with pytest.raises(KeyError, match="nope"):
        app.fail.apply_async(link=app.add.s(1))
