"""The parity scenarios: each takes the project module and returns a short JSON-able outcome.

An outcome must mean the same thing on Celery and on heretic_kombu when they behave the
same, so it holds no task ids, timestamps or queue prefixes (:func:`normalise` replaces
UUIDs by ``<id>`` and drops the run's queue prefix). A scenario is written only against
Celery's documented API, through the names ``proj`` imported.

``SCENARIOS`` lists them in order; ``run.py`` runs each with a timeout.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import re
import time
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Any

Outcome = Any
Scenario = Callable[[ModuleType], Outcome]

SCENARIOS: dict[str, Scenario] = {}
GET_TIMEOUT = 15.0
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def scenario(fun: Scenario) -> Scenario:
    """Register ``fun`` under its name (without a leading ``s_``)."""
    SCENARIOS[fun.__name__.removeprefix("s_")] = fun
    return fun


# ---- helpers -------------------------------------------------------------------------------


def normalise(value: Any, prefix: str) -> Any:
    """``value`` as plain JSON with ids replaced by ``<id>`` and ``prefix.`` dropped."""
    if isinstance(value, dict):
        return {str(k): normalise(v, prefix) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v, prefix) for v in value]
    if isinstance(value, BaseException):
        return exc_outcome(value, prefix)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return _UUID.sub("<id>", value.replace(prefix + ".", ""))
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return normalise(repr(value), prefix)


def exc_outcome(exc: BaseException, prefix: str = "") -> list[Any]:
    """``[type name, message]`` of an exception, normalised."""
    return [type(exc).__name__, normalise(str(exc), prefix)]


def settle(result: Any, timeout: float = GET_TIMEOUT) -> list[Any]:
    """``["SUCCESS", value]`` or ``["FAILURE", type, message]`` from ``result.get()``."""
    try:
        value = result.get(timeout=timeout)
    except Exception as exc:
        return ["FAILURE", *exc_outcome(exc)]
    return ["SUCCESS", value]


def settle_type(result: Any, timeout: float = GET_TIMEOUT) -> list[Any]:
    """Like :func:`settle` but a failure keeps only the exception's type."""
    outcome = settle(result, timeout)
    return outcome[:2]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def events(p: ModuleType, key: str, until: str | None = None, timeout: float = 5.0) -> list[Any]:
    """The events recorded for ``key`` as ``[kind, data]``, once ``until`` is among them."""

    def read() -> list[dict[str, Any]] | None:
        found = p.recorded(key)
        if until is None:
            return found or None
        return found if any(e["kind"] == until for e in found) else None

    found = wait_until(read, timeout) or p.recorded(key)
    return [[e["kind"], e["data"]] for e in found]


def token() -> str:
    return f"t{uuid.uuid4().hex}"


def state_after_run(p: ModuleType, result: Any, key: str, settle_for: float = 1.5) -> str:
    """The task's state once its body has run (``key`` recorded ``ran``) and settled."""
    wait_until(lambda: p.recorded(key), 10)
    time.sleep(settle_for)
    return result.state


# ---- basics --------------------------------------------------------------------------------


@scenario
def s_delay_get(p):
    return settle(p.add.delay(3, 4))


@scenario
def s_apply_async_kwargs(p):
    return settle(p.sub.apply_async(kwargs={"x": 10, "y": 4}))


@scenario
def s_shared_task(p):
    return settle(p.shared_add.delay(20, 22))


@scenario
def s_unknown_id_is_pending(p):
    result = p.app.AsyncResult(str(uuid.uuid4()))
    return [result.state, result.ready()]


@scenario
def s_result_api_on_failure(p):
    result = p.fail.delay("api")
    value = result.get(timeout=GET_TIMEOUT, propagate=False)
    return [result.state, result.ready(), result.successful(), result.failed(), exc_outcome(value)]


@scenario
def s_get_timeout(p):
    result = p.sleeper.delay(token(), 1.5)
    try:
        result.get(timeout=0.2)
    except Exception as exc:
        outcome = type(exc).__name__
    else:
        outcome = "no timeout"
    return [outcome, settle(result)]


# ---- exceptions and argument encoding ------------------------------------------------------


@scenario
def s_custom_exception(p):
    result = p.raise_custom.delay("card declined", 402)
    try:
        result.get(timeout=GET_TIMEOUT)
    except Exception as exc:
        return [type(exc).__name__, list(exc.args), isinstance(exc, p.ParityError)]
    return "no exception"


