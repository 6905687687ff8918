"""Issue 15, items 9 and 11, as fault scenarios: a signal ends a worker whatever it waits
on; pool processes are recycled. Each prints the usual figure line."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from harness import SERVICES, SERVICES_AND_EMBEDDED, Faults, FaultWorker
from helpers import wait_for


def _worker(faults: Faults, *args: str, ready: bool = True) -> FaultWorker:
    name = f"w{len(faults.workers) + 1}"
    worker = FaultWorker(name, list(args), faults.tmp_path / f"{name}.log", faults.tmp_path)
    faults.workers.append(worker)
    if ready:
        wait_for(worker.ready, 30, f"worker {name} to start")
    return worker


def _runs(faults: Faults) -> list[str]:
    return faults._runs_text().split()


# -- item 9 --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SERVICES, indirect=True)
def test_item9_sigterm_while_the_broker_is_unreachable_at_start_up(faults: Faults) -> None:
    proxy = faults.rabbit_proxy()
    proxy.cut()
    stuck = _worker(faults, "-P", "prefork", "-c", "2", ready=False)
    wait_for(lambda: "broker unreachable" in stuck.log(), 30, "the worker to wait for the broker")
    sent = time.monotonic()
    stuck.process.send_signal(signal.SIGTERM)
    try:
        code = stuck.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 10 s after SIGTERM (before: for ever)\n{stuck.log()}")
    print(f"\nSIGTERM while waiting for the broker: exit {code} in {time.monotonic() - sent:.1f}s")
    assert code == 0
    proxy.restore()
    faults.app()
    _worker(faults, "-P", "prefork", "-c", "4")
    submitted = faults.submit(50, pause=0.0)
    faults.wait_terminal(len(submitted))
    faults.figure("item 9. SIGTERM while the broker is down at start-up", submitted)


# -- item 11 -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SERVICES_AND_EMBEDDED, indirect=True)
def test_item11_prefork_processes_recycled_every_5_tasks(faults: Faults) -> None:
    faults.app()
    worker = _worker(faults, "-P", "prefork", "-c", "2", "--max-tasks-per-child", "5")
    submitted = faults.submit(100, pause=0.0)
    faults.wait_terminal(len(submitted))
    figure = faults.figure("item 11. prefork recycled every 5 tasks", submitted)
    recycled = len(re.findall(r"pool child \d+ recycled", worker.log()))
    print(f"processes recycled: {recycled}")
    assert figure.completed == 100 and recycled >= 100 // 5 - 2
