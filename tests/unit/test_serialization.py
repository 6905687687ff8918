"""JSON encoding: what round-trips, and what is refused with EncodeError."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import kombu.exceptions
import pytest

from heretic_kombu import serialization
from heretic_kombu.exceptions import EncodeError, HereticKombuError

UTC = dt.timezone.utc


def round_trip(value: Any) -> Any:
    return serialization.loads(serialization.dumps(value))


def assert_refused(value: Any) -> EncodeError:
    with pytest.raises(EncodeError) as info:
        serialization.dumps(value)
    return info.value


# -- refusals ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        [1, float("nan")],
        {"deep": {"er": [float("inf")]}},
    ],
)
def test_nan_and_infinity_are_refused(value: Any) -> None:
    assert_refused(value)


class Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [object(), Opaque(), {"x": Opaque()}, [1, {2, 3}], lambda: None, {(1, 2): "tuple key"}],
)
def test_values_json_cannot_represent_are_refused(value: Any) -> None:
    assert "cannot encode as JSON" in str(assert_refused(value))


@pytest.mark.parametrize(
    "value",
    [
        "a\x00b",
        "\x00",
        {"k": "v\x00"},
        {"k\x00": "v"},
        {"outer": [{"inner": ["ok", "bad\x00"]}]},
        {"outer": {"in\x00ner": 1}},
        "\\\x00",  # a backslash followed by a NUL
        b"bytes\x00",
    ],
)
def test_nul_characters_are_refused_in_keys_and_values_at_any_depth(value: Any) -> None:
    assert "NUL" in str(assert_refused(value))


@pytest.mark.parametrize(
    "value",
    ["\ud800", "ok \udfff ok", {"k": ["\udc80"]}, {"key\ud800": 1}, "\ud83d\ude00"],
)
def test_lone_surrogates_are_refused(value: Any) -> None:
    assert "surrogate" in str(assert_refused(value))


def test_encode_error_is_also_kombus_encode_error() -> None:
    error = assert_refused(object())
    assert isinstance(error, kombu.exceptions.EncodeError)
    assert isinstance(error, HereticKombuError)
    with pytest.raises(kombu.exceptions.EncodeError):
        serialization.dumps({"x": "\x00"})


# -- what is accepted ---------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "\\u0000",  # the six characters backslash, u, 0, 0, 0, 0
        "\\\\u0000",
        "C:\\u0000\\dir",
        "\\",
    ],
)
def test_literal_backslash_u0000_text_is_not_a_nul(text: str) -> None:
    assert round_trip(text) == text
    assert round_trip({text: text}) == {text: text}


def test_typed_values_round_trip_with_their_types() -> None:
    value = {
        "aware": dt.datetime(2024, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
        "offset": dt.datetime(2024, 3, 4, 5, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        "naive": dt.datetime(2024, 3, 4, 5, 6, 7),
        "date": dt.date(2024, 2, 29),
        "decimal": Decimal("12345678901234567890.000000001"),
        "uuid": uuid.UUID("0f0e0d0c-0b0a-4908-8706-050403020100"),
    }
    decoded = round_trip(value)
    assert decoded == value
    for key in value:
        assert type(decoded[key]) is type(value[key]), key
    assert decoded["offset"].utcoffset() == dt.timedelta(hours=-5)
    assert str(decoded["decimal"]) == "12345678901234567890.000000001"


def test_plain_json_round_trips_and_non_ascii_text_survives() -> None:
    value = {"int": 1, "float": 1.5, "bool": False, "none": None, "text": "héllo ✓ 😀", "l": [1]}
    assert round_trip(value) == value
    assert "😀" in serialization.dumps(value)


def test_tuples_come_back_as_lists() -> None:
    assert round_trip((1, (2, 3))) == [1, [2, 3]]


def test_dumps_returns_json_text() -> None:
    text = serialization.dumps({"a": [1, 2]})
    assert isinstance(text, str)
    assert serialization.loads(text) == {"a": [1, 2]}
    assert serialization.loads(text.encode("utf-8")) == {"a": [1, 2]}


@pytest.mark.parametrize(
    "text",
    [
        # kombu's typed envelope, as a Celery client writes it (ASCII escapes included)
        '{"when": {"__type__": "datetime", "__value__": "2024-03-04T05:06:07+00:00"}}',
        '[{"__type__": "uuid", "__value__": {"hex": "0f0e0d0c0b0a49088706050403020100"}}]',
        # the same key spelled with \\u escapes: still an envelope once decoded
        '{"\\u005f\\u005ftype__": "decimal", "__value__": "1.5"}',
        '{"\\u005f_type_\\u005f": "date", "__value__": "2024-02-29"}',
        # text that merely mentions the marker, and plain JSON
        '{"note": "__type__ is a key kombu uses", "n": [1, 2.5, null, true]}',
        '{"text": "caf\\u00e9", "a": {"b": {}}}',
    ],
)
def test_loads_decodes_exactly_as_kombu(text: str) -> None:
    # loads skips kombu's per-object hook when no envelope can be in the text; whatever
    # the path, the result is kombu's, for text and for bytes.
    expected = kombu.utils.json.loads(text)
    for given in (text, text.encode("utf-8")):
        decoded = serialization.loads(given)
        assert decoded == expected
        assert repr(decoded) == repr(expected)  # same types, not only equal values
