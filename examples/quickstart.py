"""Enqueue a few jobs, run them in a separate `heretic worker`, print their history.

Run from the repository root: `python examples/quickstart.py`. With nothing configured
it uses the embedded default (.heretic/ in the current directory); set
HERETIC_DATABASE_URL / HERETIC_BROKER_URL to use PostgreSQL and RabbitMQ instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tasks import add, app, flaky_parse, send_email  # noqa: E402

from heretic_kombu.exceptions import TimeoutError  # noqa: E402


def main() -> int:
    results = [
        add.delay(2, 3),
        send_email.delay("bob@example.com", body="Hi"),
        flaky_parse.delay("not a number"),
        app.enqueue("report.build", {"customer": "acme"}, max_attempts=2),
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    print("enqueued:", ", ".join(f"{r.id} ({r.state})" for r in results))
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "heretic_kombu.cli",
            "worker",
            "-A",
            "tasks",
            "-c",
            "2",
            "-l",
            "warning",
        ],
        env=env,
    )
    try:
        for result in results:
            try:
                value = result.get(timeout=60, propagate=False)
            except TimeoutError:
                print(f"{result.id}: still {result.state} after 60s")
                return 1
            print(f"{result.id}: {result.state} -> {value!r}")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    time.sleep(0.1)
    print("\nheretic jobs list:")
    subprocess.run(
        [sys.executable, "-m", "heretic_kombu.cli", "jobs", "list", "--limit", "4"],
        check=True,
        env=env,
    )
    print("\nheretic jobs show (the retried email):")
    subprocess.run(
        [sys.executable, "-m", "heretic_kombu.cli", "jobs", "show", results[1].id],
        check=True,
        env=env,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