@scenario
def s_builtin_exception(p):
    result = p.raise_keyerror.delay("missing")
    try:
        result.get(timeout=GET_TIMEOUT)
    except KeyError as exc:
        return ["KeyError", list(exc.args)]
    except Exception as exc:
        return exc_outcome(exc)
    return "no exception"


@scenario
def s_nan_argument(p):
    try:
        result = p.echo.delay(float("nan"))
    except Exception as exc:
        return ["refused at call", type(exc).__name__]
    return settle(result)


@scenario
def s_non_json_argument(p):
    try:
        p.echo.delay(object())
    except Exception as exc:
        return ["refused at call", type(exc).__name__]
    return "accepted"


@scenario
def s_argument_types_round_trip(p):
    values = (
        (1, 2),
        dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        decimal.Decimal("1.5"),
        uuid.UUID(int=7),
    )
    try:
        result = p.arg_types.delay(*values)
    except Exception as exc:
        return ["refused at call", type(exc).__name__]
    return settle(result)


@scenario
def s_serializer_pickle(p):
    if p.pickled is None:
        return p.PICKLE_DECLARATION
    result = p.pickled.delay(1)
    time.sleep(2)
    return [*p.PICKLE_DECLARATION, result.state]


# ---- typing --------------------------------------------------------------------------------


@scenario
def s_typing_too_many_args(p):
    try:
        p.add.delay(1, 2, 3)
    except TypeError:
        return ["TypeError at call"]
    return "accepted"


@scenario
def s_typing_unexpected_kwarg(p):
    try:
        p.add.apply_async((1,), {"z": 2})
    except TypeError:
        return ["TypeError at call"]
    return "accepted"


@scenario
def s_typing_off(p):
    try:
        result = p.untyped.delay(1)
    except TypeError:
        return ["TypeError at call"]
    return settle_type(result)


# ---- retries ---------------------------------------------------------------------------------


@scenario
def s_retry_then_succeed(p):
    return settle(p.flaky.delay(2))


@scenario
def s_retry_exhausted_raises_exc(p):
    return settle(p.always_retry.delay())


@scenario
def s_retry_exhausted_without_exc(p):
    return settle_type(p.retry_without_exc.delay())


@scenario
def s_retry_max_retries_caught(p):
    return settle(p.catch_max_retries.delay())


@scenario
def s_autoretry_then_succeed(p):
    return settle(p.autoretrying.delay(2))


@scenario
def s_autoretry_gives_up(p):
    return settle(p.autoretry_gives_up.delay())


@scenario
def s_autoretry_other_error_not_retried(p):
    return settle(p.autoretry_other_error.delay())


# ---- routing ---------------------------------------------------------------------------------


@scenario
def s_route_default_queue(p):
    return settle(p.whoami.delay())


@scenario
def s_route_glob(p):
    return settle(p.routed_probe.delay())


@scenario
def s_route_queue_argument(p):
    return settle(p.whoami.apply_async(queue=p.queue("other")))


@scenario
def s_route_task_queue_option(p):
    return settle(p.queued_probe.delay())


@scenario
def s_send_task_by_name(p):
    return settle(p.app.send_task("compat.parity.proj.add", args=(4, 5)))


@scenario
def s_send_task_routed_by_glob(p):
    return settle(p.app.send_task("compat.parity.proj.routed_probe"))


@scenario
def s_send_task_unknown_name(p):
    result = p.app.send_task("compat.parity.proj.no_such_task", args=(1,))
    time.sleep(2)
    return [result.state]


# ---- the request -------------------------------------------------------------------------


@scenario
def s_request_fields(p):
    task_id = str(uuid.uuid4())
    result = p.request_probe.apply_async((1, "a"), {"k": 2}, task_id=task_id)
    outcome = settle(result)
    if outcome[0] == "SUCCESS":
        fields = dict(outcome[1])
        fields["id"] = fields["id"] == task_id
        fields["root_id"] = fields["root_id"] == task_id
        outcome[1] = fields
    return outcome


@scenario
def s_request_lineage_in_chain(p):
    result = (p.add.s(1, 1) | p.lineage.s()).apply_async()
    outcome = settle(result)
    if outcome[0] == "SUCCESS":
        seen = outcome[1]
        first = result.parent.id
        outcome[1] = {
            "value": seen["value"],
            "parent_is_first": seen["parent_id"] == first,
            "root_is_first": seen["root_id"] == first,
        }
    return outcome


# ---- hooks and signals ---------------------------------------------------------------------


@scenario
def s_hooks_success(p):
    result = p.hooked.delay("ok")
    return [settle(result), events(p, result.id, until="after_return")]


