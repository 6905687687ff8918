"""The ``heretic`` command line (see :mod:`heretic_kombu.cli.main`)."""

from __future__ import annotations

from .main import cli, main

__all__ = ["cli", "main"]
