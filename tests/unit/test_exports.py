"""The public names: what ``from heretic_kombu import ...`` offers, and Celery's aliases."""

from __future__ import annotations

import importlib
import types

import pytest

import heretic_kombu

EXPECTED_ALL = [
    "AsyncResult",
    "Celery",
    "EagerResult",
    "GroupResult",
    "Heretic",
    "HereticKombuError",
    "Job",
    "MaxRetriesExceededError",
    "Retry",
    "Signature",
    "Task",
    "__version__",
    "chain",
    "chord",
    "crontab",
    "current_app",
    "exceptions",
    "group",
    "schedule",
    "shared_task",
    "signature",
    "states",
    "subtask",
]

CELERY_EXCEPTION_NAMES = [
    "Retry",
    "MaxRetriesExceededError",
    "TimeoutError",
    "TaskRevokedError",
    "WorkerLostError",
    "NotRegistered",
    "EncodeError",
    "ChordError",
]


def test_all_is_exactly_the_public_api() -> None:
    assert heretic_kombu.__all__ == EXPECTED_ALL


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from heretic_kombu import {name}", namespace)  # noqa: S102 - the user's import line
    assert namespace[name] is getattr(heretic_kombu, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from heretic_kombu import *", namespace)  # noqa: S102
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(EXPECTED_ALL)


def test_celery_is_heretic() -> None:
    assert heretic_kombu.Celery is heretic_kombu.Heretic


def test_version_is_a_string() -> None:
    assert isinstance(heretic_kombu.__version__, str)
    assert heretic_kombu.__version__


def test_submodules_are_modules() -> None:
    assert isinstance(heretic_kombu.exceptions, types.ModuleType)
    assert isinstance(heretic_kombu.states, types.ModuleType)
    assert heretic_kombu.states.CELERY_SUCCESS == "SUCCESS"


@pytest.mark.parametrize("name", CELERY_EXCEPTION_NAMES)
def test_exceptions_module_has_celerys_names(name: str) -> None:
    module = importlib.import_module("heretic_kombu.exceptions")
    cls = getattr(module, name)
    assert isinstance(cls, type) and issubclass(cls, Exception)
    assert issubclass(cls, heretic_kombu.HereticKombuError)


def test_top_level_exceptions_are_the_exceptions_modules_classes() -> None:
    assert heretic_kombu.Retry is heretic_kombu.exceptions.Retry
    assert heretic_kombu.MaxRetriesExceededError is heretic_kombu.exceptions.MaxRetriesExceededError
    assert heretic_kombu.HereticKombuError is heretic_kombu.exceptions.HereticKombuError


def test_heretic_timeout_error_is_celerys_own_not_the_builtin() -> None:
    # Code written for celery.exceptions.TimeoutError catches this one.
    assert heretic_kombu.exceptions.TimeoutError is not TimeoutError
    with pytest.raises(heretic_kombu.exceptions.TimeoutError, match="timed out"):
        raise heretic_kombu.exceptions.TimeoutError()


def test_not_registered_reads_as_its_message() -> None:
    error = heretic_kombu.exceptions.NotRegistered("task 'x' is not registered")
    assert isinstance(error, KeyError)
    assert str(error) == "task 'x' is not registered"


def test_exceptions_default_to_their_docstring_message() -> None:
    assert str(heretic_kombu.exceptions.TaskRevokedError()) == (
        "The task was revoked or expired before it ran."
    )
