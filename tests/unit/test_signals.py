"""Celery's signals fire with Celery's keyword arguments (eager runs and publishing)."""

from __future__ import annotations

from typing import Any

import pytest

from heretic_kombu import signals


@pytest.fixture
def received():
    seen: list[tuple[str, dict[str, Any]]] = []
    receivers = {}
    for name in (
        "task_prerun",
        "task_postrun",
        "task_success",
        "task_failure",
        "task_retry",
        "before_task_publish",
        "after_task_publish",
    ):

        def receiver(name=name, **kwargs):
            seen.append((name, kwargs))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield seen
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


def test_task_signals_in_order_with_celery_arguments(make_app, received):
    app = make_app(task_always_eager=True)

    @app.task(bind=True, max_retries=1)
    def flaky(self, x):
        if self.request.retries == 0:
            raise self.retry(exc=ValueError("first"), countdown=0)
        return x * 2

    assert flaky.delay(21).get() == 42
    names = [name for name, _ in received]
    assert names == [
        "task_prerun",
        "task_retry",
        "task_postrun",
        "task_prerun",
        "task_success",
        "task_postrun",
    ]
    prerun = received[0][1]
    assert prerun["sender"] is flaky and prerun["task"] is flaky
    assert prerun["args"] == [21] and prerun["kwargs"] == {}
    assert received[1][1]["reason"] == "ValueError: first"
    assert received[4][1]["result"] == 42
    assert received[5][1]["state"] == "SUCCESS" and received[5][1]["retval"] == 42


def test_task_failure_carries_the_exception(make_app, received):
    app = make_app(task_always_eager=True)

    @app.task
    def boom():
        raise KeyError("nope")

    boom.delay()
    failure = next(kwargs for name, kwargs in received if name == "task_failure")
    assert isinstance(failure["exception"], KeyError)
    assert "KeyError" in failure["traceback"]
    assert received[-1][1]["state"] == "FAILURE"


def test_sender_filter_and_a_failing_receiver(make_app):
    app = make_app(task_always_eager=True)

    @app.task
    def one():
        return 1

    @app.task
    def two():
        return 2

    only_one: list[Any] = []

    def broken(**kwargs):
        raise RuntimeError("receiver bug")

    def collect(sender=None, **kwargs):
        only_one.append(sender)

    signals.task_success.connect(collect, sender=one)
    signals.task_success.connect(broken)
    try:
        assert one.delay().get() == 1 and two.delay().get() == 2  # jobs unaffected
    finally:
        signals.task_success.disconnect(collect, sender=one)
        signals.task_success.disconnect(broken)
    assert only_one == [one]


def test_publish_signals_around_delay(make_app, received):
    app = make_app()

    @app.task
    def add(x, y):
        return x + y

    result = add.delay(1, 2)
    before = next(kwargs for name, kwargs in received if name == "before_task_publish")
    after = next(kwargs for name, kwargs in received if name == "after_task_publish")
    assert before["sender"] == add.name == after["sender"]
    assert before["headers"]["id"] == result.id and before["headers"]["task"] == add.name
    assert before["body"][0] == [1, 2] and before["routing_key"] == "celery"
