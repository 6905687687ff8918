"""Bad input, refused at the edge (DESIGN §4, invariant 9; issue 15 items 1-3 and 12).

Each row of a table is one input and what a user observes:

- a call (``apply_async``, ``send_task``, a canvas, a beat entry): the exception the
  caller gets (type and a fragment of its message), and nothing written: no row in
  ``heretic_jobs`` and no message in the queue;
- a raw Celery-protocol message (published with kombu, as an unchanged Celery client
  would): the worker dead-letters it to ``<queue>.dead`` with the reason (in
  ``job_error`` everywhere; in the message's dead-letter header on the transports
  heretic dead-letters itself, RabbitMQ's ``x-death`` on RabbitMQ), writes no row, keeps
  running (a following good job runs), and stops on SIGTERM.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from typing import Any

import jobs_project
import kombu
import pytest
from helpers import wait_for

from heretic_kombu import chain, chord, group
from heretic_kombu.beat import Beat
from heretic_kombu.broker import DEAD_REASON_HEADER
from heretic_kombu.exceptions import ConfigurationError, InvalidValue

#: 9999-12-31 23:30 at UTC-1 is year 10000 in UTC: no database or Python can read it back.
YEAR_10000 = dt.datetime(9999, 12, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-1)))
add = jobs_project.add


# -- calls --------------------------------------------------------------------------

#: (case, call, exception type, fragment of its message)
CALLS: list[tuple[str, Any, type[Exception], str]] = [
    ("expires year 10000 in UTC", lambda app: add.apply_async((1, 1), expires=YEAR_10000),
     InvalidValue, "expires 9999-12-31T23:30:00-01:00 is out of range"),
    ("eta year 10000 in UTC", lambda app: add.apply_async((1, 1), eta=YEAR_10000),
     InvalidValue, "eta 9999-12-31T23:30:00-01:00 is out of range"),
    ("countdown=1e12", lambda app: add.apply_async((1, 1), countdown=1e12),
     InvalidValue, "countdown (1e+12 s) is out of range"),
    ("countdown=inf", lambda app: add.apply_async((1, 1), countdown=math.inf),
     InvalidValue, "countdown (inf) is not a finite number of seconds"),
    ("countdown=nan", lambda app: add.apply_async((1, 1), countdown=math.nan),
     InvalidValue, "countdown (nan) is not a finite number of seconds"),
    ("expires=1e12 seconds", lambda app: add.apply_async((1, 1), expires=1e12),
     InvalidValue, "expires (1e+12 s) is out of range"),
    ("priority=256", lambda app: add.apply_async((1, 1), priority=256),
     InvalidValue, "priority (256) is out of range: it must be 0..255"),
    ("priority=-1", lambda app: add.apply_async((1, 1), priority=-1),
     InvalidValue, "priority (-1) is out of range"),
    ("a message larger than max_message_size",
     lambda app: _with(app, max_message_size=1 << 20, call=lambda: add.delay("x" * (2 << 20), "")),
     InvalidValue, "the broker accepts at most 1048576 bytes (max_message_size"),
    ("priority above queue_max_priority",
     lambda app: _with(app, queue_max_priority=5, call=lambda: add.apply_async((1, 1), priority=6)),
     InvalidValue, "priority (6) is out of range: it must be 0..5"),
    ("a queue name of 256 bytes", lambda app: add.apply_async((1, 1), queue="q" * 256),
     InvalidValue, "queue is 256 bytes long: AMQP names hold at most 255 bytes"),
    ("a NUL in the queue name", lambda app: add.apply_async((1, 1), queue="jobs\x00"),
     InvalidValue, "queue must not contain a NUL"),
    ("a NUL in the routing key", lambda app: add.apply_async((1, 1), routing_key="k\x00"),
     InvalidValue, "routing_key must not contain a NUL"),
    ("a NUL in the task name", lambda app: app.send_task("jobs_project.add\x00", (1, 1)),
     InvalidValue, "task name must not contain a NUL"),
    ("a task id that is no UUID", lambda app: add.apply_async((1, 1), task_id="job-1"),
     InvalidValue, "task id must be a UUID string"),
    ("time_limit=inf", lambda app: add.apply_async((1, 1), time_limit=math.inf),
     InvalidValue, "time_limit (inf) is not a finite number of seconds"),
    ("send_task countdown=nan", lambda app: app.send_task("any.task", countdown=math.nan),
     InvalidValue, "countdown (nan) is not a finite"),
    ("signature options", lambda app: add.s(1, 1).set(expires=YEAR_10000).apply_async(),
     InvalidValue, "expires 9999-12-31T23:30:00-01:00 is out of range"),
    ("a chain step sent later", lambda app: chain(add.s(1, 1), add.s(2).set(priority=300))(),
     InvalidValue, "priority (300) is out of range"),
    ("a group member", lambda app: group(add.s(1, 1), add.s(2, 2).set(countdown=math.inf))(),
     InvalidValue, "countdown (inf) is not a finite"),
    ("a chord body", lambda app: chord([add.s(1, 1)], add.s().set(expires=1e12))(),
     InvalidValue, "expires (1e+12 s) is out of range"),
    ("a link", lambda app: add.apply_async((1, 1), link=add.s(3).set(eta=YEAR_10000)),
     InvalidValue, "eta 9999-12-31T23:30:00-01:00 is out of range"),
    ("a beat entry's options",
     lambda app: Beat(app, schedule={"every minute": {
         "task": "jobs_project.add", "schedule": 60, "args": (1, 1),
         "options": {"priority": 256}}}),
     ConfigurationError, "beat_schedule entry 'every minute': priority (256) is out of range"),
]  # fmt: skip


def _with(app: Any, *, call: Any, **settings: Any) -> Any:
    for key, value in settings.items():
        app.conf[key] = value
    return call()


def _message_count(app: Any, queue: str) -> int:
    """Messages waiting in ``queue`` (declared as the app declares it)."""
    with app.broker.connect() as conn:
        channel = conn.default_channel
        app.broker.declare(channel, queue)
        _, count, _ = app.broker.queue(queue)(channel).queue_declare()
        return int(count)


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [pytest.param(call, error, fragment, id=case) for case, call, error, fragment in CALLS],
)
def test_a_call_with_a_value_nothing_can_hold_is_refused_and_nothing_is_written(
    app, backend, call, error, fragment
):
    with pytest.raises(error) as caught:
        call(app)
    assert fragment in str(caught.value)
    if error is InvalidValue:
        assert isinstance(caught.value, ValueError)  # where Celery raises ValueError
    assert app.store.list(limit=10) == []  # no row
    assert _message_count(app, backend.queue) == 0  # no message
    assert add.delay(2, 3).id  # and the next good call goes through


# -- raw Celery-protocol messages ---------------------------------------------------


def _headers(task: str = "jobs_project.add", **extra: Any) -> dict[str, Any]:
    task_id = str(uuid.uuid4())
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "(1, 1)",
        "kwargsrepr": "{}",
        "origin": "gen1@celery-client",
        "ignore_result": False,
        **extra,
    }


_GOOD_BODY = json.dumps([[1, 1], {}, {"callbacks": None, "errbacks": None}])

#: (case, headers, body, properties, fragment of the reason, backends it cannot be sent on)
MESSAGES: list[tuple[str, dict[str, Any], str, dict[str, Any], str, tuple[str, ...]]] = [
    ("retries=2**31", _headers(retries=2**31), _GOOD_BODY, {},
     "header 'retries' (2147483648) is out of range", ()),
    ("eta year 10000 in UTC", _headers(eta="9999-12-31T23:30:00-01:00"), _GOOD_BODY, {},
     "header 'eta' 9999-12-31T23:30:00-01:00 is out of range", ()),
    ("expires year 10000 in UTC", _headers(expires="9999-12-31T23:30:00-01:00"), _GOOD_BODY, {},
     "header 'expires' 9999-12-31T23:30:00-01:00 is out of range", ()),
    ("timelimit 1e12 s", _headers(timelimit=[1e12, None]), _GOOD_BODY, {},
     "header 'timelimit' (1e+12 s) is out of range", ()),
    ("a NUL in the task name", _headers(task="jobs_project.add\x00"), _GOOD_BODY, {},
     "header 'task' must not contain a NUL", ()),
    ("group_index=-1", _headers(group_index=-1), _GOOD_BODY, {},
     "header 'group_index' (-1) is out of range", ()),
    ("a NUL in a link", _headers(),
     json.dumps([[1, 1], {}, {"callbacks": [{"task": "jobs_project.echo\x00", "args": []}]}]),
     {}, "body[2] (embed) cannot be stored", ()),
    # AMQP cannot carry a priority above 255 (one octet): only the JSON transports can.
    ("priority=300", _headers(), _GOOD_BODY, {"priority": 300},
     "the message's priority (300) is out of range", ("services",)),
]  # fmt: skip


def _publish_raw(app: Any, queue: str, body: str, headers: dict[str, Any], **props: Any) -> None:
    with app.broker.connect() as conn:
        channel = conn.default_channel
        app.broker.declare(channel, queue)
        kombu.Producer(channel).publish(
            body,
            exchange=queue,
            routing_key=queue,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            **props,
        )


def _dead_letters(app: Any, queue: str, expected: int, timeout: float = 30) -> list[Any]:
    received: list[Any] = []
    with app.broker.connect() as conn:
        consumer = kombu.Consumer(
            conn.default_channel,
            [app.broker.dead_queue(queue)],
            accept=None,
            on_message=received.append,
            auto_declare=True,
        )
        with consumer:

            def enough() -> bool:
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass
                return len(received) >= expected

            wait_for(enough, timeout, f"{expected} dead letter(s) in {queue}.dead")
        for message in received:
            message.ack()
    return received


@pytest.mark.parametrize(
    ("headers", "body", "props", "fragment", "not_on"),
    [pytest.param(*row[1:], id=row[0], marks=pytest.mark.not_on(*row[5])) for row in MESSAGES],
)
def test_a_message_with_a_value_nothing_can_hold_is_dead_lettered_and_the_worker_goes_on(
    app, backend, start_worker, headers, body, props, fragment, not_on
):
    _publish_raw(app, backend.queue, body, headers, **props)
    worker = start_worker(concurrency=1)
    good = add.delay(20, 22)  # behind the bad message
    assert good.get(timeout=30) == 42  # the worker keeps running

    (dead,) = _dead_letters(app, backend.queue, 1)  # where the message goes
    assert dead.body in (body, body.encode())  # intact, for inspection
    if backend.name == "services":
        assert dead.headers.get("x-death")  # RabbitMQ's dead-letter exchange moved it
    else:
        assert fragment in dead.headers[DEAD_REASON_HEADER]
    reasons = [event["reason"] for event in backend.events("job_error")]
    assert len(reasons) == 1 and fragment in reasons[0], reasons
    assert app.store.get(headers["id"]) is None  # no row for it
    assert [row.task_id for row in app.store.list(limit=10)] == [good.id]
    assert worker.terminate(timeout=30) == 0  # and a warm shutdown ends
