"""RabbitMQ-specific guards: quorum queues with a delivery limit, and consumer_timeout.

- ``queue_type = "quorum"`` (``HERETIC_QUEUE_TYPE``, Celery 5.5's
  ``task_default_queue_type``) declares replicated quorum queues whose
  ``x-delivery-limit`` makes RabbitMQ itself dead-letter a message that keeps coming
  back unacked, as a second guard beside ``max_attempts``.
- A job that runs longer than the server's ``consumer_timeout`` makes RabbitMQ close
  the worker's channel and requeue the message; the worker reconnects, the job's
  outcome is committed once and the redelivered copy is recognised as a duplicate.
"""

from __future__ import annotations

import re
import subprocess
import uuid

import kombu
import pytest
from harness import SERVICES, Faults
from helpers import AMQP_URL, delete_queues, require_services, wait_for

from heretic_kombu.broker import Broker
from heretic_kombu.config import Settings
from heretic_kombu.exceptions import ConfigurationError


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def _need_rabbitmqctl() -> None:
    require_services()
    try:
        _rabbitmqctl("status")
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"rabbitmqctl cannot reach the local RabbitMQ: {exc}")


# -- the setting -------------------------------------------------------------------------


def test_queue_type_setting_names_and_the_priority_conflict() -> None:
    assert Settings.build({}, env={}).queue_type == "classic"
    assert Settings.build({"task_default_queue_type": "quorum"}, env={}).queue_type == "quorum"
    env = {"HERETIC_QUEUE_TYPE": "quorum", "HERETIC_DELIVERY_LIMIT": "5"}
    settings = Settings.build({}, env=env)
    assert (settings.queue_type, settings.delivery_limit) == ("quorum", 5)
    with pytest.raises(ConfigurationError, match="must be one of classic, quorum"):
        Settings.build({"queue_type": "stream"}, env={})
    with pytest.raises(ConfigurationError, match="quorum queues have no message priorities"):
        Settings.build({"queue_type": "quorum", "task_queue_max_priority": 10}, env={})
    with pytest.raises(ConfigurationError, match="delivery_limit"):
        Settings.build({"delivery_limit": 0}, env={})
    broker = Broker("amqp://guest@127.0.0.1//", queue_type="quorum", delivery_limit=7)
    assert broker.queue("q").queue_arguments == {
        "x-dead-letter-exchange": "heretic.dead",
        "x-dead-letter-routing-key": "q.dead",
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
    }


# -- quorum queues on RabbitMQ ------------------------------------------------------------


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_quorum_queue_runs_jobs(faults: Faults, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_rabbitmqctl()
    monkeypatch.setenv("HERETIC_QUEUE_TYPE", "quorum")
    faults.app()
    faults.start_worker(concurrency=2)
    submitted = faults.submit(100, pause=0.0)
    faults.wait_terminal(len(submitted))
    faults.figure("quorum queue", submitted)
    listing = _rabbitmqctl("list_queues", "name", "type", "arguments")
    line = next(ln for ln in listing.splitlines() if ln.startswith(faults.backend.queue + "\t"))
    assert "quorum" in line and "x-delivery-limit" in line


@pytest.mark.services
def test_quorum_delivery_limit_dead_letters_a_message_that_never_gets_acked() -> None:
    """A message whose consumer dies each time it holds it (as a job that kills its
    worker) is dead-lettered by RabbitMQ after ``delivery_limit`` deliveries."""
    _need_rabbitmqctl()
    queue = f"t_{uuid.uuid4().hex[:10]}"
    broker = Broker(AMQP_URL, queue_type="quorum", delivery_limit=2)
    try:
        with broker.connect() as conn:
            broker.declare(conn.default_channel, queue)
            kombu.Producer(conn.default_channel).publish(
                {"poison": True}, exchange=queue, routing_key=queue, delivery_mode=2
            )
        deliveries = 0
        for _ in range(6):
            with broker.connect() as conn:  # take it, then "die" without an ack
                message = broker.queue(queue)(conn.default_channel).get(no_ack=False)
                if message is None:
                    break
                deliveries += 1
        assert deliveries == 3  # the first delivery and two redeliveries, then no more

        def dead_count() -> int:
            with broker.connect() as conn:
                _, count, _ = broker.dead_queue(queue)(conn.default_channel).queue_declare(
                    passive=True
                )
                return int(count)

        assert wait_for(dead_count, 10, "the message in the dead-letter queue") == 1
    finally:
        broker.close()
        delete_queues(queue)


# -- consumer_timeout ---------------------------------------------------------------------


def _get_env(key: str) -> str:
    out = _rabbitmqctl("eval", f"application:get_env(rabbit, {key}).").strip()
    match = re.fullmatch(r"\{ok,(\d+)\}", out)
    return match.group(1) if match else "undefined"


def _set_env(key: str, value: str) -> None:
    if value == "undefined":
        _rabbitmqctl("eval", f"application:unset_env(rabbit, {key}).")
    else:
        _rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {int(value)}).")


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_a_job_longer_than_consumer_timeout_is_recorded_once(faults: Faults) -> None:
    """RabbitMQ closes the channel of a consumer that holds a message unacked longer
    than consumer_timeout (PRECONDITION_FAILED) and requeues its messages. The worker
    reconnects; the redelivered copy of the running job finds it ``started`` under a
    live lease and is acked as a duplicate; the outcome is committed once.

    RabbitMQ 3.10 checks the timeout on each channel's tick (``channel_tick_interval``,
    60 s, read when a channel opens): the test shortens both for its own worker's
    channel and restores the server's values before it goes on.
    """
    _need_rabbitmqctl()
    import fault_tasks

    faults.app()
    previous = {key: _get_env(key) for key in ("consumer_timeout", "channel_tick_interval")}
    try:
        _set_env("channel_tick_interval", "500")
        _set_env("consumer_timeout", "2000")
        worker = faults.start_worker(concurrency=2)
        long_job = fault_tasks.record_run.delay("long", 6.0)
        wait_for(
            lambda: "broker connection lost" in worker.log(), 30, "RabbitMQ's consumer_timeout"
        )
    finally:
        for key, value in previous.items():
            _set_env(key, value)
    assert {key: _get_env(key) for key in previous} == previous
    others = faults.submit(50, pause=0.0)
    submitted = [long_job.id, *others]
    faults.wait_terminal(len(submitted), timeout=40)
    faults.figure("consumer_timeout 2 s, job of 6 s", submitted)
    log = worker.log()
    assert "PRECONDITION_FAILED" in log
    assert worker.alive()