@scenario
def s_hooks_failure(p):
    result = p.hooked.delay("fail")
    return [settle(result), events(p, result.id, until="after_return")]


@scenario
def s_hooks_retry(p):
    result = p.hooked.delay("retry")
    outcome = settle(result)
    wait_until(lambda: [e for e in p.recorded(result.id) if e["kind"] == "on_success"], 5)
    time.sleep(0.3)  # after_return follows on_success
    return [outcome, [e for e in events(p, result.id) if not e[0].startswith("task_")]]


@scenario
def s_hooks_ignore(p):
    result = p.hooked.delay("ignore")
    wait_until(lambda: p.recorded(result.id), 10)
    time.sleep(1)
    return [e[0] for e in events(p, result.id)]


@scenario
def s_signals_success(p):
    result = p.add.delay(2, 3)
    outcome = settle(result)
    seen = events(p, result.id, until="task_postrun")
    return [outcome, [e for e in seen if e[0].startswith("task_")]]


@scenario
def s_signals_failure(p):
    result = p.fail.delay("sig")
    outcome = settle(result)
    seen = events(p, result.id, until="task_postrun")
    return [outcome, [e for e in seen if e[0].startswith("task_")]]


@scenario
def s_signals_retry(p):
    result = p.flaky.delay(1)
    outcome = settle(result)
    wait_until(lambda: len([e for e in p.recorded(result.id) if e["kind"] == "task_postrun"]) >= 2)
    seen = events(p, result.id)
    return [outcome, [e[0] for e in seen if e[0].startswith("task_")]]


@scenario
def s_publish_signals(p):
    del p.PUBLISHED[:]
    result = p.add.delay(1, 1)
    settle(result)
    return [[e["signal"], e["sender"]] for e in p.PUBLISHED if e["id"] == result.id]


# ---- state, results, expiry, eta ----------------------------------------------------------


@scenario
def s_update_state_progress(p):
    key = token()
    result = p.progress.delay(key)
    seen = wait_until(lambda: result.state == "PROGRESS", 10)
    state, info = result.state, result.info
    (p.STATE_DIR / f"{key}.release").touch()
    return [bool(seen), state, info, settle(result)]


@scenario
def s_ignore_result(p):
    key = token()
    result = p.no_result.delay(key)
    ran = bool(wait_until(lambda: p.recorded(key), 10))
    time.sleep(1)
    return [ran, result.state]


@scenario
def s_expires_before_it_runs(p):
    result = p.add.apply_async((1, 1), countdown=1.5, expires=0.5)
    return [settle_type(result), result.state]


@scenario
def s_expires_in_future_runs(p):
    return settle(p.add.apply_async((1, 1), expires=60))


@scenario
def s_countdown(p):
    sent = time.time()
    outcome = settle(p.stamp.apply_async(countdown=1))
    if outcome[0] == "SUCCESS":
        outcome[1] = outcome[1] - sent >= 0.9
    return outcome


@scenario
def s_eta(p):
    sent = time.time()
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    outcome = settle(p.stamp.apply_async(eta=eta))
    if outcome[0] == "SUCCESS":
        outcome[1] = outcome[1] - sent >= 0.9
    return outcome


# ---- revoke, time limits, reject, ignore, rate limit ------------------------------------------


@scenario
def s_revoke_before_start(p):
    result = p.add.apply_async((2, 2), countdown=1.5)
    result.revoke()
    return [settle_type(result), result.state]


@scenario
def s_revoke_terminate_running(p):
    key = token()
    result = p.sleeper.delay(key, 8)
    started = bool(wait_until(lambda: p.recorded(key), 10))
    result.revoke(terminate=True)
    return [started, settle_type(result), result.state]


@scenario
def s_soft_time_limit_caught(p):
    return settle(p.soft_limited.delay())


@scenario
def s_hard_time_limit(p):
    result = p.hard_limited.delay()
    return [settle_type(result), result.state]


@scenario
def s_reject(p):
    key = token()
    result = p.rejecting.delay(key)
    return [state_after_run(p, result, key)]


@scenario
def s_ignore(p):
    key = token()
    result = p.ignoring.delay(key)
    return [state_after_run(p, result, key)]


@scenario
def s_ignore_keeps_custom_state(p):
    key = token()
    result = p.custom_state_then_ignore.delay(key)
    state = state_after_run(p, result, key)
    return [state, result.info if state == "CUSTOM" else None]


