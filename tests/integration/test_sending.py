"""Sending: one ``.delay()`` returns before the broker's confirm and its row becomes
``queued`` when the confirm comes; several rows are published at once and confirmed
with one wait; a row whose message is not confirmed stays ``pending`` for the
reconciler (heretic_kombu.sender, Broker.publish_all)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import jobs_project
import kombu
import pytest
import sqlalchemy as sa
from helpers import (
    PROJECTS,
    declare_plain_queue,
    unreachable_broker_url,
    wait_for,
    wait_queued,
)

from heretic_kombu import group, states
from heretic_kombu.exceptions import QueueMismatchError, StoreError
from heretic_kombu.store import NewJob

ON_RABBITMQ = [pytest.param("services", marks=pytest.mark.services)]


def statuses(app, results):
    return [app.store.get(result.id).status for result in results]


def test_a_single_send_is_queued_once_confirmed_with_no_further_call(app, backend):
    result = jobs_project.add.delay(1, 2)
    # Nothing else is called in this process: the sender marks the row by itself.
    wait_queued(app, result.id, timeout=2)
    assert app.broker.queue_size(backend.queue) == 1


def test_many_sends_are_all_queued_and_published_once(app, backend):
    results = [jobs_project.add.delay(i, i) for i in range(300)]
    wait_for(lambda: set(statuses(app, results)) == {states.QUEUED}, 10, "300 rows queued")
    assert app.broker.queue_size(backend.queue) == 300


def test_a_group_is_confirmed_at_once_every_row_queued(app, backend):
    handle = group(jobs_project.add.s(i, 1) for i in range(200)).apply_async()
    # deliver_all waited for the confirms and marked the rows before returning.
    assert set(statuses(app, handle.results)) == {states.QUEUED}
    assert app.broker.queue_size(backend.queue) == 200
    rows = [app.store.get(result.id) for result in handle.results]
    assert [row.args for row in rows] == [[i, 1] for i in range(200)]  # written in order


def test_the_jobs_of_a_transaction_are_all_queued_when_it_commits(app, backend):
    engine = sa.create_engine(
        backend.database_url.replace("postgresql://", "postgresql+psycopg2://")
    )
    try:
        with app.transaction(engine):
            results = [jobs_project.add.delay(i, i) for i in range(100)]
            countdown = jobs_project.add.apply_async((0, 0), countdown=60)
            assert app.broker.queue_size(backend.queue) == 0  # nothing before the commit
    finally:
        engine.dispose()
    assert set(statuses(app, results)) == {states.QUEUED}
    assert app.store.get(countdown.id).status == states.SCHEDULED
    assert app.broker.queue_size(backend.queue) == 100


#: Arguments that read as SQL or as the driver's placeholders: they must stay data.
ODD_ARGUMENTS = ["100%", "%s", "%(task_id__0)s", "'); DELETE FROM heretic_jobs; --"]


def test_a_group_bigger_than_one_insert_sends_each_job_with_its_own_row(app, backend):
    # Rows go in INSERTs of up to 1,000 (JobStore._insert_many): 1,005 jobs take two.
    # Each message carries its job's arguments and names the row written for it.
    sent = [[i, ODD_ARGUMENTS[i % 4]] for i in range(1005)]
    handle = group(jobs_project.echo.s(value) for value in sent).apply_async()
    rows = {result.id: app.store.get(result.id) for result in handle.results}
    assert [rows[result.id].args for result in handle.results] == [[v] for v in sent]
    assert {row.status for row in rows.values()} == {states.QUEUED}
    on_the_wire = {}
    with app.broker.connect() as connection:
        channel = connection.channel()
        queue = app.broker.queue(backend.queue)(channel)
        while (message := queue.get(no_ack=True)) is not None:
            on_the_wire[message.headers["id"]] = (
                message.headers["heretic_job_id"],
                json.loads(message.body)[0],
            )
    assert on_the_wire == {task_id: (row.id, row.args) for task_id, row in rows.items()}


def test_rows_written_with_task_ids_in_any_uuid_spelling_come_back_as_their_own(app, backend):
    # JobStore is public: a caller may hand it ids in upper case or without hyphens.
    spellings = [uuid.uuid4() for _ in range(3)]
    written = app.store.insert_plan(
        [
            NewJob(str(spellings[0]).upper(), "jobs_project.add", backend.queue, "{}", 1),
            NewJob(spellings[1].hex, "jobs_project.add", backend.queue, "{}", 1),
            NewJob(str(spellings[2]), "jobs_project.add", backend.queue, "{}", 1),
        ]
    )
    for row, task_id in zip(written, spellings, strict=True):
        assert row.id == app.store.get(str(task_id)).id


def test_a_transaction_bigger_than_one_insert_runs_every_job_with_its_own_arguments(
    app, backend, start_worker
):
    engine = sa.create_engine(
        backend.database_url.replace("postgresql://", "postgresql+psycopg2://")
    )
    sent = [[i, ODD_ARGUMENTS[i % 4]] for i in range(1005)]
    try:
        with app.transaction(engine):
            results = [jobs_project.echo.delay(value) for value in sent]
    finally:
        engine.dispose()
    start_worker()
    assert [result.get(timeout=120) for result in results] == sent
    assert app.broker.queue_size(backend.queue, dead=True) == 0


SCRIPT = """
import os, sys
import jobs_project

