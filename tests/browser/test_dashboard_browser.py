"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright) against a ``heretic dashboard`` process started through the CLI, with a
real ``heretic worker`` running the jobs.

A person's path through it: the overview, a search with the CLI's filters, a failed
job's page, the Retry button, and the status turning to ``succeeded`` on the page (the
page of an unfinished job reloads itself). A screenshot of every page visited is
written to ``tests/browser/screenshots/<backend>/`` (git-ignored, kept after the run).

Without /usr/bin/chromium or the ``playwright`` package the test skips and says why;
with ``HERETIC_REQUIRE_SERVICES=1`` (CI) that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import canvas_tasks as ct
import jobs_project
import pytest
from helpers import PROJECTS, REQUIRE_SERVICES, wait_for, wait_queued

from heretic_kombu import states

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"


def _require_browser() -> None:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the playwright package is not installed (it is in the test dependency group)"
    if not CHROMIUM.exists():
        reason = f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium)"
    if reason is None:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (HERETIC_REQUIRE_SERVICES=1: a skip here is a failure)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _dashboard(tmp_path: Path, *options: str) -> Iterator[str]:
    """``heretic dashboard`` on a free loopback port, started as a user starts it."""
    port = _free_port()
    log = tmp_path / "dashboard.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECTS), env.get("PYTHONPATH")]))
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "heretic_kombu.cli", "dashboard", "-A", "jobs_project"]
            + ["--port", str(port), "-l", "warning", *options],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the dashboard exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/login" if options else f"{url}/", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        wait_for(answers, 30, f"the dashboard to answer (log: {log})")
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def dashboard_url(backend: Any, tmp_path: Path) -> Iterator[str]:
    with _dashboard(tmp_path) as url:
        yield url


def test_search_open_and_retry_a_failed_job_in_chromium(
    app: Any, backend: Any, start_worker: Any, dashboard_url: str, tmp_path: Path
) -> None:
    _require_browser()
    from playwright.sync_api import expect, sync_playwright

    start_worker()
    marker = tmp_path / "fixed"
    failed = ct.needs_file.delay(str(marker))
    done = [jobs_project.add.delay(i, i) for i in range(3)]
    hostile = "<script>alert('owned')</script>"
    mail = jobs_project.echo.apply_async(
        kwargs={"value": {"to": "bob@example.com", "note": hostile}}
    )
    app.send_task("late.task", ["x"])  # no worker knows it: a dead letter
    with pytest.raises(FileNotFoundError):
        failed.get(timeout=30)
    assert [r.get(timeout=30) for r in done] == [0, 2, 4]
    mail.get(timeout=30)
    # The row stays as it is (issue 15, item 6); the message goes to the dead letters.
    wait_for(lambda: len(app.jobs.dead_letters()) == 1, 30, "the dead letter")

    shots = SCREENSHOTS / backend.name
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    taken: list[Path] = []

    def screenshot(page: Any, name: str) -> None:
        path = shots / f"{len(taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        taken.append(path)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            dialogs: list[str] = []  # an alert would mean a payload ran as script
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            expect.set_options(timeout=15_000)

            page.goto(f"{dashboard_url}/")
            expect(page.locator("#task-counts")).to_contain_text(ct.needs_file.name)
            expect(page.locator("#workers")).to_contain_text("w1@")
            screenshot(page, "overview")

            # Search as a user does: the form, by task and status.
            page.click("nav >> text=Jobs")
            page.fill("input[name=task]", ct.needs_file.name)
            page.check("input[name=status][value=failed]")
            page.click("#search button[type=submit]")
            expect(page.locator("#results tbody tr")).to_have_count(1)
            screenshot(page, "search-failed")

            # Open it: failed, with its traceback and attempt log.
            page.click(f"#results a[href='/jobs/{failed.id}']")
            expect(page.locator("#status")).to_have_text("failed")
            expect(page.locator("#traceback")).to_contain_text("FileNotFoundError")
            expect(page.locator("#attempt-logs li")).to_have_count(1)
            screenshot(page, "job-failed")

            # Fix the cause, press Retry, and watch the status change on the page.
            marker.write_text("ok")
            page.click("#retry")
            expect(page.locator("#notice")).to_contain_text("Sent again")
            expect(page.locator("#status")).to_have_text("succeeded", timeout=30_000)
            expect(page.locator("#attempt-logs li")).to_have_count(3)  # fail, retried, ok
            screenshot(page, "job-retried")

            # A search on a value inside the arguments; the hostile payload is text.
            page.goto(f"{dashboard_url}/jobs")
            page.fill("textarea[name=where]", "kwargs.value.to=bob@example.com")
            page.click("#search button[type=submit]")
            expect(page.locator("#results tbody tr")).to_have_count(1)
            screenshot(page, "search-where")
            page.click(f"#results a[href='/jobs/{mail.id}']")
            expect(page.locator("#payload")).to_contain_text(hostile)
            screenshot(page, "job-escaped-payload")

            page.click("nav >> text=Dead letters")
            expect(page.locator("#letters")).to_contain_text("late.task")
            screenshot(page, "dead-letters")
            page.click("#letters tbody tr >> nth=0 >> a >> nth=0")
            expect(page.locator("#headers")).to_contain_text("late.task")
            expect(page.locator("#body")).to_contain_text('[["x"]')
            screenshot(page, "dead-letter")

            page.goto(f"{dashboard_url}/metrics")
            expect(page.locator("body")).to_contain_text("heretic_jobs{")
            screenshot(page, "metrics")
            assert dialogs == []
        finally:
            browser.close()
    assert app.jobs.get(failed.id).status == states.SUCCEEDED
    assert all(path.stat().st_size > 0 for path in taken) and len(taken) == 9


