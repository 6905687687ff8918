"""Fixtures of the fault suite (the machinery is in harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Faults  # noqa: E402


@pytest.fixture
def faults(backend: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    world = Faults(backend, tmp_path, monkeypatch)
    try:
        yield world
    finally:
        world.close()
