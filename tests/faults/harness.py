"""The fault suite's harness: proxies, real workers of the fault task, and the figure.

Each scenario pushes a few hundred jobs of ``fault_tasks.record_run`` through real
``heretic worker`` processes while something breaks, waits (bounded) until every row
is in a terminal state, then prints and asserts its figure:

    jobs submitted, jobs completed, jobs lost (0), completions recorded twice (0),
    rows not in a terminal state (0)

plus, for information, how many times jobs really ran (from the task's own trace file)
and how many lost attempts heretic recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from helpers import wait_for  # noqa: E402
from proxy import FaultProxy  # noqa: E402

TERMINAL = ("succeeded", "failed", "revoked")

#: Backends a scenario runs on: PostgreSQL + RabbitMQ always, the embedded default
#: where the fault exists there too (indirect parametrisation of tests/conftest.py's
#: ``backend`` fixture, with the same ``services`` mark).
SERVICES = [pytest.param("services", marks=pytest.mark.services)]
SERVICES_AND_EMBEDDED = ["embedded", *SERVICES]


def with_port(url: str, port: int) -> str:
    """``url`` pointing at 127.0.0.1:``port`` instead of its own host and port."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))


@dataclasses.dataclass
class Figure:
    """What a scenario measured."""

    scenario: str
    backend: str
    submitted: int
    completed: int
    lost: int
    recorded_twice: int
    not_terminal: int
    executions: int
    re_executions: int
    lost_attempts: int
    seconds: float

    def line(self) -> str:
        return (
            f"FAULT FIGURE {self.scenario} [{self.backend}]: submitted {self.submitted},"
            f" completed {self.completed}, lost {self.lost},"
            f" completions recorded twice {self.recorded_twice},"
            f" not terminal {self.not_terminal} | executions {self.executions}"
            f" (re-executions {self.re_executions}), lost attempts recorded"
            f" {self.lost_attempts}, {self.seconds:.1f}s"
        )


class FaultWorker:
    """A ``heretic worker -A fault_tasks`` process, started as users start one."""

    def __init__(self, name: str, args: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "heretic_kombu.cli", "worker", "-A", "fault_tasks"]
                + ["-l", "info", "-n", f"{name}@%h", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"worker {self.name} exited with {self.process.returncode}:\n{self.log()}")
        return " ready: " in self.log()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL the worker and its pool children, at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


