"""Issue 15, items 4, 9 and 11: attempts count runs, signals always end a worker, pool
processes are recycled. Real workers through the CLI (``-A lifecycle_project``)."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PROJECTS, wait_for

from heretic_kombu import states


class Worker:
    """``heretic worker -A lifecycle_project …``, started as a user starts one."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path, wait_ready: bool) -> None:
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECTS), env.get("PYTHONPATH")]))
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "heretic_kombu.cli", "worker", "-A", "lifecycle_project"]
                + ["-l", "info", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        if wait_ready:
            wait_for(self.ready, 30, f"worker to start (log: {log_path})")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log()}")
        return " ready: " in self.log()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def lifecycle_app(backend: Any) -> Iterator[Any]:
    import lifecycle_project  # noqa: F401 - registers the shared tasks first

    from heretic_kombu import Heretic

    application = Heretic("lifecycle")
    yield application
    application.close()


@pytest.fixture
def worker(backend: Any, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(*args: str, wait_ready: bool = True) -> Worker:
        name = f"w{len(started) + 1}"
        process = Worker(
            ["-n", f"{name}@%h", *args], tmp_path / f"{name}.log", tmp_path, wait_ready
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.process.send_signal(signal.SIGTERM)
            try:
                process.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        process.kill()


# -- item 11: recycling ----------------------------------------------------------------


def test_max_tasks_per_child_replaces_prefork_processes(lifecycle_app, worker):
    import lifecycle_project

    w = worker("-P", "prefork", "-c", "1", "--max-tasks-per-child", "3")
    results = [lifecycle_project.pid_of.delay(n) for n in range(9)]
    answers = [r.get(timeout=60) for r in results]
    pids = collections.Counter(pid for _, pid in answers)
    print(f"\n9 jobs ran in {len(pids)} processes: {sorted(pids.values())}")
    assert sorted(number for number, _ in answers) == list(range(9))
    assert len(pids) >= 3 and max(pids.values()) <= 3
    assert {lifecycle_app.store.get(r.id).attempts for r in results} == {1}
    assert "recycled" in w.log() and " exited with code" not in w.log()


def test_max_memory_per_child_bounds_a_leaking_task(lifecycle_app, worker):
    """A task that keeps 20 MB more at every run: with --max-memory-per-child 100 MiB
    the process is replaced after the run that went over, and RSS stays bounded."""
    import lifecycle_project

    w = worker("-P", "prefork", "-c", "1", "--max-memory-per-child", str(100 * 1024))
    answers = []
    for _ in range(12):  # one at a time: 240 MB leaked in all
        answers.append(lifecycle_project.leak.delay(20).get(timeout=60))
    pids = {pid for pid, _ in answers}
    peak = max(rss for _, rss in answers)
    print(f"\n12 leaking runs: {len(pids)} processes, peak RSS {peak // 1024} MiB")
    assert len(pids) >= 2
    assert peak < (100 + 20 + 20) * 1024  # the limit, plus the run that went over
    assert "recycled (resident memory" in w.log()


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_recycling_options_are_accepted_and_change_nothing_without_prefork(
    lifecycle_app, worker, pool
):
    import lifecycle_project

    w = worker("-P", pool, "-c", "1", "--max-tasks-per-child", "1")
    answers = [lifecycle_project.pid_of.delay(n).get(timeout=60) for n in range(3)]
    assert {pid for _, pid in answers} == {w.process.pid}
    assert "change nothing with the" in w.log()


# -- item 9: signals always end a worker --------------------------------------------------


# The embedded broker is a file: never down, refused at once if unusable.
@pytest.mark.not_on("embedded")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_a_worker_waiting_for_an_unreachable_broker(
    lifecycle_app, worker, backend, monkeypatch, tmp_path, signum
):
    closed_port = {"services": "amqp://guest:guest@127.0.0.1:1//", "redis": "redis://127.0.0.1:1/0"}
    monkeypatch.setenv("HERETIC_BROKER_URL", closed_port[backend.name])
    w = worker("-P", "prefork", "-c", "1", wait_ready=False)
    wait_for(lambda: "broker unreachable" in w.log(), 30, "the worker to wait for the broker")
    sent = time.monotonic()
    w.process.send_signal(signum)
    try:
        code = w.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker still waiting 10 s after {signum.name}:\n{w.log()}")
    print(f"\nexited {code} {time.monotonic() - sent:.1f} s after {signum.name}")
    assert code == 0
    assert "stopped before it was ready" in w.log()


def test_sigquit_is_a_cold_shutdown(lifecycle_app, worker, tmp_path):
    import lifecycle_project

    w = worker("-P", "prefork", "-c", "1")
    running = lifecycle_project.runs_once.delay(30, str(tmp_path / "trace"))
    wait_for(lambda: (tmp_path / "trace").exists(), 30, "the job to start")
    w.process.send_signal(signal.SIGQUIT)
    assert w.process.wait(timeout=10) == 1
    assert "cold shutdown (SIGQUIT)" in w.log()
    assert lifecycle_app.store.get(running.id).status == states.STARTED  # unacked: redelivered
