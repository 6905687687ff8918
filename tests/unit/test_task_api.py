"""Celery's task API without a worker: naming, direct calls, sending, eager mode.

Every app here uses SQLite files in ``tmp_path`` for the job table and the embedded
broker, with every ``HERETIC_*`` variable of the surrounding environment removed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import kombu.exceptions
import pytest
from helpers import wait_queued

from heretic_kombu import EagerResult, Heretic, MaxRetriesExceededError, Task
from heretic_kombu.exceptions import ConfigurationError, EncodeError
from heretic_kombu.store import utcnow

MakeApp = Callable[..., Heretic]


@pytest.fixture
def app(make_app: MakeApp) -> Heretic:
    return make_app()


@pytest.fixture
def eager_app(make_app: MakeApp) -> Heretic:
    return make_app(task_always_eager=True)


def queued_messages(app: Heretic) -> int:
    return app.broker.queue_size(app.settings.default_queue)


# -- declaring and calling -------------------------------------------------------------


def test_task_name_is_module_and_qualname(app: Heretic) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == f"{__name__}.test_task_name_is_module_and_qualname.<locals>.add"
    assert app.tasks[add.name] is add
    assert isinstance(add, Task)


def test_task_name_can_be_given(app: Heretic) -> None:
    @app.task(name="billing.charge")
    def charge(amount: int) -> int:
        return amount

    assert charge.name == "billing.charge"
    assert app.tasks["billing.charge"] is charge


def test_calling_a_task_runs_it_here(app: Heretic) -> None:
    @app.task
    def add(x: int, y: int = 10) -> int:
        return x + y

    assert add(2, 3) == 5
    assert add(2) == 12
    assert add(x=1, y=1) == 2
    assert app.store.list() == []


def test_calling_a_bound_task_directly_sees_a_direct_request(app: Heretic) -> None:
    @app.task(bind=True)
    def whoami(self: Task, value: int) -> dict[str, Any]:
        return {"direct": self.request.called_directly, "args": self.request.args}

    assert whoami(7) == {"direct": True, "args": [7]}


def test_task_keeps_the_functions_docstring(app: Heretic) -> None:
    @app.task
    def documented() -> None:
        """Does things."""

    assert documented.__doc__ == "Does things."


def test_pickle_serializer_is_refused_at_decoration(app: Heretic) -> None:
    with pytest.raises(ConfigurationError, match="pickle"):

        @app.task(serializer="pickle")
        def unsafe() -> None:
            pass

    assert not any(name.endswith("unsafe") for name in app.tasks)


def test_json_serializer_is_accepted_at_decoration(app: Heretic) -> None:
    @app.task(serializer="json")
    def fine() -> int:
        return 1

    assert fine() == 1


# -- refusals before anything is written ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1, 2, 3), {}), ((1,), {"z": 2}), ((1, 2), {"x": 1})],
)
def test_arguments_not_matching_the_signature_raise_before_writing(
    app: Heretic, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError) as info:
        add.delay(*args, **kwargs)
    assert add.name in str(info.value)
    assert app.store.list() == []
    assert queued_messages(app) == 0


def test_apply_async_checks_the_signature_too(app: Heretic) -> None:
    @app.task
    def one(x: int) -> int:
        return x

    with pytest.raises(TypeError):
        one.apply_async(args=(1,), kwargs={"x": 1})
    assert app.store.list() == []


@pytest.mark.parametrize(
    "value",
    [object(), float("nan"), "nul\x00", {"k": {1, 2}}, "\ud800"],
    # Stable ids: every xdist process must collect the same names (repr(object()) differs).
    ids=["object", "nan", "nul", "set", "lone-surrogate"],
)
def test_arguments_that_are_not_json_raise_encode_error_and_write_nothing(
    app: Heretic, value: Any
) -> None:
    @app.task
    def take(value: Any) -> None:
        pass

    with pytest.raises(EncodeError) as info:
        take.delay(value)
    assert isinstance(info.value, kombu.exceptions.EncodeError)
    assert app.store.list() == []
    assert queued_messages(app) == 0


def test_keyword_arguments_that_are_not_json_write_nothing(app: Heretic) -> None:
    @app.task
    def take(**kwargs: Any) -> None:
        pass

    with pytest.raises(EncodeError):
        take.delay(when=object())
    assert app.store.list() == []


# -- results without a worker ----------------------------------------------------------


def test_unknown_task_id_is_pending_and_not_ready(app: Heretic) -> None:
    result = app.AsyncResult(str(uuid.uuid4()))
    assert result.state == "PENDING"
    assert result.status == "PENDING"
    assert result.ready() is False
    assert result.successful() is False
    assert result.failed() is False
    assert result.result is None


def test_unknown_task_id_via_the_task_is_pending(app: Heretic) -> None:
    @app.task
    def noop() -> None:
        pass

    result = noop.AsyncResult(str(uuid.uuid4()))
    assert result.state == "PENDING"
    assert not result.ready()


def test_get_on_a_job_nobody_runs_times_out(app: Heretic) -> None:
    from heretic_kombu.exceptions import TimeoutError as HereticTimeout

    with pytest.raises(HereticTimeout):
        app.AsyncResult(str(uuid.uuid4())).get(timeout=0.05)


# -- sending without a worker ------------------------------------------------------------


def test_countdown_writes_a_scheduled_row_and_publishes_nothing(app: Heretic) -> None:
    @app.task
    def later(x: int) -> int:
        return x

    before = utcnow()
    result = later.apply_async((5,), countdown=60)
    after = utcnow()

    job = app.store.get(result.id)
    assert job is not None
    assert job.status == "scheduled"
    assert job.task_name == later.name
    assert job.payload == {"args": [5], "kwargs": {}}
    assert job.eta is not None
    assert before + dt.timedelta(seconds=60) <= job.eta <= after + dt.timedelta(seconds=60)
    assert job.max_attempts == 4  # Celery's default max_retries=3
    assert result.state == "PENDING"
    assert not result.ready()
    assert queued_messages(app) == 0


def test_eta_in_the_future_writes_a_scheduled_row(app: Heretic) -> None:
    @app.task
    def later() -> None:
        pass

    when = dt.datetime(2099, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    result = later.apply_async(eta=when)
    job = app.store.get(result.id)
    assert job is not None
    assert (job.status, job.eta) == ("scheduled", when)
    assert queued_messages(app) == 0


def test_delay_writes_a_queued_row_and_publishes_one_message(app: Heretic) -> None:
    @app.task(max_retries=1)
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(2, y=3)

    job = wait_queued(app, result.id)
    assert job.payload == {"args": [2], "kwargs": {"y": 3}}
    assert job.max_attempts == 2
    assert job.root_id == result.id
    assert uuid.UUID(result.id)
    assert result.state == "PENDING"
    assert queued_messages(app) == 1


def test_apply_async_with_task_id_uses_it(app: Heretic) -> None:
    @app.task
    def noop() -> None:
        pass

    task_id = str(uuid.uuid4())
    result = noop.apply_async(task_id=task_id, countdown=3600)
    assert result.id == task_id
    assert app.store.get(task_id) is not None


def test_apply_async_with_a_task_id_that_is_not_a_uuid_is_refused(app: Heretic) -> None:
    @app.task
    def noop() -> None:
        pass

    with pytest.raises(ValueError):
        noop.apply_async(task_id="my-job-1")
    assert app.store.list() == []


def test_enqueue_writes_the_payload_row(app: Heretic) -> None:
    result = app.enqueue("x.y", {"a": 1}, max_attempts=3)

    job = wait_queued(app, result.id)
    assert job.task_name == "x.y"
    assert job.payload == {"args": [{"a": 1}], "kwargs": {}}
    assert job.max_attempts == 3
    assert job.attempts == 0
    assert queued_messages(app) == 1
    assert [j.task_id for j in app.store.list()] == [result.id]


def test_enqueue_refuses_zero_attempts(app: Heretic) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        app.enqueue("x.y", {}, max_attempts=0)
    assert app.store.list() == []


def test_enqueue_with_a_non_json_payload_writes_nothing(app: Heretic) -> None:
    with pytest.raises(EncodeError):
        app.enqueue("x.y", {"when": object()})
    assert app.store.list() == []


def test_on_refuses_unknown_events(app: Heretic) -> None:
    def listener(*args: Any) -> None:
        pass

    with pytest.raises(ValueError, match="nope"):
        app.on("nope", listener)


def test_on_accepts_known_events_and_returns_the_listener(app: Heretic) -> None:
    def listener(*args: Any) -> None:
        pass

    assert app.on("job_failed", listener) is listener
    assert app.on("job_error", listener) is listener


# -- eager mode -----------------------------------------------------------------------------


def test_eager_delay_runs_in_process_and_returns_the_value(eager_app: Heretic) -> None:
    @eager_app.task
    def add(x: int, y: int) -> int:
        return x + y

    result = add.delay(2, 3)

    assert isinstance(result, EagerResult)
    assert result.get() == 5
    assert result.result == 5
    assert result.state == "SUCCESS"
    assert result.ready() and result.successful() and not result.failed()
    assert eager_app.store.list() == []


def test_eager_results_come_back_through_json(eager_app: Heretic) -> None:
    @eager_app.task
    def pair() -> tuple[int, dt.date]:
        return (1, dt.date(2024, 1, 2))

    assert pair.delay().get() == [1, dt.date(2024, 1, 2)]


def test_eager_request_shows_id_and_retries(eager_app: Heretic) -> None:
    seen: list[tuple[str | None, int, bool]] = []

    @eager_app.task(bind=True)
    def flaky(self: Task) -> str | None:
        seen.append((self.request.id, self.request.retries, self.request.is_eager))
        if self.request.retries < 2:
            self.retry(countdown=60)
        return self.request.id

    result = flaky.delay()

    assert result.get() == result.id
    assert seen == [(result.id, 0, True), (result.id, 1, True), (result.id, 2, True)]


def test_eager_apply_async_keeps_the_given_task_id(eager_app: Heretic) -> None:
    @eager_app.task(bind=True)
    def me(self: Task) -> str | None:
        return self.request.id

    task_id = str(uuid.uuid4())
    result = me.apply_async(task_id=task_id)
    assert result.id == task_id
    assert result.get() == task_id


def test_eager_retry_can_change_the_arguments(eager_app: Heretic) -> None:
    @eager_app.task(bind=True)
    def countdown(self: Task, n: int) -> str:
        if n > 0:
            self.retry(args=[n - 1], countdown=0)
        return f"done after {self.request.retries} retries"

    assert countdown.delay(2).get() == "done after 2 retries"


def test_eager_retry_past_max_retries_fails_with_max_retries_exceeded(
    eager_app: Heretic,
) -> None:
    runs: list[int] = []

    @eager_app.task(bind=True, max_retries=2)
    def always(self: Task) -> None:
        runs.append(self.request.retries)
        self.retry(countdown=1)

    result = always.delay()

    assert runs == [0, 1, 2]
    assert result.state == "FAILURE"
    assert result.failed()
    assert isinstance(result.result, MaxRetriesExceededError)
    with pytest.raises(MaxRetriesExceededError):
        result.get()


def test_eager_retry_with_exc_past_max_retries_raises_that_exc(eager_app: Heretic) -> None:
    @eager_app.task(bind=True, max_retries=1)
    def flaky(self: Task) -> None:
        try:
            raise ConnectionError("upstream down")
        except ConnectionError as exc:
            self.retry(exc=exc, countdown=1)

    with pytest.raises(ConnectionError, match="upstream down"):
        flaky.delay().get()


def test_eager_retry_max_retries_argument_overrides_the_task(eager_app: Heretic) -> None:
    runs: list[int] = []

    @eager_app.task(bind=True, max_retries=0)
    def more(self: Task) -> int:
        runs.append(self.request.retries)
        if self.request.retries < 3:
            self.retry(max_retries=5, countdown=0)
        return len(runs)

    assert more.delay().get() == 4
    assert runs == [0, 1, 2, 3]


def test_eager_failure_is_re_raised_by_get(eager_app: Heretic) -> None:
    @eager_app.task
    def broken() -> None:
        raise ValueError("broken on purpose")

    result = broken.delay()

    assert result.state == "FAILURE"
    assert result.failed() and result.ready() and not result.successful()
    assert isinstance(result.result, ValueError)
    assert "broken on purpose" in (result.traceback or "")
    with pytest.raises(ValueError, match="broken on purpose"):
        result.get()
    assert isinstance(result.get(propagate=False), ValueError)


def test_eager_propagates_raises_from_delay(make_app: MakeApp) -> None:
    app = make_app(task_always_eager=True, task_eager_propagates=True)

    @app.task
    def broken() -> None:
        raise KeyError("missing thing")

    with pytest.raises(KeyError, match="missing thing"):
        broken.delay()


def test_eager_propagates_raises_max_retries_exceeded_from_delay(make_app: MakeApp) -> None:
    app = make_app(task_always_eager=True, task_eager_propagates=True)

    @app.task(bind=True, max_retries=1)
    def always(self: Task) -> None:
        self.retry(countdown=0)

    with pytest.raises(MaxRetriesExceededError):
        always.delay()


def test_eager_autoretry_retries_in_process(eager_app: Heretic) -> None:
    runs: list[int] = []

    @eager_app.task(bind=True, autoretry_for=(ConnectionError,), max_retries=3)
    def flaky(self: Task) -> str:
        runs.append(self.request.retries)
        if len(runs) < 3:
            raise ConnectionError("try again")
        return "ok"

    assert flaky.delay().get() == "ok"
    assert runs == [0, 1, 2]


def test_eager_mode_set_after_creation_applies(app: Heretic) -> None:
    @app.task
    def double(x: int) -> int:
        return x * 2

    app.conf.task_always_eager = True
    assert double.delay(21).get() == 42
    assert app.store.list() == []


def test_eager_mode_still_checks_the_signature(eager_app: Heretic) -> None:
    @eager_app.task
    def one(x: int) -> int:
        return x

    with pytest.raises(TypeError):
        one.delay()


def test_eager_return_value_that_is_not_json_fails_the_task(eager_app: Heretic) -> None:
    @eager_app.task
    def opaque() -> object:
        return object()

    result = opaque.delay()
    assert result.failed()
    with pytest.raises(EncodeError):
        result.get()


def test_apply_runs_eagerly_without_eager_mode(app: Heretic) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    result = add.apply((1, 2))
    assert result.get() == 3
    assert app.store.list() == []


def test_retry_in_a_direct_call_raises_the_given_exception(app: Heretic) -> None:
    @app.task(bind=True)
    def flaky(self: Task) -> None:
        self.retry(exc=RuntimeError("direct"))

    with pytest.raises(RuntimeError, match="direct"):
        flaky()


def test_send_task_by_name_to_an_unregistered_task_writes_its_row(app: Heretic) -> None:
    # Producers may send tasks only the worker knows, as with Celery's send_task.
    result = app.send_task("elsewhere.task", [1], {"k": "v"}, countdown=30)
    job = app.store.get(result.id)
    assert job is not None
    assert job.task_name == "elsewhere.task"
    assert job.payload == {"args": [1], "kwargs": {"k": "v"}}


def test_non_json_serializer_is_refused_not_dropped(app: Heretic) -> None:
    @app.task
    def noop() -> None:
        return None

    with pytest.raises(ConfigurationError, match="pickle"):
        noop.apply_async(serializer="pickle")
    assert app.store.list() == []
