"""The row status vocabulary (heretic_kombu.status): one enum, stored and read as text."""

from __future__ import annotations

import json

from heretic_kombu import states
from heretic_kombu.status import ALL_STATUSES, TERMINAL, Status


def test_statuses_are_the_tables_text() -> None:
    assert [s.value for s in Status] == [
        "pending",
        "scheduled",
        "queued",
        "started",
        "retrying",
        "succeeded",
        "failed",
        "revoked",
        "ignored",
    ]
    assert ALL_STATUSES == tuple(Status)
    assert f"{Status.QUEUED}" == str(Status.QUEUED) == "queued"
    assert f"{Status.FAILED:>8}" == "  failed"
    assert json.dumps([Status.FAILED]) == '["failed"]'


def test_text_read_back_finds_its_status() -> None:
    assert Status("succeeded") is Status.SUCCEEDED
    assert "failed" in TERMINAL and "queued" not in TERMINAL
    assert {Status.QUEUED: 1}["queued"] == 1
    assert states.to_celery("retrying") == "RETRY"
    assert states.QUEUED is Status.QUEUED  # the old names stay importable
