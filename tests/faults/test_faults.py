"""The fault suite: the invariants of DESIGN.md §4 hold while things break.

Every scenario runs a few hundred jobs through real workers, breaks something while
they are in flight, restores it, waits for every row to settle and asserts the figure
(see conftest.py): no job lost, no completion recorded twice, no row left outside a
terminal state — and, except where a worker is killed mid-job (at-least-once by
design), no job run twice.

Faults touch only the tests' own connections: the proxy of proxy.py sits between
heretic and the shared servers; processes are killed with SIGKILL; the RabbitMQ-side
close picks the proxy's own connections by port.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import HERE, SERVICES, SERVICES_AND_EMBEDDED, Faults
from helpers import wait_for

JOBS = 300


def _in_flight(faults: Faults, at_least: int = 20) -> None:
    """Wait until jobs are running (their trace shows up), so the fault hits them."""
    wait_for(
        lambda: (
            faults.runs_path.exists() and len(faults.runs_path.read_text().splitlines()) >= at_least
        ),
        30,
        "jobs to be in flight",
    )


# -- a. RabbitMQ connection cut ---------------------------------------------------------


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_a_rabbitmq_cut_while_jobs_are_in_flight(faults: Faults) -> None:
    proxy = faults.rabbit_proxy()
    faults.app()
    workers = [faults.start_worker(), faults.start_worker()]
    producer = faults.submit_in_background(JOBS, pause=0.05, every=0.01)
    _in_flight(faults)
    proxy.cut()
    time.sleep(3)
    proxy.restore()
    submitted = producer.result()
    faults.wait_terminal(len(submitted))
    faults.figure("a. RabbitMQ connection cut 3 s", submitted)
    assert all(w.alive() for w in workers)
    assert all("broker connection restored" in w.log() for w in workers)


# -- b. RabbitMQ stalled ----------------------------------------------------------------


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_b_rabbitmq_stalled_while_jobs_are_in_flight(faults: Faults) -> None:
    proxy = faults.rabbit_proxy()
    faults.app()
    workers = [faults.start_worker(), faults.start_worker()]
    producer = faults.submit_in_background(JOBS, pause=0.05, every=0.01)
    _in_flight(faults)
    proxy.stall()
    time.sleep(3)
    proxy.restore()
    submitted = producer.result()
    faults.wait_terminal(len(submitted))
    faults.figure("b. RabbitMQ stalled 3 s", submitted)
    assert all(w.alive() for w in workers)


# -- c. PostgreSQL cut while outcomes are recorded ----------------------------------------


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_c_postgresql_cut_while_workers_record_outcomes(
    faults: Faults, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outage (3 s) is shorter than the lease: a worker cut off from its database
    # still owns its running jobs when it comes back (see the README's guarantee).
    monkeypatch.setenv("HERETIC_LEASE_TIMEOUT", "10")
    app = faults.app()
    app.store.ensure_schema()  # the producer reaches PostgreSQL directly
    proxy = faults.pg_proxy()
    workers = [faults.start_worker(), faults.start_worker()]
    producer = faults.submit_in_background(JOBS, pause=0.02, every=0.01)
    _in_flight(faults, 40)
    proxy.cut()
    time.sleep(3)
    proxy.restore()
    submitted = producer.result()
    faults.wait_terminal(len(submitted))
    faults.figure("c. PostgreSQL cut 3 s while recording", submitted)
    assert all(w.alive() for w in workers)
    assert any("database unavailable" in w.log() for w in workers)


# -- d. workers SIGKILLed mid-job ---------------------------------------------------------


@pytest.mark.parametrize("backend", SERVICES_AND_EMBEDDED, indirect=True)
def test_d_workers_sigkilled_mid_job_repeatedly(faults: Faults) -> None:
    faults.app()
    survivor = faults.start_worker()
    victim = faults.start_worker()
    producer = faults.submit_in_background(JOBS, pause=0.2, every=0.03)
    kills = 0
    while producer.is_alive() and kills < 3:
        _in_flight(faults, 10)
        time.sleep(random.uniform(0.5, 1.0))
        victim.kill()  # with its pool children, mid-job
        kills += 1
        victim = faults.start_worker()
    assert survivor.alive()
    submitted = producer.result()
    faults.wait_terminal(len(submitted))
    figure = faults.figure(f"d. SIGKILL of a worker mid-job x{kills}", submitted, runs_once=False)
    # Killed mid-job, a job runs again (at-least-once), and its lost attempt is logged.
    assert kills >= 2 and figure.lost_attempts >= 1


# -- e. producer SIGKILLed between commit and publish -------------------------------------

PRODUCER = """
import os, random, signal, sys
sys.path.insert(0, {here!r})
import fault_tasks
from heretic_kombu import Heretic, signals

app = Heretic("producer")
count, kill_at = int(sys.argv[1]), int(sys.argv[2])
sent = 0

@signals.before_task_publish.connect
def _maybe_die(sender=None, **kwargs):
    # The row is committed; its message is not yet published.
    if sent == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

for number in range(count):
    fault_tasks.record_run.delay(number, 0.01)
    sent += 1
