"""Messages from outside: malformed ones are dead-lettered, Celery clients' are run."""

from __future__ import annotations

import datetime as dt
import json
import pickle
import uuid

import jobs_project
import kombu
import pytest
from helpers import declare_plain_queue, wait_for

from heretic_kombu import states
from heretic_kombu.broker import DEAD_REASON_HEADER


class _Exploit:
    """Unpickling this would create a file: it must never be unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _publish_raw(app, queue, body, content_type="application/json", headers=None):
    with app.broker.connect() as conn:
        channel = conn.default_channel
        app.broker.declare(channel, queue)
        kombu.Producer(channel).publish(
            body,
            exchange=queue,
            routing_key=queue,
            headers=headers or {},
            content_type=content_type,
            content_encoding="utf-8" if content_type == "application/json" else "binary",
        )


def _celery_headers(task, task_id=None, **extra):
    task_id = task_id or str(uuid.uuid4())
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
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "gen1@celery-client",
        "ignore_result": False,
        **extra,
    }


def _drain_dead(app, queue, expected, timeout=30):
    """Read every message from `queue`.dead (bounded wait for `expected` of them)."""
    received = []
    dead = app.broker.dead_queue(queue)
    with app.broker.connect() as conn:
        consumer = kombu.Consumer(
            conn.default_channel, [dead], accept=None, on_message=received.append, auto_declare=True
        )
        with consumer:

            def enough():
                try:
                    conn.drain_events(timeout=0.2)
                except TimeoutError:
                    pass
                return len(received) >= expected

            wait_for(enough, timeout, f"{expected} dead letters in {queue}.dead")
        for message in received:
            message.ack()
    return received


def test_malformed_messages_are_dead_lettered_and_good_jobs_keep_flowing(
    app, start_worker, backend, tmp_path
):
    queue = backend.queue
    exploit_file = tmp_path / "pwned"
    before = jobs_project.add.delay(1, 1)
    valid_body = json.dumps([[1, 2], {}, {}])
    bad = [
        ("not JSON", b"{not json", "application/json", _celery_headers("jobs_project.add")),
        (
            "wrong shape",
            json.dumps({"args": [1, 2]}),
            "application/json",
            _celery_headers("jobs_project.add"),
        ),
        ("unknown task", valid_body, "application/json", _celery_headers("no.such.task")),
        (
            "pickle",
            pickle.dumps(_Exploit(str(exploit_file))),
            "application/x-python-serialize",
            _celery_headers("jobs_project.add"),
        ),
        (
            "row missing",
            valid_body,
            "application/json",
            _celery_headers("jobs_project.add", heretic_job_id=987654321),
        ),
        (
            "NaN from a Celery client",
            "[[NaN], {}, {}]",
            "application/json",
            _celery_headers("jobs_project.echo"),
        ),
        (
            "protocol v1",
            json.dumps({"task": "jobs_project.add", "id": str(uuid.uuid4()), "args": [1, 2]}),
            "application/json",
            {},
        ),
    ]
    for _, body, content_type, headers in bad:
        _publish_raw(app, queue, body, content_type, headers)
    start_worker()
    after = jobs_project.add.delay(2, 2)
    assert before.get(timeout=30) == 2 and after.get(timeout=30) == 4

    dead = _drain_dead(app, queue, len(bad))
    assert len(dead) == len(bad)
    bodies = {m.body if isinstance(m.body, bytes) else m.body.encode() for m in dead}
    for _, body, _, _ in bad:  # each message is kept intact for inspection
        assert (body if isinstance(body, bytes) else body.encode()) in bodies
    if backend.name == "services":
        assert all(m.headers.get("x-death") for m in dead)  # RabbitMQ's DLX moved them
    else:
        assert all(m.headers.get(DEAD_REASON_HEADER) for m in dead)

    reasons = [e["reason"] for e in backend.events("job_error")]
    assert len(reasons) == len(bad)
    joined = "\n".join(reasons)
    for expected in (
        "not valid JSON",
        "[args, kwargs, embed]",
        "unknown task 'no.such.task'",
        "application/x-python-serialize",
        "does not exist",
        "protocol v2",
        "arguments cannot be stored",
    ):
        assert expected in joined
    assert not exploit_file.exists()
    assert app.store.list(statuses=[states.STARTED, states.QUEUED, states.PENDING]) == []


def test_message_from_a_celery_client_gets_a_row_and_runs(app, start_worker, backend):
    task_id = str(uuid.uuid4())
    _publish_raw(
        app,
        backend.queue,
        json.dumps([[20, 22], {}, {"callbacks": None}]),
        headers=_celery_headers("jobs_project.add", task_id),
    )
    later_id = str(uuid.uuid4())
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1.5)
    _publish_raw(
        app,
        backend.queue,
        json.dumps([[1, 1], {}, {}]),
        headers=_celery_headers(
            "jobs_project.add", later_id, eta=eta.replace(tzinfo=None).isoformat()
        ),
    )
    start_worker()
    assert app.AsyncResult(task_id).get(timeout=30) == 42
    job = app.store.get(task_id)
    assert job.status == states.SUCCEEDED and job.payload == {"args": [20, 22], "kwargs": {}}
    assert job.queue_name == backend.queue
    assert app.AsyncResult(later_id).get(timeout=30) == 2
    later = app.store.get(later_id)
    assert later.started_at >= eta and later.attempts == 1


def test_duplicate_delivery_of_a_finished_job_does_not_run_it_again(app, start_worker, backend):
    start_worker()
    result = jobs_project.add.delay(5, 5)
    assert result.get(timeout=30) == 10
    job = app.store.get(result.id)
    body = json.dumps([[5, 5], {}, {}])
    headers = _celery_headers("jobs_project.add", result.id, heretic_job_id=job.id)
    for _ in range(3):
        _publish_raw(app, backend.queue, body, headers=headers)
    probe = jobs_project.add.delay(0, 1)  # queued behind the duplicates
    assert probe.get(timeout=30) == 1
    again = app.store.get(result.id)
    assert again.attempts == 1 and len(again.attempt_logs) == 1
    assert again.finished_at == job.finished_at


@pytest.mark.services
@pytest.mark.parametrize("backend", ["services"], indirect=True)  # a 406 exists on RabbitMQ only
def test_queue_declared_with_other_arguments_gives_a_plain_error(app, backend):
    from heretic_kombu.exceptions import QueueMismatchError

    name = f"{backend.queue}_legacy"
    declare_plain_queue(backend.broker_url, name)
    try:
        with pytest.raises(QueueMismatchError) as caught:
            jobs_project.add.apply_async((1, 2), queue=name)
        message = str(caught.value)
        assert "already has a queue named" in message and "delete_queue" in message
        assert "x-dead-letter-exchange" in message
        assert jobs_project.add.apply_async((1, 2)).id  # other queues still work
    finally:
        with kombu.Connection(backend.broker_url) as conn:
            conn.default_channel.queue_delete(name)
            conn.default_channel.exchange_delete(name)
