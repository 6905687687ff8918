"""Run every parity scenario on real Celery and on heretic_kombu; print the parity table.

``python -m compat.parity.run`` (what ``nox -s compat`` runs), from the repository root,
with PostgreSQL on 127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672:

1. for each implementation, create a PostgreSQL database of its own (Celery's
   ``db+postgresql://`` result backend; heretic's job table) and pick queue names of its
   own (``parity_<impl>_<run>.default|routed|other``), so nothing crosses;
2. start each implementation's worker as a real process (``celery -A compat.parity.proj
   worker -P prefork -c 2 -Q ...`` and ``heretic -A compat.parity.proj worker ...``);
3. run the scenarios of ``scenarios.py`` against each, both implementations at once, each
   in a client process of its own (``COMPAT_IMPL`` chooses the import line of
   ``proj.py``); a scenario that raises or passes its timeout records that as its outcome
   and the run goes on;
4. stop the workers, drop the databases and queues, print the table and write it to
   ``compat/parity/RESULTS.md``.

Exit status 1 when a scenario that is not in :data:`KNOWN_DIFFERENCES` has different
outcomes; 2 when the services are not reachable.

Options: ``--only NAME`` (repeatable) runs some scenarios; ``--no-write`` leaves
RESULTS.md alone; ``--client IMPL --out PATH`` is the client process's own mode.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
IMPLS = ("celery", "heretic")
PG_ADMIN_URL = os.environ.get(
    "COMPAT_PG_URL",
    os.environ.get("HERETIC_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
)
AMQP_URL = os.environ.get(
    "COMPAT_AMQP_URL",
    os.environ.get("HERETIC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
)
SCENARIO_TIMEOUT = 25.0
WORKER_START_TIMEOUT = 45.0
#: The clients' share of the four minutes the whole run may take.
CLIENT_DEADLINE = 170.0
QUEUE_NAMES = ("default", "routed", "other")

#: Scenarios whose outcomes are known to differ, with the reason. A mismatch of any other
#: scenario fails the run. Keep each reason to what Celery does and what heretic does.
KNOWN_DIFFERENCES: dict[str, str] = {
    "nan_argument": (
        "Celery's JSON serializer writes NaN (which is not JSON) and the task receives nan;"
        " heretic refuses it at .delay() with EncodeError: arguments are stored as JSON"
        " (PostgreSQL jsonb has no NaN)."
    ),
    "serializer_pickle": (
        "heretic refuses serializer='pickle' where the task is declared"
        " (ConfigurationError); Celery declares it, publishes a pickle message, and its"
        " worker (accept_content=['json']) refuses to decode it, so the task stays PENDING."
    ),
    "ignore_result": (
        "with ignore_result=True Celery stores nothing and the state stays PENDING;"
        " heretic's row still records that the job ran: SUCCESS, with no result value."
    ),
    "ignore": (
        "after `raise Ignore()` Celery stores nothing (the state stays PENDING);"
        " heretic ends the row in status ignored and reports IGNORED."
    ),
}


# ---- the client process ------------------------------------------------------------------


class ScenarioTimeout(Exception):
    """A scenario ran past its timeout."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise ScenarioTimeout()


def client_main(impl: str, out: Path, only: list[str], timeout: float) -> int:
    """Import the project with ``impl``'s import line and run the scenarios; one JSON
    line per scenario goes to ``out`` as soon as it is known."""
    os.environ["COMPAT_IMPL"] = impl
    proj = importlib.import_module("compat.parity.proj")
    from compat.parity.scenarios import SCENARIOS, normalise

    signal.signal(signal.SIGALRM, _on_alarm)
    # Touch the result store once before any worker writes to it: Celery's database
    # backend creates its tables on first use, and two first uses at once can collide.
    with contextlib.suppress(Exception):
        proj.app.AsyncResult(str(uuid.uuid4())).ready()
    with open(out, "a", encoding="utf-8") as sink:
        for name, fun in SCENARIOS.items():
            if only and name not in only:
                continue
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                outcome = fun(proj)
            except ScenarioTimeout:
                outcome = ["TIMEOUT", f"no outcome within {timeout:g}s"]
            except Exception as exc:
                outcome = ["ERROR", type(exc).__name__, str(exc)[:200]]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            entry = {"name": name, "seconds": round(time.monotonic() - started, 2)}
            try:
                line = json.dumps({**entry, "outcome": normalise(outcome, proj.PREFIX)})
            except Exception as exc:  # an outcome that cannot be shown is an error too
                line = json.dumps({**entry, "outcome": ["ERROR", repr(exc)[:200]]})
            sink.write(line + "\n")
            sink.flush()
    os._exit(0)  # client threads of either library must not hold the exit


