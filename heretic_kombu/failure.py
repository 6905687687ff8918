"""How a task's exception is stored in the row and rebuilt for ``AsyncResult.get()``.

The row keeps ``{"exc_type", "exc_module", "exc_message"}`` in ``result`` (as Celery's
result backends do), a one-line ``error`` for search, and the formatted ``traceback``.
Rebuilding looks the class up only in modules this process has already imported (rows
are data, and importing a module named by data would run its code; Celery made the same
choice after CVE-2021-23727). A class found there that is an exception is used as is;
otherwise a stand-in class with the same name and module is made, so the caller still
sees the type name and message.
"""

from __future__ import annotations

import builtins
import math
import re
import sys
import traceback
from types import TracebackType
from typing import Any

from . import exceptions

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def describe(exc: BaseException) -> dict[str, Any]:
    """The JSON-able description of ``exc`` stored in the row's ``result`` (never raises,
    whatever the exception's arguments or its ``__repr__`` do)."""
    args: list[Any] = []
    for arg in _args(exc):
        if isinstance(arg, str):
            args.append(clean(arg))
        elif isinstance(arg, (int, float, bool, type(None))) and _finite(arg):
            args.append(arg)
        else:
            args.append(clean(_safely(repr, arg)))
    return {
        "exc_type": clean(type(exc).__qualname__),
        "exc_module": clean(str(type(exc).__module__)),
        "exc_message": args,
    }


def summary(exc: BaseException) -> str:
    """The one-line ``error`` column: ``TypeName: message`` (never raises)."""
    message = _safely(str, exc)
    name = type(exc).__name__
    return clean(f"{name}: {message}" if message else name)


def formatted(exc: BaseException) -> str:
    """The ``traceback`` column: the exception formatted as Python prints it."""
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception as error:  # a __str__ or a frame that cannot be shown
        text = f"{type(exc).__name__} (its traceback could not be formatted: {error!r})"
    return clean(text)


class ExceptionInfo(str):
    """Celery's ``einfo``, as task hooks and signals receive it: ``einfo.exception``,
    ``einfo.type``, ``einfo.tb``, ``einfo.traceback`` and ``einfo.exc_info``. It is also
    the formatted traceback as text (``str(einfo)``, ``"KeyError" in einfo``), which is
    what heretic passed before and what a row's ``traceback`` column holds."""

    exception: BaseException
    type: builtins.type[BaseException]
    tb: TracebackType | None

    def __new__(cls, exc: BaseException, text: str | None = None) -> ExceptionInfo:
        info = super().__new__(cls, formatted(exc) if text is None else text)
        info.exception = exc
        info.type = type(exc)
        info.tb = exc.__traceback__
        return info

    @property
    def traceback(self) -> str:
        """The formatted traceback."""
        return str.__str__(self)

    @property
    def exc_info(self) -> tuple[builtins.type[BaseException], BaseException, TracebackType | None]:
        return (self.type, self.exception, self.tb)

    def __repr__(self) -> str:
        return f"<ExceptionInfo: {_safely(repr, self.exception)}>"


def clean(text: str) -> str:
    """``text`` as the table, JSON and the logs can hold it: a NUL (which PostgreSQL's
    text refuses) and lone surrogates (which UTF-8 cannot encode) are written escaped."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _safely(render: Any, value: Any) -> str:
    """``render(value)``, or a placeholder when the value's own method raises."""
    try:
        return str(render(value))
    except Exception as error:
        return f"<{render.__name__}() of {type(value).__name__} failed: {type(error).__name__}>"


def _args(exc: BaseException) -> tuple[Any, ...]:
    try:
        args = exc.args
        return tuple(args) if isinstance(args, (tuple, list)) else (args,)
    except Exception:
        return ()


def _finite(number: Any) -> bool:
    return not isinstance(number, float) or math.isfinite(number)


def rebuild(meta: Any) -> BaseException:
    """An exception instance from :func:`describe`'s output (never raises)."""
    if not isinstance(meta, dict) or "exc_type" not in meta:
        return exceptions.HereticKombuError(f"task failed: {meta!r}")
    name = str(meta.get("exc_type") or "Exception")
    module = str(meta.get("exc_module") or "builtins")
    args = meta.get("exc_message") or []
    if not isinstance(args, list):
        args = [args]
    cls = _find_class(module, name)
    try:
        return cls(*args)
    except Exception:
        return _stand_in(module, name)(*args)


def _find_class(module: str, name: str) -> type[BaseException]:
    if _DOTTED.match(module) and _DOTTED.match(name):
        try:
            found: Any = sys.modules[module]
            for part in name.split("."):
                found = getattr(found, part)
            if isinstance(found, type) and issubclass(found, BaseException):
                return found
        except Exception:  # missing module or attribute: fall back to a stand-in
            pass
    return _stand_in(module, name)


def _stand_in(module: str, name: str) -> type[BaseException]:
    short = name.rsplit(".", 1)[-1]
    if not short.isidentifier():
        short = "TaskError"
    return type(short, (Exception,), {"__module__": module})
