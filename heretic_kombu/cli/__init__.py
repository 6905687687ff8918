"""The ``heretic`` command line: one module per command group, registered here."""

from __future__ import annotations

from . import beat, dashboard, db, dead, jobs, worker  # noqa: F401 - each module registers its commands on `cli`
from .main import cli, main

__all__ = ["cli", "main"]