# ---- services ---------------------------------------------------------------------------


def services_unavailable() -> str | None:
    import kombu
    import psycopg2

    try:
        psycopg2.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"RabbitMQ not reachable at {AMQP_URL}: {exc}"
    return None


def _admin(sql: str, *params: Any) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params or None)
    finally:
        conn.close()


def create_database(name: str) -> str:
    _admin(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"


def drop_database(name: str) -> None:
    _admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", name)
    _admin(f'DROP DATABASE IF EXISTS "{name}"')


def delete_queues(prefix: str) -> None:
    import kombu

    with kombu.Connection(AMQP_URL) as conn:
        for base in QUEUE_NAMES:
            for name in (f"{prefix}.{base}", f"{prefix}.{base}.dead"):
                with contextlib.suppress(Exception):
                    conn.default_channel.queue_delete(name)
                with contextlib.suppress(Exception):
                    conn.default_channel.exchange_delete(name)


# ---- one implementation's side of the run --------------------------------------------------


class Side:
    """One implementation: its database, queues, state directory, worker and client."""

    def __init__(self, impl: str, run_id: str, workdir: Path) -> None:
        self.impl = impl
        self.prefix = f"parity_{impl}_{run_id}"
        self.database = f"parity_{impl}_{run_id}"
        self.state_dir = workdir / impl
        self.state_dir.mkdir()
        self.worker_log = workdir / f"{impl}-worker.log"
        self.client_log = workdir / f"{impl}-client.log"
        self.out = workdir / f"{impl}-outcomes.jsonl"
        self.database_url = ""
        self.worker: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERETIC_")}
        env.update(
            COMPAT_IMPL=self.impl,
            COMPAT_BROKER_URL=AMQP_URL,
            COMPAT_QUEUE_PREFIX=self.prefix,
            COMPAT_STATE_DIR=str(self.state_dir),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        if self.impl == "celery":
            env["COMPAT_RESULT_BACKEND"] = "db+" + self.database_url.replace(
                "postgresql://", "postgresql+psycopg2://", 1
            )
        else:
            env["HERETIC_DATABASE_URL"] = self.database_url
            env["HERETIC_BROKER_URL"] = AMQP_URL
        return env

    def start_worker(self) -> None:
        self.database_url = create_database(self.database)
        queues = ",".join(f"{self.prefix}.{name}" for name in QUEUE_NAMES)
        common = ["-A", "compat.parity.proj", "worker", "-P", "prefork", "-c", "2"]
        common += ["-Q", queues, "-l", "info", "-n", f"parity-{self.impl}@%h"]
        if self.impl == "celery":
            command = [sys.executable, "-m", "celery", *common]
            command += ["--without-gossip", "--without-mingle"]
        else:
            command = [sys.executable, "-m", "heretic_kombu.cli", *common]
        with open(self.worker_log, "ab") as log:
            self.worker = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env(),
                start_new_session=True,
            )

    def worker_ready(self) -> bool:
        text = self.worker_log.read_text(encoding="utf-8", errors="replace")
        marker = " ready." if self.impl == "celery" else " ready: "
        return marker in text

    def worker_failed(self) -> str | None:
        if self.worker is not None and self.worker.poll() is not None:
            return f"{self.impl} worker exited with {self.worker.returncode}"
        return None

    def start_client(self, only: list[str]) -> None:
        command = [sys.executable, "-m", "compat.parity.run", "--client", self.impl]
        command += ["--out", str(self.out)]
        for name in only:
            command += ["--only", name]
        with open(self.client_log, "ab") as log:
            self.client = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=self.env(),
                start_new_session=True,
            )

    def outcomes(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if self.out.exists():
            for line in self.out.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    found[entry["name"]] = entry["outcome"]
        return found

    def stop(self) -> None:
        for process in (self.client, self.worker):
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for process in (self.client, self.worker):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # and any pool child left
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)

    def clean_up(self) -> None:
        with contextlib.suppress(Exception):
            delete_queues(self.prefix)
        if self.database_url:
            with contextlib.suppress(Exception):
                drop_database(self.database)