ids = [jobs_project.add.delay(i, i).id for i in range(int(sys.argv[1]))]
if sys.argv[2] == "fork":  # a child sends too, with its own sender, then both exit
    pid = os.fork()
    ids.append(jobs_project.add.delay(-1, -1).id)
    if pid == 0:
        print(ids[-1], flush=True)
        sys.exit(0)
    os.waitpid(pid, 0)
print("\\n".join(ids), flush=True)
"""


def _run_producer(tmp_path, count, mode):
    script = tmp_path / "producer.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECTS), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(script), str(count), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_script_that_exits_right_after_sending_leaves_its_rows_queued(app, backend, tmp_path):
    ids = _run_producer(tmp_path, 50, "exit")
    assert len(ids) == 50
    # Read at once: the script's exit waited for the confirms and marked the rows.
    assert {app.store.get(task_id).status for task_id in ids} == {states.QUEUED}
    assert app.broker.queue_size(backend.queue) == 50


def test_a_forked_child_sends_with_a_sender_of_its_own(app, backend, tmp_path):
    ids = _run_producer(tmp_path, 5, "fork")
    assert len(set(ids)) == 7  # five before the fork, then one from each process
    assert {app.store.get(task_id).status for task_id in ids} == {states.QUEUED}
    assert app.broker.queue_size(backend.queue) == 7


def test_with_the_broker_down_sends_return_and_rows_stay_pending(
    backend, monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv("HERETIC_BROKER_URL", unreachable_broker_url(backend, tmp_path))
    from heretic_kombu import Heretic

    producer = Heretic("unreachable")
    try:
        with caplog.at_level(logging.WARNING, logger="heretic_kombu"):
            single = jobs_project.add.delay(1, 2)
            handle = group(jobs_project.add.s(i, 1) for i in range(3)).apply_async()
        results = [single, *handle.results]
        assert statuses(producer, results) == [states.PENDING] * 4
        stays = [r for r in caplog.records if "stays pending" in r.getMessage()]
        assert {r.getMessage().split()[1] for r in stays} == {r.id for r in results}
    finally:
        producer.close()


@pytest.mark.parametrize("backend", ON_RABBITMQ, indirect=True)
def test_a_connection_closed_since_its_last_use_is_replaced_and_the_send_retried(app, backend):
    first = group(jobs_project.add.s(i, 1) for i in range(3)).apply_async()
    assert set(statuses(app, first.results)) == {states.QUEUED}
    # As a server restart or a proxy would: this thread's connection is gone, unnoticed.
    app.broker._publisher().connection.connection.sock.shutdown(socket.SHUT_RDWR)
    second = group(jobs_project.add.s(i, 2) for i in range(3)).apply_async()
    assert set(statuses(app, second.results)) == {states.QUEUED}
    assert app.broker.queue_size(backend.queue) == 6


@pytest.mark.parametrize("backend", ON_RABBITMQ, indirect=True)
def test_a_nacked_message_leaves_its_row_pending(app, backend, caplog):
    # A queue that refuses every message, bound beside the work queue: RabbitMQ then
    # nacks the publish (x-overflow=reject-publish), though the work queue has a copy.
    wait_queued(app, jobs_project.add.delay(0, 0).id)  # the work queue exists
    full = kombu.Queue(
        f"{backend.queue}_full",
        kombu.Exchange(backend.queue, "direct", durable=True),
        routing_key=backend.queue,
        queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
    )
    with kombu.Connection(backend.broker_url) as conn:
        full(conn.default_channel).declare()
    try:
        with caplog.at_level(logging.WARNING, logger="heretic_kombu"):
            single = jobs_project.add.delay(1, 1)
            handle = group(jobs_project.add.s(i, 1) for i in range(3)).apply_async()
            assert statuses(app, handle.results) == [states.PENDING] * 3
            wait_for(
                lambda: any(single.id in r.getMessage() for r in caplog.records),
                5,
                "the sender to report the nack",
            )
        time.sleep(0.3)  # longer than the sender waits to mark a confirmed row
        assert app.store.get(single.id).status == states.PENDING
        assert all("nack" in r.getMessage() for r in caplog.records if "pending" in r.getMessage())
    finally:
        with kombu.Connection(backend.broker_url) as conn:
            conn.default_channel.queue_delete(full.name)


@pytest.mark.parametrize("backend", ON_RABBITMQ, indirect=True)
def test_a_group_with_a_mismatched_queue_fails_those_rows_and_sends_the_others(app, backend):
    legacy = f"{backend.queue}_legacy"
    declare_plain_queue(backend.broker_url, legacy)
    try:
        members = [jobs_project.add.s(1, 1).set(queue=legacy), jobs_project.add.s(2, 2)]
        with pytest.raises(QueueMismatchError, match="already has a queue named"):
            group(members).apply_async()
        rows = app.store.list(limit=10)
        assert sorted(row.status for row in rows) == [states.FAILED, states.QUEUED]
        assert app.broker.queue_size(backend.queue) == 1
    finally:
        with kombu.Connection(backend.broker_url) as conn:
            conn.default_channel.queue_delete(legacy)
            conn.default_channel.exchange_delete(legacy)


def test_a_task_id_already_taken_is_refused_and_nothing_is_sent(app, backend):
    first = jobs_project.add.delay(1, 1)
    wait_queued(app, first.id)
    with pytest.raises(StoreError, match="task_id"):
        jobs_project.add.apply_async((2, 2), task_id=first.id)
    assert app.store.get(first.id).args == [1, 1]
    assert app.broker.queue_size(backend.queue) == 1


@pytest.mark.parametrize("backend", ON_RABBITMQ, indirect=True)
def test_sends_go_on_when_the_server_closed_every_pooled_connection(app, backend, caplog):
    wait_queued(app, jobs_project.add.delay(0, 0).id)  # the main thread's and the sender's
    engine = app.store.engine
    held = [engine.raw_connection() for _ in range(engine.pool.checkedin())]
    pids = []
    for raw in held:
        with raw.driver_connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pids.append(cursor.fetchone()[0])
        raw.close()  # back to the pool, soon dead
    admin = sa.create_engine(
        backend.database_url.replace("postgresql://", "postgresql+psycopg2://")
    )
    try:
        with admin.connect() as conn:
            for pid in pids:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        admin.dispose()
    # As after a database restart, less than a second after the connections were used.
    with caplog.at_level(logging.WARNING, logger="heretic_kombu"):
        results = [jobs_project.add.delay(i, i) for i in range(3)]
        for result in results:
            wait_queued(app, result.id)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert app.broker.queue_size(backend.queue) == 4
