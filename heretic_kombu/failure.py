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

import re
import sys
from typing import Any

from . import exceptions

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def describe(exc: BaseException) -> dict[str, Any]:
    """The JSON-able description of ``exc`` stored in the row's ``result``."""
    args: list[Any] = []
    for arg in exc.args:
        args.append(arg if isinstance(arg, (str, int, float, bool, type(None))) else repr(arg))
    return {
        "exc_type": type(exc).__qualname__,
        "exc_module": type(exc).__module__,
        "exc_message": args,
    }


def summary(exc: BaseException) -> str:
    """The one-line ``error`` column: ``TypeName: message``."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


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
