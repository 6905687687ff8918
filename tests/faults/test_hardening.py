"""Faults that used to let one value, message or held publish stall everything behind it
(issue 15). Each scenario runs against real services through the tests' own proxies."""

from __future__ import annotations

import time

import fault_tasks
import pytest
from helpers import delete_queues, wait_for

from heretic_kombu import states


@pytest.mark.parametrize("backend", ["services"], indirect=True)
def test_a_broker_holding_publishes_costs_one_confirm_timeout_not_one_per_delay(faults, backend):
    """RabbitMQ in a memory alarm stops reading publishes: as a stalled connection does.
    The first send to a queue waits for its confirm (confirm_timeout, 3 s here); the
    sends after it must not each wait as long."""
    proxy = faults.rabbit_proxy()
    app = faults.app()
    warm = fault_tasks.record_run.delay(0)
    wait_for(lambda: app.store.get(warm.id).status == states.QUEUED, 10, "the first send")
    proxy.stall()
    other = f"{backend.queue}_held"
    first = time.monotonic()
    held = [fault_tasks.record_run.apply_async((1,), queue=other)]
    waited = time.monotonic() - first
    started = time.monotonic()
    held += [fault_tasks.record_run.apply_async((n,), queue=other) for n in range(2, 8)]
    later = time.monotonic() - started
    print(f"\nfirst send waited {waited:.1f} s; the next 6 took {later:.2f} s together")
    assert waited >= 2.5  # the first send to the queue waited for its confirm...
    assert later < 2.5  # ...the others did not wait one confirm_timeout each (18 s before)
    assert {app.store.get(r.id).status for r in held} == {states.PENDING}  # all accepted
    proxy.restore()
    wait_for(
        lambda: {app.store.get(r.id).status for r in held} == {states.QUEUED},
        30,
        "the held jobs to be confirmed once the broker reads again",
    )
    try:
        assert app.broker.queue_size(other) == len(held)
    finally:
        delete_queues(other)