class Faults:
    """One scenario's world: its proxies, workers, app, and the figure at the end."""

    def __init__(self, backend: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.runs_path = tmp_path / "runs.txt"
        self.proxies: list[FaultProxy] = []
        self.workers: list[FaultWorker] = []
        self.apps: list[Any] = []
        self.started = time.monotonic()
        monkeypatch.setenv("HERETIC_FAULT_RUNS", str(self.runs_path))
        monkeypatch.setenv("HERETIC_CONFIRM_TIMEOUT", "3")

    # -- the fault injectors ---------------------------------------------------------

    def rabbit_proxy(self) -> FaultProxy:
        """Route workers and producers started from now on through a proxy to RabbitMQ."""
        proxy = FaultProxy(urlsplit(self.backend.broker_url).port or 5672)
        self.proxies.append(proxy)
        url = with_port(self.backend.broker_url, proxy.port)
        self.monkeypatch.setenv("HERETIC_BROKER_URL", url)
        return proxy

    def pg_proxy(self) -> FaultProxy:
        """Route workers started from now on through a proxy to PostgreSQL."""
        proxy = FaultProxy(urlsplit(self.backend.database_url).port or 5432)
        self.proxies.append(proxy)
        url = with_port(self.backend.database_url, proxy.port)
        self.monkeypatch.setenv("HERETIC_DATABASE_URL", url)
        return proxy

    # -- processes -------------------------------------------------------------------

    def start_worker(self, concurrency: int = 4, pool: str = "prefork") -> FaultWorker:
        name = f"w{len(self.workers) + 1}"
        worker = FaultWorker(
            name,
            ["-P", pool, "-c", str(concurrency)],
            self.tmp_path / f"{name}.log",
            self.tmp_path,
        )
        self.workers.append(worker)
        wait_for(worker.ready, 30, f"worker {name} to start")
        return worker

    def app(self) -> Any:
        """A producer app configured from the environment as it is now."""
        import fault_tasks  # noqa: F401 - registers the shared task first

        from heretic_kombu import Heretic

        application = Heretic(f"faults{len(self.apps)}")
        self.apps.append(application)
        return application

    def submit(self, count: int, pause: float, every: float = 0.0) -> list[str]:
        """``.delay()`` ``count`` jobs from this process; ids of those accepted."""
        import fault_tasks

        ids = []
        for number in range(count):
            ids.append(fault_tasks.record_run.delay(number, pause).id)
            if every:
                time.sleep(every)
        return ids

    def submit_in_background(self, count: int, pause: float, every: float) -> SteadyProducer:
        producer = SteadyProducer(self, count, pause, every)
        producer.start()
        return producer

    # -- the figure --------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """Every row of the table, read directly (never through a proxy)."""
        import sqlalchemy as sa

        url = self.backend.database_url.replace("postgresql://", "postgresql+psycopg2://")
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                found = conn.execute(
                    sa.text("SELECT task_id, status, attempt_logs FROM heretic_jobs")
                ).all()
        finally:
            engine.dispose()
        rows = []
        for task_id, status, logs in found:
            if isinstance(logs, str):  # SQLite keeps the array as JSON text
                logs = json.loads(logs)
            task_id = str(uuid.UUID(str(task_id)))  # SQLite stores it without dashes
            rows.append({"task_id": task_id, "status": status, "logs": list(logs or [])})
        return rows

    def wait_terminal(self, expected: int, timeout: float = 45.0) -> None:
        """Wait until at least ``expected`` rows exist and every row is terminal."""

        def settled() -> bool:
            rows = self.rows()
            return len(rows) >= expected and all(r["status"] in TERMINAL for r in rows)

        deadline = time.monotonic() + timeout
        while not settled():
            if time.monotonic() > deadline:
                return  # the figure shows what is stuck
            time.sleep(0.25)

    def figure(
        self, scenario: str, submitted: list[str] | None, *, runs_once: bool = True
    ) -> Figure:
        """Measure, print and assert the scenario's figure.

        ``submitted``: ids whose ``.delay()`` returned (``None``: count the rows, for a
        producer that died). ``runs_once``: also assert that no job ran twice.
        """
        rows = self.rows()
        by_id = {r["task_id"]: r for r in rows}
        wanted = list(by_id) if submitted is None else submitted
        runs = Counter(line.strip() for line in self._runs_text().splitlines() if line.strip())
        completed = [t for t in wanted if by_id.get(t, {}).get("status") == "succeeded"]
        twice = [r for r in rows if sum("succeeded" in line for line in r["logs"]) > 1]
        figure = Figure(
            scenario=scenario,
            backend=self.backend.name,
            submitted=len(wanted),
            completed=len(completed),
            lost=len(wanted) - len(completed),
            recorded_twice=len(twice),
            not_terminal=sum(r["status"] not in TERMINAL for r in rows),
            executions=sum(runs[t] for t in wanted),
            re_executions=sum(max(0, runs[t] - 1) for t in wanted),
            lost_attempts=sum(sum(": lost: " in line for line in r["logs"]) for r in rows),
            seconds=time.monotonic() - self.started,
        )
        print("\n" + figure.line())
        out = os.environ.get("HERETIC_FAULT_FIGURES")
        if out:
            with open(out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(dataclasses.asdict(figure)) + "\n")
        problems = []
        if figure.lost:
            missing = [t for t in wanted if by_id.get(t, {}).get("status") != "succeeded"][:5]
            problems.append(f"{figure.lost} lost, e.g. {[by_id.get(t) or t for t in missing]}")
        if figure.recorded_twice:
            problems.append(f"{figure.recorded_twice} recorded twice, e.g. {twice[:3]}")
        if figure.not_terminal:
            stuck = [r for r in rows if r["status"] not in TERMINAL][:5]
            problems.append(f"{figure.not_terminal} not terminal, e.g. {stuck}")
        never_ran = [t for t in completed if runs[t] == 0]
        if never_ran:
            problems.append(f"{len(never_ran)} succeeded without running, e.g. {never_ran[:3]}")
        if runs_once and figure.re_executions:
            again = [t for t in wanted if runs[t] > 1][:3]
            problems.append(
                f"{figure.re_executions} re-executions, e.g. {[by_id.get(t) for t in again]}"
            )
        if problems:
            logs = "\n".join(
                f"--- {w.name} (last 40 lines)\n" + "\n".join(w.log().splitlines()[-40:])
                for w in self.workers
            )
            pytest.fail(f"{figure.line()}\n" + "\n".join(problems) + f"\n{logs}")
        return figure

    def _runs_text(self) -> str:
        try:
            return self.runs_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        for application in self.apps:
            with contextlib.suppress(Exception):
                application.close()
        for proxy in self.proxies:
            proxy.close()


class SteadyProducer(threading.Thread):
    """Submits jobs at a steady pace from a thread while the test breaks things."""

    def __init__(self, faults: Faults, count: int, pause: float, every: float) -> None:
        super().__init__(name="steady-producer", daemon=True)
        self.faults, self.count, self.pause, self.every = faults, count, pause, every
        self.ids: list[str] = []
        self.refused: list[str] = []

    def run(self) -> None:
        import fault_tasks

        for number in range(self.count):
            try:
                self.ids.append(fault_tasks.record_run.delay(number, self.pause).id)
            except Exception as exc:  # the caller was told: not submitted
                self.refused.append(repr(exc))
            time.sleep(self.every)

    def result(self, timeout: float = 60.0) -> list[str]:
        self.join(timeout)
        assert not self.is_alive(), "the producer thread did not finish"
        return self.ids
