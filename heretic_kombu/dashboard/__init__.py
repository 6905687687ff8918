"""``heretic dashboard``: the web UI over the job table, and Prometheus ``/metrics``.

Optional: it needs the ``dashboard`` extra (``pip install "heretic-kombu[dashboard]"``:
Starlette, Jinja2, uvicorn, prometheus_client). Only :mod:`.security` is importable
without it, so that the CLI can check a bind address before asking for the extra.

Modules: :mod:`.security` (who may use it, CSRF), :mod:`.data` (what the pages show,
read through ``app.jobs``), :mod:`.charts` (SVG geometry), :mod:`.metrics` (the
exposition text), :mod:`.app` (the Starlette application).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .security import Access, BindRefused, is_loopback

if TYPE_CHECKING:
    from ..app import Heretic

#: What to install when the extra is missing.
INSTALL_HINT = 'pip install "heretic-kombu[dashboard]"'


def create_app(app: Heretic, access: Access | None = None) -> Any:
    """The dashboard of ``app`` as an ASGI application (see :mod:`.app`); raises
    ``ImportError`` naming :data:`INSTALL_HINT` if the extra is not installed."""
    try:
        from .app import create_app as build
    except ImportError as exc:
        raise ImportError(f"the dashboard needs its extra: {INSTALL_HINT} ({exc})") from exc
    return build(app, access)


__all__ = ["INSTALL_HINT", "Access", "BindRefused", "create_app", "is_loopback"]
