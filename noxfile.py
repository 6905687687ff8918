"""Sessions: `nox -s tests` (the suite), `nox -s lint` (ruff, mypy), `nox -s bench` (heretic vs
Celery), `nox -s compat` (the Celery parity table). Arguments after `--` go to pytest (or to
the benchmark or parity runner)."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
PYPROJECT = nox.project.load_toml("pyproject.toml")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (integration cases need PostgreSQL + RabbitMQ, or skip)."""
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "test"))
    # Cases are independent (each xdist process has its own PostgreSQL database, Redis
    # database and queue names; see tests/helpers.py), and most of their time is spent
    # waiting on real worker processes, so more processes than cores pay.
    processes = os.environ.get("HERETIC_TEST_PROCESSES", "4")
    # The slowest cases are listed at the end of every run: where the suite's time goes.
    session.run("pytest", "-n", processes, "--durations=30", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check, mypy --strict on the package (with its optional
    dependencies installed, so their real types are checked), the import-linter layers."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.install(".[redis,dashboard]")
    session.run("mypy", "heretic_kombu")
    session.run("lint-imports")


@nox.session
def bench(session: nox.Session) -> None:
    """heretic_kombu vs Celery 5.x on the local RabbitMQ + PostgreSQL; prints the table.
    Arguments after `--` go to benchmarks/run.py (e.g. `-- --rounds 5 --only drain`)."""
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "bench"))
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session
def compat(session: nox.Session) -> None:
    """The Celery parity table: the same scenarios on real Celery and on heretic_kombu, each
    with a real worker on the local RabbitMQ + PostgreSQL; writes compat/parity/RESULTS.md.
    Arguments after `--` go to compat/parity/run.py (e.g. `-- --only chord`)."""
    session.install(".", *nox.project.dependency_groups(PYPROJECT, "compat"))
    session.run("python", "-m", "compat.parity.run", *session.posargs)
