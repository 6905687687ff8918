"""The dashboard's ASGI application (Starlette + Jinja2): pages, actions, ``/metrics``.

Pages read through ``app.jobs`` and :mod:`.data`; actions (retry, cancel, replay) are
POSTs guarded by the CSRF token of :mod:`.security`, answered with a redirect to the
page they came from (so reloading never repeats an action). The app's calls are
blocking (SQLAlchemy, kombu), so each runs in a worker thread, one at a time: a
dashboard is used by few people, and one at a time keeps kombu's connections safe.

Every response carries a Content-Security-Policy that allows no inline script (the
pages have no script at all: charts are SVG drawn here), ``X-Frame-Options: DENY`` and
``nosniff``. Jinja2 escapes every value, so a job whose payload holds ``<script>``
shows it as text.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..exceptions import HereticKombuError
from ..search import ORDERS, Where
from ..status import ALL_STATUSES, TERMINAL
from ..store import RowError
from . import data, metrics
from .security import (
    AUTH_COOKIE,
    CSRF_COOKIE,
    CSRF_FIELD,
    LOGIN_TTL,
    Access,
    is_loopback,
    safe_next,
    same_origin,
)

if TYPE_CHECKING:
    from ..app import Heretic

HERE = Path(__file__).resolve().parent
#: Largest form body accepted (the forms hold a token and an id or two).
MAX_FORM = 64 * 1024
#: Rows per page of the job search unless ``limit`` says otherwise, and the most.
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

NOTICES = {
    "retried": "Sent again: the job is queued for one more attempt.",
    "not-retried": "Not retried: only failed or revoked jobs can be retried.",
    "cancelled": "Cancelled: the job was revoked before it started.",
    "not-cancelled": "Not cancelled: the job has already started or finished.",
}

T = TypeVar("T")


def create_app(app: Heretic, access: Access | None = None) -> Starlette:
    """The dashboard of ``app`` as an ASGI application.

    Args:
        app: the heretic app whose table and broker are shown.
        access: the credentials to require (default: none, for loopback use only; the
            ``Host`` header must then name a loopback address).
    """
    return Dashboard(app, access or Access()).asgi()


class Dashboard:
    """Request handlers over one heretic app."""

    def __init__(self, app: Heretic, access: Access) -> None:
        self.app = app
        self.access = access
        self._lock = threading.Lock()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every value is escaped: payloads are user data
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["when"] = _when
        self.env.filters["pretty"] = data.pretty
        self.env.filters["attempts_limit"] = _attempts_limit
        self.env.globals["terminal"] = TERMINAL

    def asgi(self) -> Starlette:
        routes = [
            Route("/", self.overview),
            Route("/jobs", self.search),
            Route("/jobs/{key}", self.job),
            Route("/jobs/{key}/retry", self.retry, methods=["POST"]),
            Route("/jobs/{key}/cancel", self.cancel, methods=["POST"]),
            Route("/dead", self.dead),
            Route("/dead/{queue}/replay", self.replay, methods=["POST"]),
            Route("/dead/{queue}/{position:int}", self.dead_letter),
            Route("/metrics", self.metrics),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return Starlette(
            routes=routes,
            middleware=[Middleware(_Guard, dashboard=self)],
            exception_handlers={
                HTTPException: self._http_error,
                HereticKombuError: self._service_error,
            },
        )

    # -- helpers -------------------------------------------------------------

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking call of the app in a thread, one at a time."""

        def locked() -> T:
            with self._lock:
                return func(*args, **kwargs)

        return await run_in_threadpool(locked)

    def render(
        self, request: Request, name: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        context.setdefault("notice", NOTICES.get(request.query_params.get("done", "")))
        context.setdefault("nav", "")
        html = self.env.get_template(name).render(
            request=request,
            csrf=request.state.csrf,
            csrf_field=CSRF_FIELD,
            login=request.state.session is not None,  # offer "Log out" to a session only
            **context,
        )
        return HTMLResponse(html, status_code=status_code)

    async def form(self, request: Request) -> dict[str, str]:
        """The posted form's fields, after checking its CSRF token (403 if missing or
        wrong, whatever else was posted)."""
        body = await request.body()
        if len(body) > MAX_FORM:
            raise HTTPException(413, "form too large")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, str] = {}
        if kind == "application/x-www-form-urlencoded":
            try:
                fields = dict(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
            except (UnicodeDecodeError, ValueError):
                raise HTTPException(400, "unreadable form") from None
        if not self.access.csrf_ok(
            request.cookies.get(CSRF_COOKIE), fields.get(CSRF_FIELD), request.state.session
        ):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
        return fields

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if not hasattr(request.state, "csrf"):  # raised before the guard ran
            return Response(exc.detail, status_code=exc.status_code, headers=exc.headers)
        return self.render(
            request, "error.html", exc.status_code, title=str(exc.status_code), message=exc.detail
        )

    async def _service_error(self, request: Request, exc: Exception) -> Response:
        return self.render(
            request,
            "error.html",
            503,
            title="Service unavailable",
            message=f"the job store or the broker did not answer: {exc}",
        )

    # -- pages ---------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        view = await self.call(data.overview, self.app)
        return self.render(request, "overview.html", view=view, nav="overview")

    async def search(self, request: Request) -> Response:
        params = request.query_params
        form = {
            "statuses": [s for s in params.getlist("status") if s],
            "task": params.get("task", ""),
            "queue": params.get("queue", ""),
            "where": "\n".join(w for w in params.getlist("where") if w.strip()),
            "payload": params.get("payload", ""),
            "error_contains": params.get("error_contains", ""),
            "since": params.get("since", ""),
            "until": params.get("until", ""),
            "root": params.get("root", ""),
            "group": params.get("group", ""),
            "order": params.get("order", "-id"),
            "limit": params.get("limit", ""),
        }
        context: dict[str, Any] = {
            "form": form,
            "all_statuses": [s.value for s in ALL_STATUSES],
            "orders": ORDERS,
            "nav": "jobs",
        }
        try:
            filters = _filters(form, params.get("after") or None)
        except ValueError as exc:
            return self.render(
                request, "jobs.html", 400, error=str(exc), page=None, next_url=None, **context
            )
        try:
            page = await self.call(self.app.jobs.search, **filters)
        except ValueError as exc:
            return self.render(
                request, "jobs.html", 400, error=str(exc), page=None, next_url=None, **context
            )
        next_url = None
        if page.next_cursor:
            pairs = [(k, v) for k, v in params.multi_items() if k != "after"]
            next_url = "/jobs?" + urllib.parse.urlencode([*pairs, ("after", page.next_cursor)])
        # Rows that cannot be read back (issue 15) are left out and named, not a 400.
        skipped = "; ".join(
            f"row {row.id} ({row.task_id}, {row.status}) cannot be read: {row.reason}"
            for row in page.skipped
        )
        return self.render(
            request, "jobs.html", error=skipped or None, page=page, next_url=next_url, **context
        )

    async def job(self, request: Request) -> Response:
        job = await self._job(request.path_params["key"])
        lineage = await self.call(data.lineage, self.app, job)
        refusal = None
        if job.status in data.RETRYABLE:
            refusal = await self.call(self.app.jobs.retry_refusal, job)
        return self.render(
            request,
            "job.html",
            job=job,
            lineage=lineage,
            can_retry=job.status in data.RETRYABLE and refusal is None,
            retry_refusal=refusal,
            can_requeue=job.status in data.REQUEUABLE,
            can_cancel=job.status in data.CANCELLABLE,
            nav="jobs",
        )

    async def _job(self, key: str) -> Any:
        try:
            job = await self.call(self.app.jobs.get, key)
        except RowError as exc:  # a row that cannot be read back: say so, not a 500
            raise HTTPException(409, f"job {key}: {exc}") from exc
        if job is None:
            raise HTTPException(404, f"no job {key}")
        return job

    async def dead(self, request: Request) -> Response:
        queues = await self.call(data.known_queues, self.app)
        queue = request.query_params.get("queue") or self.app.settings.default_queue
        if queue not in queues:
            raise HTTPException(404, f"no queue {queue} has jobs")
        letters = await self.call(self.app.jobs.dead_letters, queue, 100)
        notice = None
        if request.query_params.get("done") == "replayed":
            count = _int(request.query_params.get("count"))
            refused = _int(request.query_params.get("refused"))
            notice = f"Replayed {count} dead letter(s)."
            if refused:
                notice += f" {refused} could not be replayed: they would be dead-lettered again."
        return self.render(
            request,
            "dead.html",
            queue=queue,
            queues=queues,
            letters=letters,
            notice=notice,
            nav="dead",
        )

    async def dead_letter(self, request: Request) -> Response:
        queue = request.path_params["queue"]
        position = request.path_params["position"]
        if queue not in await self.call(data.known_queues, self.app):
            raise HTTPException(404, f"no queue {queue} has jobs")
        letters = await self.call(self.app.jobs.dead_letters, queue, max(position, 1))
        letter = next((d for d in letters if d.position == position), None)
        if letter is None:
            raise HTTPException(404, f"no dead letter #{position} in {queue}.dead")
        headers = json.dumps(letter.headers, indent=2, sort_keys=True, default=str)
        return self.render(request, "dead_letter.html", letter=letter, headers=headers, nav="dead")

    async def metrics(self, request: Request) -> Response:
        figures = await self.call(data.metrics, self.app)
        return Response(metrics.render(figures), media_type=metrics.CONTENT_TYPE)

    # -- actions ----------------------------------------------------------------

    async def retry(self, request: Request) -> Response:
        fields = await self.form(request)
        job = await self._job(request.path_params["key"])
        if job.status in data.REQUEUABLE:
            # A job whose message the broker lost: only when the operator confirmed it.
            done = fields.get("requeue") == "lost" and await self.call(
                self.app.jobs.requeue, job.task_id
            )
        else:
            retry = self.app.jobs.retry
            done = job.status in data.RETRYABLE and await self.call(retry, job.task_id)
        return _back(f"/jobs/{job.task_id}", "retried" if done else "not-retried")

    async def cancel(self, request: Request) -> Response:
        await self.form(request)
        job = await self._job(request.path_params["key"])
        done = await self.call(self.app.jobs.cancel, job.task_id)
        return _back(f"/jobs/{job.task_id}", "cancelled" if done else "not-cancelled")

    async def replay(self, request: Request) -> Response:
        fields = await self.form(request)
        queue = request.path_params["queue"]
        if queue not in await self.call(data.known_queues, self.app):
            raise HTTPException(404, f"no queue {queue} has jobs")
        which = fields.get("which", "").strip()
        if not which:
            raise HTTPException(400, "name a dead letter (task id or position) or 'all'")
        if which == "all":
            selection: dict[str, Any] = {}
        elif which.isdigit():
            selection = {"positions": [int(which)]}
        else:
            selection = {"task_ids": [which]}
        replayed, refused = await self.call(self.app.jobs.replay_dead, queue, **selection)
        query = urllib.parse.urlencode(
            {"queue": queue, "done": "replayed", "count": replayed, "refused": len(refused)}
        )
        return RedirectResponse(f"/dead?{query}", status_code=303)

    async def login(self, request: Request) -> Response:
        if self.access.token is None:
            raise HTTPException(404, "no login: this dashboard takes no token")
        target = safe_next(request.query_params.get("next"))
        if request.method == "GET":
            return self.render(request, "login.html", target=target, error=None, nav="")
        fields = await self.form(request)
        client = request.client.host if request.client else "unknown"
        wait = self.access.throttle.wait(client)
        if wait > 0:
            refused = self.render(
                request,
                "login.html",
                429,
                target=target,
                error=f"too many failed logins: try again in {math.ceil(wait)} s",
                nav="",
            )
            refused.headers["Retry-After"] = str(math.ceil(wait))
            return refused
        if not self.access.token_ok(fields.get("token", "")):
            self.access.throttle.failed(client)
            return self.render(
                request, "login.html", 401, target=target, error="wrong token", nav=""
            )
        self.access.throttle.succeeded(client)
        response = RedirectResponse(safe_next(fields.get("next")), status_code=303)
        response.set_cookie(
            AUTH_COOKIE,
            self.access.login(),
            max_age=LOGIN_TTL,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        await self.form(request)
        self.access.logout(request.cookies.get(AUTH_COOKIE))
        response = RedirectResponse("/login" if self.access.token else "/", status_code=303)
        response.delete_cookie(AUTH_COOKIE)
        return response


class _Guard(BaseHTTPMiddleware):
    """Host check, authentication, the CSRF cookie and the security headers."""

    def __init__(self, app: Any, dashboard: Dashboard) -> None:
        super().__init__(app)
        self.dashboard = dashboard

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        access = self.dashboard.access
        request.state.session = access.session(request.cookies.get(AUTH_COOKIE))
        refusal = self._refusal(request, access)
        if refusal is not None:
            return _secured(refusal)
        fresh = None
        if request.state.session is not None:
            request.state.csrf = access.session_csrf(request.state.session)
        else:
            cookie = request.cookies.get(CSRF_COOKIE)
            if access.unsign(cookie) is None:
                fresh = access.new_csrf()
            request.state.csrf = fresh or cookie
        response = await call_next(request)
        if fresh is not None:
            response.set_cookie(CSRF_COOKIE, fresh, httponly=True, samesite="strict")
        return _secured(response)

    @staticmethod
    def _refusal(request: Request, access: Access) -> Response | None:
        if request.method not in ("GET", "HEAD"):
            headers = request.headers
            origin = same_origin(headers.get("host"), headers.get("origin"), headers.get("referer"))
            if origin is False or (origin is None and "authorization" not in headers):
                return Response(
                    "refused: this request did not come from a page of this dashboard "
                    "(its Origin or Referer names another site, or it names none)",
                    status_code=403,
                )
        if not access.required:
            # Open to this machine only. A site that rebinds its own name to 127.0.0.1
            # would send its name as Host: refuse it (DNS rebinding).
            host = urllib.parse.urlsplit(f"//{request.headers.get('host', '')}").hostname
            if not host or not is_loopback(host):
                return Response(
                    "this dashboard answers requests for localhost only; to serve other "
                    "names, start it with --token or --basic-auth",
                    status_code=400,
                )
            return None
        path = request.url.path
        if path.startswith("/static/") or (path == "/login" and access.token is not None):
            return None
        if access.authorization_ok(request.headers.get("authorization")):
            return None
        if request.state.session is not None:
            return None
        if access.basic_auth is not None:
            return Response(
                "authentication required",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="heretic", charset="UTF-8"'},
            )
        if request.method == "GET" and path != "/metrics":
            target = urllib.parse.quote(
                path + (f"?{request.url.query}" if request.url.query else "")
            )
            return RedirectResponse(f"/login?next={target}", status_code=303)
        return Response(
            "authentication required", status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )


def _secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _filters(form: dict[str, Any], after: str | None) -> dict[str, Any]:
    """The search form as ``app.jobs.search`` keyword arguments (``ValueError`` if bad)."""
    where = [Where.parse(line) for line in form["where"].splitlines() if line.strip()]
    payload = None
    if form["payload"].strip():
        try:
            payload = json.loads(form["payload"])
        except ValueError:
            raise ValueError(f"payload is not JSON: {form['payload']!r}") from None
    limit = PAGE_SIZE
    if form["limit"]:
        try:
            limit = int(form["limit"])
        except ValueError:
            raise ValueError(f"limit must be a number, not {form['limit']!r}") from None
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    return {
        "status": form["statuses"],
        "task": form["task"] or None,
        "queue": form["queue"] or None,
        "where": where,
        "payload": payload,
        "error_contains": form["error_contains"] or None,
        "since": form["since"] or None,
        "until": form["until"] or None,
        "root_id": form["root"] or None,
        "group_id": form["group"] or None,
        "order_by": form["order"] or "-id",
        "limit": limit,
        "after": after,
    }


def _back(path: str, done: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?done={done}", status_code=303)


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _attempts_limit(max_attempts: int) -> str:
    return "unlimited" if max_attempts >= 2**31 - 1 else str(max_attempts)


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


__all__ = ["Dashboard", "create_app"]
