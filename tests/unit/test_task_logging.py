"""Celery's task logger and einfo, as task code reads them."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from heretic_kombu import Task
from heretic_kombu.utils.log import TASK_FORMAT, get_task_logger


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(TASK_FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Any:
    handler = _Capture()
    logger = get_task_logger("tests.unit.tasklog")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def test_task_logger_records_name_the_running_job(make_app, captured) -> None:
    app = make_app(task_always_eager=True)
    logger = get_task_logger("tests.unit.tasklog")

    @app.task(name="tests.log_me")
    def log_me(x: int) -> int:
        logger.info("working on %s", x)
        return x

    result = log_me.delay(7)
    logger.info("outside")
    assert captured.lines[0].endswith(f"tests.log_me[{result.id}]: working on 7")
    assert captured.lines[1].endswith("???[???]: outside")
    assert get_task_logger("tests.unit.tasklog") is logger  # one filter, however often asked


def test_hooks_get_celerys_exception_info(make_app) -> None:
    app = make_app(task_always_eager=True)
    seen: dict[str, Any] = {}

    class Watched(Task):
        def on_failure(self, exc, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
            seen["failure"] = einfo

        def on_retry(self, exc, task_id, args, kwargs, einfo):  # type: ignore[no-untyped-def]
            seen["retry"] = einfo

    @app.task(base=Watched, bind=True, max_retries=1, default_retry_delay=0)
    def divide(self: Task, x: int) -> float:
        try:
            return 1 / x
        except ZeroDivisionError as exc:
            raise self.retry(exc=exc) from exc

    divide.apply((0,))
    failure = seen["failure"]
    assert isinstance(failure.exception, ZeroDivisionError)
    assert failure.type is ZeroDivisionError
    assert "ZeroDivisionError" in failure.traceback and "ZeroDivisionError" in failure
    assert failure.exc_info[1] is failure.exception and failure.tb is not None
    assert isinstance(seen["retry"].exception, ZeroDivisionError)
    assert str(failure) == failure.traceback
