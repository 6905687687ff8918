"""task_routes picks queues as Celery does; custom base classes get Celery's hooks."""

from __future__ import annotations

from typing import Any

import pytest

from heretic_kombu import Task
from heretic_kombu.exceptions import ConfigurationError
from heretic_kombu.routing import route


def test_route_forms():
    routes = {"billing.charge": {"queue": "payments"}, "mail.*": "mail", "x.y": {"q": 1}}
    assert route(routes, "billing.charge", [], {}) == "payments"
    assert route(routes, "mail.send", [], {}) == "mail"
    assert route(routes, "other.task", [], {}) is None
    with pytest.raises(ConfigurationError, match="names no queue"):
        route(routes, "x.y", [], {})

    def by_size(name, args, kwargs, options, task=None, **kw):
        return {"queue": "big"} if args and args[0] > 100 else None

    assert route([by_size, {"*": "default-ish"}], "a.b", [500], {}) == "big"
    assert route([by_size, {"*": "default-ish"}], "a.b", [5], {}) == "default-ish"
    assert route(None, "a.b", [], {}) is None
    with pytest.raises(ConfigurationError):
        route([42], "a.b", [], {})


def test_queue_precedence_call_then_routes_then_task_then_default(make_app):
    app = make_app(task_routes={"unit.routed": {"queue": "routed"}})

    @app.task(name="unit.routed", queue="own")
    def routed() -> None:
        return None

    @app.task(name="unit.owned", queue="own")
    def owned() -> None:
        return None

    @app.task(name="unit.plain")
    def plain() -> None:
        return None

    results = {
        "explicit": routed.apply_async(queue="explicit"),
        "routed": routed.delay(),
        "own": owned.delay(),
        "celery": plain.delay(),
    }
    queue_of = {key: app.store.get(r.id).queue_name for key, r in results.items()}
    assert queue_of == {
        "explicit": "explicit",
        "routed": "routed",
        "own": "own",
        "celery": "celery",
    }


def test_custom_base_hooks_in_celerys_order(make_app):
    app = make_app(task_always_eager=True)
    calls: list[tuple[Any, ...]] = []

    class Audited(Task):
        def before_start(self, task_id, args, kwargs):
            calls.append(("before_start", args))

        def on_success(self, retval, task_id, args, kwargs):
            calls.append(("on_success", retval))

        def on_retry(self, exc, task_id, args, kwargs, einfo):
            calls.append(("on_retry", repr(exc)))

        def on_failure(self, exc, task_id, args, kwargs, einfo):
            calls.append(("on_failure", repr(exc), "ZeroDivisionError" in einfo))

        def after_return(self, status, retval, task_id, args, kwargs, einfo):
            calls.append(("after_return", status))

    @app.task(base=Audited, bind=True, max_retries=1)
    def divide(self, a, b):
        if self.request.retries == 0 and b == 2:
            raise self.retry(exc=ConnectionError("flaky"), countdown=0)
        return a / b

    assert divide.delay(4, 2).get() == 2
    assert calls == [
        ("before_start", [4, 2]),
        ("on_retry", "ConnectionError('flaky')"),  # no after_return for a retry (Celery)
        ("before_start", [4, 2]),
        ("on_success", 2),
        ("after_return", "SUCCESS"),
    ]
    calls.clear()
    with pytest.raises(ZeroDivisionError):
        divide.delay(1, 0).get()
    assert calls == [
        ("before_start", [1, 0]),
        ("on_failure", "ZeroDivisionError('division by zero')", True),
        ("after_return", "FAILURE"),
    ]


def test_a_failing_hook_does_not_change_the_outcome(make_app):
    app = make_app(task_always_eager=True)

    class Broken(Task):
        def on_success(self, retval, task_id, args, kwargs):
            raise RuntimeError("hook bug")

    @app.task(base=Broken)
    def ok():
        return "fine"

    assert ok.delay().get() == "fine"
