"""The dashboard's security rules on their own (heretic_kombu.dashboard.security)."""

from __future__ import annotations

import pytest

from heretic_kombu.dashboard.security import Access, LoginThrottle, Sessions, same_origin


@pytest.mark.parametrize(
    ("host", "origin", "referer", "expected"),
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000", None, True),
        ("127.0.0.1:8000", None, "http://127.0.0.1:8000/jobs/1", True),
        ("dash.example", "https://dash.example", None, True),  # behind TLS, default port
        ("dash.example:443", "https://dash.example", None, True),
        ("127.0.0.1:8000", "http://127.0.0.1:8001", None, False),  # another port: same site
        ("127.0.0.1:8000", "http://localhost:8000", None, False),
        ("127.0.0.1:8000", "null", "http://127.0.0.1:8000/", False),
        ("127.0.0.1:8000", "http://127.0.0.1:8001", "http://127.0.0.1:8000/", False),
        ("127.0.0.1:8000", "javascript:alert(1)", None, False),
        ("127.0.0.1:8000", "http://127.0.0.1:8000@evil.example", None, False),
        ("127.0.0.1:99999", "http://127.0.0.1:99999", None, False),  # no such port
        (None, "http://127.0.0.1:8000", None, False),
        ("127.0.0.1:8000", None, None, None),
        ("127.0.0.1:8000", "", "", None),
    ],
)
def test_same_origin(host, origin, referer, expected) -> None:
    assert same_origin(host, origin, referer) is expected


def test_a_session_ends_at_logout_and_at_expiry() -> None:
    access = Access(token="t0ken")
    cookie = access.login(now=1000.0)
    session = access.session(cookie, now=1001.0)
    assert session is not None
    assert access.session(cookie, now=1000.0 + 12 * 3600 + 1) is None  # expired
    assert access.session(cookie.replace("session-", "session-x"), now=1001.0) is None
    assert Access(token="t0ken").session(cookie, now=1001.0) is None  # another process
    access.logout(cookie)
    assert access.session(cookie, now=1001.0) is None


def test_the_csrf_token_of_a_session_is_its_own() -> None:
    access = Access(token="t0ken")
    first = access.sessions.open()
    second = access.sessions.open()
    token = access.session_csrf(first)
    assert access.csrf_ok(None, token, first)
    assert not access.csrf_ok(None, token, second)
    assert not access.csrf_ok(None, "", first)
    # An anonymous double-submit pair proves nothing for a session.
    anonymous = access.new_csrf()
    assert access.csrf_ok(anonymous, anonymous, None)
    assert not access.csrf_ok(anonymous, anonymous, first)


def test_sessions_forget_expired_ones() -> None:
    sessions = Sessions(ttl=10)
    old = sessions.open(now=0.0)
    sessions.open(now=20.0)
    assert not sessions.alive(old, now=5.0)  # dropped when the later one opened


def test_login_throttle_per_client_and_overall() -> None:
    throttle = LoginThrottle(per_client=3, overall=5, window=60)
    for moment in (0.0, 1.0, 2.0):
        assert throttle.wait("a", now=moment) == 0
        throttle.failed("a", now=moment)
    assert throttle.wait("a", now=3.0) == pytest.approx(57.0)
    assert throttle.wait("b", now=3.0) == 0  # another address may still try
    throttle.failed("b", now=4.0)
    throttle.failed("c", now=5.0)
    assert throttle.wait("d", now=6.0) == pytest.approx(54.0)  # five failures overall
    throttle.succeeded("a")
    assert throttle.wait("d", now=6.0) == 0
    throttle.failed("a", now=7.0)
    throttle.failed("a", now=8.0)
    throttle.failed("a", now=9.0)
    assert throttle.wait("a", now=10.0) == pytest.approx(57.0)
    assert throttle.wait("a", now=67.5) == 0  # its first failure left the window