# ---- the table -----------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return json.dumps(value, sort_keys=True).replace("|", "\\|")


def build_table(names: list[str], outcomes: dict[str, dict[str, Any]]) -> tuple[str, int]:
    """The markdown parity table, and how many unexpected mismatches it has."""
    rows = ["| scenario | Celery outcome | heretic outcome | match |", "| --- | --- | --- | --- |"]
    same = known = unexpected = 0
    missing = ["NOT RUN", "runner deadline or client crash"]
    for name in names:
        celery = outcomes["celery"].get(name, missing)
        heretic = outcomes["heretic"].get(name, missing)
        if celery == heretic:
            mark, same = "yes", same + 1
            if name in KNOWN_DIFFERENCES:
                mark = "yes (listed as a known difference: remove it)"
        elif name in KNOWN_DIFFERENCES:
            mark, known = "known difference", known + 1
        else:
            mark, unexpected = "**NO**", unexpected + 1
        rows.append(f"| {name} | {_cell(celery)} | {_cell(heretic)} | {mark} |")
    rows.append("")
    rows.append(
        f"{len(names)} scenarios: {same} match, {known} known differences,"
        f" {unexpected} unexpected mismatches."
    )
    if KNOWN_DIFFERENCES:
        rows.append("")
        rows.append("Known differences:")
        rows.append("")
        for name, reason in KNOWN_DIFFERENCES.items():
            rows.append(f"- `{name}`: {reason}")
    return "\n".join(rows) + "\n", unexpected


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def run_all(only: list[str], write: bool) -> int:
    from compat.parity.scenarios import SCENARIOS

    reason = services_unavailable()
    if reason:
        print(f"compat: {reason}", file=sys.stderr)
        return 2
    names = [n for n in SCENARIOS if not only or n in only]
    run_id = uuid.uuid4().hex[:8]
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        workdir = Path(tmp)
        sides = [Side(impl, run_id, workdir) for impl in IMPLS]
        try:
            for side in sides:
                side.start_worker()
            deadline = time.monotonic() + WORKER_START_TIMEOUT
            for side in sides:
                while not side.worker_ready():
                    problem = side.worker_failed()
                    if problem or time.monotonic() > deadline:
                        print(problem or f"{side.impl} worker did not start", file=sys.stderr)
                        print(side.worker_log.read_text(errors="replace")[-3000:], file=sys.stderr)
                        return 1
                    time.sleep(0.1)
            print(f"workers ready after {time.monotonic() - began:.1f}s", flush=True)
            for side in sides:
                side.start_client(only)
            _wait_clients(sides, time.monotonic() + CLIENT_DEADLINE)
            outcomes = {side.impl: side.outcomes() for side in sides}
            for side in sides:
                if len(outcomes[side.impl]) < len(names):
                    print(f"--- {side.impl} client log (incomplete run):", file=sys.stderr)
                    print(side.client_log.read_text(errors="replace")[-3000:], file=sys.stderr)
        finally:
            for side in sides:
                side.stop()
            for side in sides:
                side.clean_up()
    table, unexpected = build_table(names, outcomes)
    print(table)
    print(f"whole run: {time.monotonic() - began:.0f}s")
    if write and not only:
        header = (
            "# Celery parity results\n\n"
            "Generated by `nox -s compat` (`python -m compat.parity.run`): the same scenarios"
            " (`compat/parity/scenarios.py`) on real Celery and on heretic_kombu, each with a"
            " real prefork worker on RabbitMQ and PostgreSQL.\n\n"
            f"Celery {_version('celery')}, heretic-kombu {_version('heretic-kombu')}.\n\n"
        )
        RESULTS_PATH.write_text(header + table, encoding="utf-8")
    return 1 if unexpected else 0


def _wait_clients(sides: list[Side], deadline: float) -> None:
    """Wait for the clients, in a thread each, until they finish or the deadline passes."""

    def wait(side: Side) -> None:
        assert side.client is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            side.client.wait(timeout=max(0.0, deadline - time.monotonic()))

    threads = [threading.Thread(target=wait, args=(side,)) for side in sides]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compat.parity.run", description=__doc__)
    parser.add_argument("--only", action="append", default=[], help="run only this scenario")
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--client", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=SCENARIO_TIMEOUT, help="per scenario")
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args.client, args.out, args.only, args.timeout)
    return run_all(args.only, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