ATTACK_PAGE = """<!doctype html>
<title>cute cats</title>
<form id="f" method="post" action="{action}">
  <input type="hidden" name="csrf_token" value="{token}">
</form>
<script>
  // Cookies ignore ports: this page, on another port of the same host, sets the
  // dashboard's CSRF cookie to the pair its server fetched, then posts the form.
  document.cookie = "heretic_csrf={token}; path=/";
  document.getElementById("f").submit();
</script>
"""


def test_a_page_on_another_loopback_port_cannot_act_for_a_logged_in_user(
    app: Any, backend: Any, tmp_path: Path
) -> None:
    """The same-site attack: a page served on another port of 127.0.0.1 is same-site for
    the browser, so SameSite cookies go along and it may set cookies of its own."""
    _require_browser()
    import http.server
    import threading

    from playwright.sync_api import expect, sync_playwright

    victim = jobs_project.add.delay(20, 22)  # no worker: it stays queued
    wait_queued(app, victim.id)
    with _dashboard(tmp_path, "--token", "s3cret-token") as url:
        # The attacker's server asks for a token, as anyone may, without credentials.
        with urllib.request.urlopen(f"{url}/login", timeout=10) as response:
            stolen = re.search(r'name="csrf_token" value="([^"]+)"', response.read().decode())
        assert stolen is not None
        page_html = ATTACK_PAGE.format(action=f"{url}/jobs/{victim.id}/cancel", token=stolen[1])

        class Attacker(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                body = page_html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        shots = SCREENSHOTS / f"{backend.name}-attack"
        shutil.rmtree(shots, ignore_errors=True)
        shots.mkdir(parents=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 700})
                    expect.set_options(timeout=15_000)
                    page.goto(f"{url}/login")
                    page.fill("input[name=token]", "s3cret-token")
                    page.click("form[action='/login'] button[type=submit]")
                    expect(page.locator("#task-counts")).to_be_visible()  # logged in

                    attack = f"http://127.0.0.1:{server.server_address[1]}/cats.html"
                    with page.expect_response(f"{url}/jobs/{victim.id}/cancel") as answer:
                        page.goto(attack)
                    assert answer.value.status == 403
                    expect(page.locator("body")).to_contain_text(
                        "did not come from a page of this dashboard"
                    )
                    page.screenshot(path=str(shots / "01-cross-port-post-refused.png"))

                    # Still logged in; the job was not touched.
                    page.goto(f"{url}/jobs/{victim.id}")
                    expect(page.locator("#status")).to_have_text("queued")
                    page.screenshot(path=str(shots / "02-job-untouched.png"))
                finally:
                    browser.close()
        finally:
            server.shutdown()
            server.server_close()
    assert app.jobs.get(victim.id).status == states.QUEUED
