"""Unit fixtures: apps on SQLite files in tmp_path, cut off from the surrounding HERETIC_*."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from heretic_kombu import Heretic


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("HERETIC_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HERETIC_DATABASE_URL", f"sqlite:///{tmp_path}/jobs.sqlite3")
    monkeypatch.setenv("HERETIC_BROKER_URL", f"sqlite:///{tmp_path}/broker.sqlite3")
    return tmp_path


@pytest.fixture
def make_app(isolated_env: Path) -> Iterator[Callable[..., Heretic]]:
    """Make apps (named "unit" unless given a name); all are closed after the test."""
    apps: list[Heretic] = []

    def make(*args: Any, **kwargs: Any) -> Heretic:
        app = Heretic(*(args or ("unit",)), **kwargs)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()