@scenario
def s_rate_limit(p):
    results = [p.limited.delay() for _ in range(4)]
    stamps = [r.get(timeout=GET_TIMEOUT) for r in results]
    return ["SUCCESS", len(stamps), max(stamps) - min(stamps) >= 1.0]


# ---- canvas --------------------------------------------------------------------------------


@scenario
def s_signature_delay(p):
    return settle(p.add.s(2, 2).delay())


@scenario
def s_signature_partial_args_prepended(p):
    return settle(p.sub.s(10).delay(3))


@scenario
def s_signature_clone(p):
    return settle(p.sub.s(10).clone(args=(3,)).apply_async())


@scenario
def s_signature_set_queue(p):
    return settle(p.whoami.s().set(queue=p.queue("other")).apply_async())


@scenario
def s_signature_by_name(p):
    return settle(p.signature("compat.parity.proj.add", args=(1, 2)).apply_async())


@scenario
def s_chain_pipe(p):
    result = (p.add.s(2, 2) | p.add.s(4) | p.mul.s(10)).apply_async()
    return [settle(result), result.parent.get(timeout=GET_TIMEOUT)]


@scenario
def s_chain_function(p):
    return settle(p.chain(p.add.s(1, 1), p.mul.s(3))())


@scenario
def s_chain_immutable_step(p):
    return settle((p.add.s(1, 1) | p.add.si(5, 5)).apply_async())


@scenario
def s_chain_failing_step(p):
    result = (p.add.s(1, 1) | p.fail.s() | p.add.s(1)).apply_async()
    failed_step = settle(result.parent)
    last_step_get = settle(result, timeout=5)  # Celery's get() follows the parents
    time.sleep(1)
    return [failed_step, last_step_get, result.state]


@scenario
def s_link_callback(p):
    key = token()
    result = p.add.apply_async((2, 3), link=p.record_link.s(key))
    outcome = settle(result)
    return [outcome, events(p, key, until="callback")]


@scenario
def s_link_error_errback(p):
    result = p.fail.apply_async(("link",), link_error=p.on_error.s())
    outcome = settle(result)
    return [outcome, [e[0] for e in events(p, f"errback-{result.id}", until="errback")]]


@scenario
def s_group_results(p):
    result = p.group(p.add.s(i, i) for i in range(5)).apply_async()
    values = result.get(timeout=GET_TIMEOUT)
    return [
        type(result).__name__,
        values,
        result.ready(),
        result.successful(),
        result.completed_count(),
        result.join(timeout=GET_TIMEOUT),
    ]


@scenario
def s_group_failing_member(p):
    result = p.group(p.add.s(1, 1), p.fail.s("g")).apply_async()
    values = result.join(timeout=GET_TIMEOUT, propagate=False)
    return [
        [exc_outcome(v) if isinstance(v, BaseException) else v for v in values],
        result.successful(),
        result.failed(),
        result.completed_count(),
    ]


@scenario
def s_chord(p):
    return settle(p.chord((p.add.s(i, i) for i in range(4)), p.tsum.s())())


@scenario
def s_chord_from_group_pipe(p):
    return settle((p.group(p.add.s(1, 1), p.add.s(2, 2)) | p.tsum.s()).apply_async())


@scenario
def s_chord_failing_header(p):
    result = p.chord([p.add.s(1, 1), p.fail.s("header")], p.tsum.s()).apply_async()
    body_get = settle_type(result, timeout=5)  # Celery's get() follows the parents
    wait_until(result.ready, 5)
    stored = result.result
    return [body_get, result.state, type(stored).__name__]


@scenario
def s_starmap(p):
    return settle(p.add.starmap([(1, 2), (3, 4)]).apply_async())


@scenario
def s_chunks(p):
    result = p.add.chunks([(i, i) for i in range(6)], 2).apply_async()
    return settle(result)


# ---- eager mode (last: it changes the app's configuration for a moment) ----------------------


@scenario
def s_apply_locally(p):
    result = p.add.apply((5, 6))
    return [result.get(), result.state, result.successful()]


@scenario
def s_always_eager(p):
    p.app.conf.task_always_eager = True
    try:
        result = p.add.delay(2, 3)
        return [type(result).__name__, result.get(), result.state]
    finally:
        p.app.conf.task_always_eager = False


@scenario
def s_always_eager_propagates(p):
    p.app.conf.task_always_eager = True
    p.app.conf.task_eager_propagates = True
    try:
        p.fail.delay("eager")
    except Exception as exc:
        return ["raised at call", *exc_outcome(exc)]
    finally:
        p.app.conf.task_always_eager = False
        p.app.conf.task_eager_propagates = False
    return "did not raise"
