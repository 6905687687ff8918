"""Who may use the dashboard, and the tokens that guard its forms.

Kept free of web-framework imports so that ``heretic dashboard`` can refuse an unsafe
bind (exit 2) before it needs the ``dashboard`` extra, and so the rules are testable on
their own:

- bound to a loopback address, the dashboard is open to the local machine and checks
  the ``Host`` header (a page elsewhere that rebinds its name to 127.0.0.1 cannot read
  it); bound anywhere else it needs a token or basic-auth credentials;
- a token is accepted as ``Authorization: Bearer <token>`` or through the login form,
  which sets a signed cookie; basic-auth credentials as ``Authorization: Basic``;
- every POST carries a CSRF token: a random value in a signed, HttpOnly, SameSite=Strict
  cookie that the form must repeat (double submit). A page on another site can neither
  read the cookie nor forge the signature.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
import time

#: Cookie holding the CSRF token (double submit).
CSRF_COOKIE = "heretic_csrf"
#: Form field that repeats it.
CSRF_FIELD = "csrf_token"
#: Cookie set by the login form when a token is configured.
AUTH_COOKIE = "heretic_auth"
#: How long a login lasts, in seconds (a working day).
LOGIN_TTL = 12 * 3600

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


@dataclasses.dataclass(frozen=True)
class Access:
    """The credentials the dashboard accepts (none: local use only)."""

    token: str | None = None
    basic_auth: tuple[str, str] | None = None
    #: Signs the CSRF and login cookies; new for each process unless given.
    secret: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(32))

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
        """A fresh signed CSRF token (cookie value and form value alike)."""
        return self.sign(secrets.token_urlsafe(24))

    def csrf_ok(self, cookie: str | None, submitted: str | None) -> bool:
        """Double submit: the form repeats the cookie, and the cookie is ours."""
        if not cookie or not submitted or self.unsign(cookie) is None:
            return False
        return hmac.compare_digest(cookie.encode(), submitted.encode())

    def login_cookie(self, now: float | None = None) -> str:
        """The value of the login cookie: when it expires, signed."""
        expires = int((time.time() if now is None else now) + LOGIN_TTL)
        return self.sign(f"login-{expires}")

    def login_ok(self, cookie: str | None, now: float | None = None) -> bool:
        value = self.unsign(cookie)
        if self.token is None or value is None or not value.startswith("login-"):
            return False
        try:
            expires = int(value.removeprefix("login-"))
        except ValueError:
            return False
        return expires > (time.time() if now is None else now)


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
    "is_loopback",
    "parse_basic_auth",
    "safe_next",
]