"""


@pytest.mark.parametrize("backend", SERVICES_AND_EMBEDDED, indirect=True)
def test_e_producer_sigkilled_between_commit_and_publish(faults: Faults, tmp_path: Path) -> None:
    if faults.backend.name == "services":
        faults.rabbit_proxy()
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER.format(here=str(HERE)))
    killed = 0
    for round_ in range(5):
        count = 80
        # Rounds 0-3 die inside the publish of job `kill_at` (after its commit); round 4
        # is SIGKILLed from outside at a random moment.
        kill_at = random.randint(5, count - 5) if round_ < 4 else count + 1
        process = subprocess.Popen(
            [sys.executable, str(script), str(count), str(kill_at)],
            cwd=tmp_path,
            env=dict(os.environ),
            start_new_session=True,
        )
        if round_ == 4:
            time.sleep(random.uniform(1.0, 2.0))
            os.killpg(process.pid, signal.SIGKILL)
        status = process.wait(timeout=60)
        killed += status == -signal.SIGKILL
    assert killed >= 4
    pending = [r["task_id"] for r in faults.rows() if r["status"] == "pending"]
    assert len(pending) >= 4  # committed; their producer died before publishing
    faults.start_worker()  # its reconciler publishes them after pending_timeout
    rows = len(faults.rows())
    faults.wait_terminal(rows)
    faults.figure(f"e. producer SIGKILLed after commit x{killed}", None)


# -- f. duplicate deliveries in bursts ----------------------------------------------------


@pytest.mark.parametrize("backend", SERVICES_AND_EMBEDDED, indirect=True)
def test_f_duplicate_deliveries_in_bursts(faults: Faults) -> None:
    app = faults.app()
    faults.start_worker()
    faults.start_worker()
    submitted = []
    copies = 0
    for _burst in range(JOBS // 50):
        ids = faults.submit(50, pause=0.02)
        submitted += ids
        for task_id in ids:
            job = app.store.get(task_id)
            for _ in range(3):  # the same message, published again and again
                app.publish_job(job)
                copies += 1
    faults.wait_terminal(len(submitted))
    figure = faults.figure(f"f. {copies} duplicate deliveries", submitted)
    assert figure.executions == len(submitted)


# -- g. RabbitMQ closes the connections from its side ---------------------------------------


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def _close_connections_from(ports: set[int]) -> int:
    """Close, from RabbitMQ's side, the connections whose client port is in ``ports``."""
    closed = 0
    for line in _rabbitmqctl("list_connections", "peer_port", "pid").splitlines():
        match = re.match(r"^(\d+)\s+(<\S+>)$", line.strip())
        if match and int(match.group(1)) in ports:
            _rabbitmqctl("close_connection", match.group(2), "test")
            closed += 1
    return closed


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_g_rabbitmq_closes_connections_with_jobs_in_flight(faults: Faults) -> None:
    if subprocess.run(["which", "rabbitmqctl"], capture_output=True).returncode != 0:
        pytest.skip("rabbitmqctl is not available on this machine")
    proxy = faults.rabbit_proxy()  # a plain pass-through: it only tells us the ports
    faults.app()
    workers = [faults.start_worker(), faults.start_worker()]
    producer = faults.submit_in_background(JOBS, pause=0.05, every=0.015)
    closed = 0
    for round_ in range(2):
        _in_flight(faults, 30 + 60 * round_)
        closed += _close_connections_from(proxy.upstream_ports)
    submitted = producer.result()
    faults.wait_terminal(len(submitted))
    faults.figure(f"g. RabbitMQ closed {closed} connections", submitted)
    assert closed >= 2
    assert all(w.alive() for w in workers)
    assert all("broker connection restored" in w.log() for w in workers)


# -- h. the reply to a producer's INSERT lost -------------------------------------------


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_h_the_reply_to_a_send_is_lost_after_its_row_committed(faults: Faults) -> None:
    """The producer's INSERT reaches PostgreSQL and commits (autocommit), but the reply
    never comes back: the connection breaks. The send is retried on a new connection,
    where the unique task_id refuses a second row; the row already there is the one
    this send wrote, so ``.delay()`` returns it instead of an error. One job, not two."""
    import fault_tasks

    proxy = faults.pg_proxy()
    app = faults.app()
    fault_tasks.record_run.delay(0, 0)  # the pool holds a connection through the proxy
    proxy.hold_replies()
    sent: list[Any] = []
    sender = threading.Thread(target=lambda: sent.append(_send_or_error(fault_tasks)))
    sender.start()
    wait_for(lambda: len(faults.rows()) == 2, 10, "the second row to be committed")
    proxy.reset()  # the connection holding the reply breaks: the producer sees a reset
    proxy.restore()  # and replies flow again, on its new connection
    sender.join(10)
    assert len(sent) == 1 and not isinstance(sent[0], Exception), sent
    assert len(faults.rows()) == 2
    row = app.store.get(sent[0].id)
    assert row is not None and row.args == [1, 0]
    wait_for(lambda: app.store.get(sent[0].id).status == "queued", 10, "the job published")


def _send_or_error(fault_tasks: Any) -> Any:
    try:
        return fault_tasks.record_run.delay(1, 0)
    except Exception as exc:
        return exc
