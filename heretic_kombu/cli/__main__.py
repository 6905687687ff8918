"""``python -m heretic_kombu.cli``: the same as the ``heretic`` command."""

from __future__ import annotations

from .main import main

main()
