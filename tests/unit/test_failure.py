"""How a task's exception is stored and rebuilt for the caller."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from heretic_kombu import failure
from heretic_kombu.exceptions import HereticKombuError, MaxRetriesExceededError


class PaymentDeclined(Exception):
    """A custom exception class a project's tasks might raise."""


class Outer:
    class NestedError(Exception):
        pass


class NeedsTwo(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def rebuilt(exc: BaseException) -> BaseException:
    """What a caller sees: describe in the worker, JSON in the row, rebuild in the client."""
    return failure.rebuild(json.loads(json.dumps(failure.describe(exc))))


# -- describe ----------------------------------------------------------------------------


def test_describe_is_celerys_json_shape() -> None:
    assert failure.describe(ValueError("bad value", 3)) == {
        "exc_type": "ValueError",
        "exc_module": "builtins",
        "exc_message": ["bad value", 3],
    }


def test_describe_turns_non_json_arguments_into_their_repr() -> None:
    meta = failure.describe(KeyError(("a", 1)))
    assert meta["exc_message"] == [repr(("a", 1))]
    json.dumps(meta)


def test_summary_is_type_and_message() -> None:
    assert failure.summary(ValueError("bad")) == "ValueError: bad"
    assert failure.summary(ValueError()) == "ValueError"


# -- rebuild --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        KeyError("missing"),
        ZeroDivisionError("division by zero"),
        OSError(2, "nope"),
    ],
)
def test_builtin_exceptions_keep_type_and_message(exc: BaseException) -> None:
    again = rebuilt(exc)
    assert type(again) is type(exc)
    assert str(again) == str(exc)
    assert again.args == exc.args


def test_custom_exception_class_keeps_its_type() -> None:
    again = rebuilt(PaymentDeclined("card expired"))
    assert type(again) is PaymentDeclined
    assert str(again) == "card expired"


def test_nested_exception_class_keeps_its_type() -> None:
    again = rebuilt(Outer.NestedError("inside"))
    assert type(again) is Outer.NestedError
    assert str(again) == "inside"


def test_heretic_exceptions_keep_their_type() -> None:
    again = rebuilt(MaxRetriesExceededError("Can't retry t[1]"))
    assert isinstance(again, MaxRetriesExceededError)
    assert str(again) == "Can't retry t[1]"


def test_class_whose_constructor_refuses_the_args_gets_a_stand_in() -> None:
    again = rebuilt(NeedsTwo(402, "declined"))
    assert type(again).__name__ == "NeedsTwo"
    assert isinstance(again, Exception)
    assert str(again) == "402: declined"


def test_exception_from_an_unknown_module_gets_a_stand_in_with_its_name() -> None:
    module = f"no_such_module_{uuid.uuid4().hex}"
    again = failure.rebuild(
        {"exc_type": "FancyError", "exc_module": module, "exc_message": ["it broke"]}
    )
    assert type(again).__name__ == "FancyError"
    assert type(again).__module__ == module
    assert isinstance(again, Exception)
    assert str(again) == "it broke"
    assert module not in sys.modules
    with pytest.raises(Exception, match="it broke"):
        raise again


def test_exception_class_defined_in_a_function_gets_a_stand_in_with_its_name() -> None:
    class LocalError(Exception):
        pass

    again = rebuilt(LocalError("local"))
    assert type(again).__name__ == "LocalError"
    assert str(again) == "local"


def test_a_single_string_message_is_accepted() -> None:
    again = failure.rebuild(
        {"exc_type": "ValueError", "exc_module": "builtins", "exc_message": "x"}
    )
    assert type(again) is ValueError and str(again) == "x"


@pytest.mark.parametrize("meta", [None, "boom", 42, [1, 2], {"no_type": True}])
def test_meta_that_is_not_a_description_gives_a_heretic_error(meta: Any) -> None:
    again = failure.rebuild(meta)
    assert isinstance(again, HereticKombuError)
    assert "task failed" in str(again)


# -- hostile rows -----------------------------------------------------------------------


def test_hostile_module_name_imports_nothing(tmp_path: Path) -> None:
    before = set(sys.modules)
    marker = tmp_path / "pwned"
    again = failure.rebuild(
        {"exc_type": "system", "exc_module": "os; rm -rf", "exc_message": [f"touch {marker}"]}
    )
    assert isinstance(again, Exception)
    assert set(sys.modules) == before
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name", "make_args"),
    [
        ("os", "system", lambda p: [f"touch {p}"]),
        ("subprocess", "Popen", lambda p: [["touch", str(p)]]),
        ("subprocess", "run", lambda p: [["touch", str(p)]]),
        ("builtins", "eval", lambda p: [f"open({str(p)!r}, 'w')"]),
        ("builtins", "open", lambda p: [str(p), "w"]),
        ("pathlib", "Path.touch", lambda p: [str(p)]),
    ],
)
def test_callables_that_are_not_exception_classes_are_never_called(
    tmp_path: Path, module: str, name: str, make_args: Any
) -> None:
    marker = tmp_path / "pwned"
    again = failure.rebuild(
        {"exc_type": name, "exc_module": module, "exc_message": make_args(marker)}
    )
    assert isinstance(again, Exception)
    assert type(again).__name__ == name.rsplit(".", 1)[-1]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["", "not an identifier!", "a-b", "__import__('os')"])
def test_odd_type_names_still_give_an_exception(name: str) -> None:
    again = failure.rebuild({"exc_type": name, "exc_module": "builtins", "exc_message": ["m"]})
    assert isinstance(again, Exception)
    assert str(again) == "m"


def test_rebuild_does_not_import_modules_named_by_the_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    module = f"hk_side_effect_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "class Boom(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        again = failure.rebuild({"exc_type": "Boom", "exc_module": module, "exc_message": []})
    finally:
        sys.modules.pop(module, None)
    assert isinstance(again, Exception)
    assert not marker.exists()


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class _BadArg:
    def __repr__(self) -> str:
        raise ValueError("boom")


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("nul \x00 inside"),
        ValueError("lone \ud800 surrogate"),
        KeyError("\udcff"),
        _Unprintable("x"),
        ValueError(_BadArg(), float("nan"), float("inf")),
    ],
    ids=["nul", "surrogate", "keyerror-surrogate", "str-raises", "bad-args"],
)
def test_any_exception_is_described_in_text_the_table_and_json_can_hold(exc):
    try:
        raise exc
    except Exception as raised:
        described = failure.describe(raised)
        line = failure.summary(raised)
        text = failure.formatted(raised)
    for value in (json.dumps(described, allow_nan=False), line, text):
        assert "\x00" not in value
        value.encode("utf-8")  # no lone surrogate left
    assert line.startswith(type(exc).__name__)
    assert type(exc).__name__ in text
    rebuilt = failure.rebuild(json.loads(json.dumps(described)))
    assert type(rebuilt).__name__ == type(exc).__name__
