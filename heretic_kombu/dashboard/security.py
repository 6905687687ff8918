"""Who may use the dashboard, and the tokens that guard its forms.

Kept free of web-framework imports so that ``heretic dashboard`` can refuse an unsafe
bind (exit 2) before it needs the ``dashboard`` extra, and so the rules are testable on
their own:

- bound to a loopback address, the dashboard is open to the local machine and checks
  the ``Host`` header (a page elsewhere that rebinds its name to 127.0.0.1 cannot read
  it); bound anywhere else it needs a token or basic-auth credentials;
- a token is accepted as ``Authorization: Bearer <token>`` or through the login form,
  which sets a signed cookie; basic-auth credentials as ``Authorization: Basic``;
- the login form opens a session of this process: the cookie names it (signed), logout
  revokes it, and failed logins are throttled by client address;
- every POST must come from the dashboard's own origin (``Origin``, else ``Referer``,
  names this host and port; a request with neither is a script's, and is let through
  only with an ``Authorization`` header) and carry a CSRF token. Logged in, the token is
  derived from the session, so nobody without credentials can obtain one that works;
  otherwise it is a random value in a signed, HttpOnly, SameSite=Strict cookie that the
  form must repeat (double submit). Ports are not part of a "site": a page on another
  port of the same host is same-site, sends the cookies and may even set them, which is
  why the origin check and the session binding are both needed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
import urllib.parse

#: Cookie holding the CSRF token (double submit).
CSRF_COOKIE = "heretic_csrf"
#: Form field that repeats it.
CSRF_FIELD = "csrf_token"
#: Cookie set by the login form when a token is configured.
AUTH_COOKIE = "heretic_auth"
#: How long a login lasts, in seconds (a working day).
LOGIN_TTL = 12 * 3600
#: Failed logins one client address may make within THROTTLE_WINDOW seconds, and all
#: clients together (a guesser spread over many addresses), before logins are refused.
THROTTLE_PER_CLIENT, THROTTLE_OVERALL, THROTTLE_WINDOW = 5, 50, 300.0

_LOOPBACK_NAMES = ("localhost", "localhost.")


class BindRefused(ValueError):
    """The dashboard would be reachable from other machines with nobody to keep them out."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def parse_basic_auth(value: str | None) -> tuple[str, str] | None:
    """``"user:pass"`` as a pair; ``ValueError`` if either part is empty."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("--basic-auth must be USER:PASSWORD, both non-empty")
    return user, password


class Sessions:
    """The logins of one dashboard process: an id each, until it expires or logs out."""

    def __init__(self, ttl: float = LOGIN_TTL) -> None:
        self.ttl = ttl
        self._expires: dict[str, float] = {}
        self._lock = threading.Lock()

    def open(self, now: float | None = None) -> str:
        moment = time.time() if now is None else now
        session = secrets.token_urlsafe(24)
        with self._lock:
            self._expires = {key: at for key, at in self._expires.items() if at > moment}
            self._expires[session] = moment + self.ttl
        return session

    def alive(self, session: str, now: float | None = None) -> bool:
        with self._lock:
            expires = self._expires.get(session)
        return expires is not None and expires > (time.time() if now is None else now)

    def close(self, session: str) -> None:
        with self._lock:
            self._expires.pop(session, None)


class LoginThrottle:
    """Counts failed logins in a sliding window, per client address and overall."""

    def __init__(
        self,
        per_client: int = THROTTLE_PER_CLIENT,
        overall: int = THROTTLE_OVERALL,
        window: float = THROTTLE_WINDOW,
    ) -> None:
        self.per_client, self.overall, self.window = per_client, overall, window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def wait(self, client: str, now: float | None = None) -> float:
        """Seconds ``client`` must wait before it may try again (0: it may now)."""
        moment = time.monotonic() if now is None else now
        with self._lock:
            self._forget(moment)
            everyone = sorted(at for times in self._failures.values() for at in times)
            mine = self._failures.get(client, [])
        waits = [0.0]
        if len(mine) >= self.per_client:
            waits.append(mine[-self.per_client] + self.window - moment)
        if len(everyone) >= self.overall:
            waits.append(everyone[-self.overall] + self.window - moment)
        return max(waits)

    def failed(self, client: str, now: float | None = None) -> None:
        moment = time.monotonic() if now is None else now
        with self._lock:
            self._failures.setdefault(client, []).append(moment)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def _forget(self, moment: float) -> None:
        for client in list(self._failures):
            kept = [at for at in self._failures[client] if at > moment - self.window]
            if kept:
                self._failures[client] = kept
            else:
                del self._failures[client]


@dataclasses.dataclass(frozen=True)
class Access:
    """The credentials the dashboard accepts (none: local use only)."""

    token: str | None = None
    basic_auth: tuple[str, str] | None = None
    #: Signs the CSRF and login cookies; new for each process unless given.
    secret: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(32))
    sessions: Sessions = dataclasses.field(default_factory=Sessions, compare=False, repr=False)
    throttle: LoginThrottle = dataclasses.field(
        default_factory=LoginThrottle, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.strip():
            raise ValueError("the dashboard token must not be empty")

    @property
    def required(self) -> bool:
        """True when requests must prove who they are."""
        return self.token is not None or self.basic_auth is not None

    def check_bind(self, host: str) -> None:
        """Refuse to listen beyond this machine without credentials."""
        if not is_loopback(host) and not self.required:
            raise BindRefused(
                f"refusing to bind the dashboard to {host}: it would let anyone who can "
                "reach this machine read the job history and retry or cancel jobs. Set "
                "--token (HERETIC_DASHBOARD_TOKEN) or --basic-auth USER:PASSWORD "
                "(HERETIC_DASHBOARD_BASIC_AUTH), or bind to 127.0.0.1."
            )

    # -- requests ------------------------------------------------------------

    def authorization_ok(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries an accepted credential."""
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "bearer" and self.token is not None:
            return hmac.compare_digest(value.encode(), self.token.encode())
        if scheme == "basic" and self.basic_auth is not None:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            user, _, password = decoded.partition(":")
            expected_user, expected_password = self.basic_auth
            # Compare both, always: the time taken does not tell which one was wrong.
            same_user = hmac.compare_digest(user.encode(), expected_user.encode())
            same_password = hmac.compare_digest(password.encode(), expected_password.encode())
            return same_user and same_password
        return False

    def token_ok(self, value: str) -> bool:
        """Whether ``value`` (typed into the login form) is the token."""
        return self.token is not None and hmac.compare_digest(value.encode(), self.token.encode())

    # -- signed cookies ------------------------------------------------------------

    def sign(self, value: str) -> str:
        mac = hmac.new(self.secret, value.encode(), hashlib.sha256).hexdigest()
        return f"{value}.{mac}"

    def unsign(self, signed: str | None) -> str | None:
        """The value of a cookie this process signed, or ``None``."""
        if not signed or "." not in signed:
            return None
        value, _, mac = signed.rpartition(".")
        return value if hmac.compare_digest(self.sign(value), signed) else None

    def new_csrf(self) -> str:
        """A fresh signed CSRF token for a visitor without a session (cookie value and
        form value alike)."""
        return self.sign(secrets.token_urlsafe(24))

    def session_csrf(self, session: str) -> str:
        """The CSRF token of a logged-in session: derived from it, never handed out alone."""
        return hmac.new(self.secret, f"csrf-{session}".encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, cookie: str | None, submitted: str | None, session: str | None) -> bool:
        """Logged in: the form repeats the session's token. Otherwise double submit: the
        form repeats the cookie, and the cookie is ours."""
        if not submitted:
            return False
        if session is not None:
            return hmac.compare_digest(self.session_csrf(session).encode(), submitted.encode())
        if not cookie or self.unsign(cookie) is None:
            return False
        return hmac.compare_digest(cookie.encode(), submitted.encode())

    def login(self, now: float | None = None) -> str:
        """Open a session; the value of its login cookie (the session id, signed)."""
        return self.sign(f"session-{self.sessions.open(now)}")

    def session(self, cookie: str | None, now: float | None = None) -> str | None:
        """The live session a login cookie names, or ``None``."""
        value = self.unsign(cookie)
        if self.token is None or value is None or not value.startswith("session-"):
            return None
        session = value.removeprefix("session-")
        return session if self.sessions.alive(session, now) else None

    def logout(self, cookie: str | None) -> None:
        """Revoke the session a login cookie names: the cookie opens nothing any more."""
        value = self.unsign(cookie)
        if value is not None and value.startswith("session-"):
            self.sessions.close(value.removeprefix("session-"))


def same_origin(host: str | None, origin: str | None, referer: str | None) -> bool | None:
    """Whether a request came from a page of the dashboard at ``host`` (its ``Host``
    header): by ``Origin``, else by ``Referer``. ``None`` when it names neither (a script,
    not a browser: browsers send ``Origin`` with every POST)."""
    if origin == "null":
        return False  # a sandboxed frame, a file: page, a redirect: never one of ours
    source = origin or referer
    if not source:
        return None
    parts = urllib.parse.urlsplit(source)
    mine = urllib.parse.urlsplit(f"//{host or ''}")
    if parts.scheme not in ("http", "https") or not parts.hostname or not mine.hostname:
        return False
    default = 443 if parts.scheme == "https" else 80
    try:
        theirs = (parts.hostname.lower(), parts.port or default)
        own = (mine.hostname.lower(), mine.port or default)
    except ValueError:  # a port out of range or not a number
        return False
    return theirs == own


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


__all__ = [
    "AUTH_COOKIE",
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "Access",
    "BindRefused",
    "LoginThrottle",
    "Sessions",
    "is_loopback",
    "parse_basic_auth",
    "safe_next",
    "same_origin",
]
