"""JSON in and out: the only encoding heretic_kombu accepts, on the wire and in the table.

Values go through kombu's JSON helpers, so datetimes, dates, UUIDs and Decimals round
trip exactly as they do between Celery clients and workers. Encoding is strict: a value
that JSON cannot represent, NaN/Infinity, NUL characters and lone surrogates (which
PostgreSQL's ``jsonb`` and ``text`` refuse) fail at the caller with :class:`EncodeError`,
before any row is written or message sent.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kombu.utils import json as kombu_json

from .exceptions import EncodeError

# An escaped NUL in JSON text: "\u0000" preceded by an even number of backslashes
# (an odd number would mean the backslash itself was escaped, i.e. literal text).
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class RawJSON(str):
    """JSON text that is already encoded and checked; the store writes it as is."""


def dumps(value: Any) -> RawJSON:
    """Encode ``value`` as JSON text, or raise :class:`EncodeError` saying why not."""
    try:
        text = kombu_json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise EncodeError(f"cannot encode as JSON: {exc}") from exc
    if _ESCAPED_NUL.search(text):
        raise EncodeError("cannot encode as JSON: strings must not contain NUL (\\x00) characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(
            f"cannot encode as JSON: string holds a lone surrogate at position {exc.start}"
        ) from exc
    return RawJSON(text)


def loads(text: str | bytes) -> Any:
    """Decode JSON text produced by :func:`dumps` (or by a Celery client)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8")
    if _TYPE_MARKER not in text and "\\u" not in text:
        # No value in kombu's {"__type__": ..., "__value__": ...} envelope can be in
        # here (the key could only hide behind a \u escape), so the C decoder alone
        # gives the same result, without a Python call for every object decoded:
        # a third of the time of a typical job's arguments.
        return json.loads(text)
    return kombu_json.loads(text)


_TYPE_MARKER = '"__type__"'


def engine_serializer(value: Any) -> str:
    """JSON serializer for SQLAlchemy engines: pass pre-encoded text through."""
    if isinstance(value, RawJSON):
        return value
    return dumps(value)
