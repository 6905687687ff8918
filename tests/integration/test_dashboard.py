"""The web dashboard: pages, actions, security and /metrics, on every backend.

Requests go through Starlette's TestClient to the same ASGI app `heretic dashboard`
serves; jobs run on real `heretic worker` processes. What is asserted is what a user
sees: the HTML of the pages (found by their element ids), the status codes, the
headers, and the rows the actions change.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import canvas_tasks as ct
import jobs_project
import pytest
from helpers import PROJECTS, wait_for, wait_queued
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from heretic_kombu import group, states
from heretic_kombu.dashboard import Access, create_app

TASK_LINK = re.compile(r'href="/jobs/([0-9a-f-]{36})"')
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def client(app):
    # A browser sends its page's origin with every POST; the dashboard refuses one without.
    with TestClient(
        create_app(app), base_url="http://127.0.0.1", headers={"Origin": "http://127.0.0.1"}
    ) as test_client:
        yield test_client


def results(html: str) -> list[str]:
    """The task ids listed in a search page's result table."""
    table = html.split('id="results"', 1)[1] if 'id="results"' in html else ""
    return TASK_LINK.findall(table.split("</table>", 1)[0])


def element(html: str, element_id: str) -> str:
    """The text inside the element with this id (the pages keep them flat)."""
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</', html, re.S)
    assert match, f"no #{element_id} on the page"
    return match.group(1)


def csrf_of(client: TestClient, url: str) -> str:
    """The CSRF token a page's forms carry."""
    return CSRF.search(client.get(url).text).group(1)


@pytest.fixture
def orders(app):
    """Twelve queued echo jobs with varied arguments and three adds (no worker)."""
    found = []
    for i in range(12):
        who = "bob@example.com" if i % 3 == 0 else f"user{i}@example.com"
        found.append(jobs_project.echo.apply_async(kwargs={"value": {"to": who, "n": i}}))
    for i in range(3):
        found.append(jobs_project.add.apply_async((i, 100 * i)))
    for result in found:
        wait_queued(app, result.id)
    return found


def test_search_filters_and_pagination(app, client, orders):
    by_task = client.get("/jobs", params={"task": "jobs_project.add"})
    assert by_task.status_code == 200
    assert sorted(results(by_task.text)) == sorted(r.id for r in orders[12:])
    bob = client.get("/jobs", params={"where": "kwargs.value.to=bob@example.com"})
    assert sorted(results(bob.text)) == sorted(orders[i].id for i in (0, 3, 6, 9))
    several = client.get(
        "/jobs", params={"where": "kwargs.value.n>=3\nkwargs.value.to=bob@example.com"}
    )
    assert sorted(results(several.text)) == sorted(orders[i].id for i in (3, 6, 9))
    contains = client.get("/jobs", params={"payload": '{"kwargs": {"value": {"n": 4}}}'})
    assert results(contains.text) == [orders[4].id]
    assert len(results(client.get("/jobs", params={"status": "queued", "limit": 50}).text)) == 15
    assert results(client.get("/jobs", params={"status": ["failed", "succeeded"]}).text) == []
    assert len(results(client.get("/jobs", params={"queue": app.settings.default_queue}).text))
    assert len(results(client.get("/jobs", params={"since": "1h"}).text)) == 15
    until = client.get("/jobs", params={"until": "1h"})
    assert results(until.text) == [] and 'id="no-results"' in until.text
    assert results(client.get("/jobs", params={"error_contains": "declined"}).text) == []
    # Pages of four, following the next-page links: every job once, newest first.
    seen, url = [], "/jobs?limit=4"
    while url:
        page = client.get(url.replace("&amp;", "&"))
        seen.extend(results(page.text))
        found = re.search(r'id="next-page" href="([^"]+)"', page.text)
        url = found.group(1) if found else None
    assert seen == [r.id for r in reversed(orders)]
    # Bad filters are a 400 that says what was wrong, never a server error.
    for params, says in [
        ({"where": "kwargs.x LIKE 1"}, "bad"),
        ({"since": "yesterday"}, "bad time"),
        ({"after": "zz"}, "bad cursor"),
        ({"payload": "{not json"}, "payload is not JSON"),
        ({"limit": "many"}, "limit must be a number"),
        ({"status": "lost"}, "unknown status"),
        ({"order": "name; DROP TABLE heretic_jobs"}, "bad order"),
    ]:
        bad = client.get("/jobs", params=params)
        assert bad.status_code == 400, params
        assert says in element(bad.text, "error"), (params, bad.text)
    # Injection strings are only ever values: nothing matches and the table is intact.
    for hostile in ("x' OR '1'='1", "'; DELETE FROM heretic_jobs; --"):
        page = client.get("/jobs", params={"task": hostile, "error_contains": hostile})
        assert page.status_code == 200 and results(page.text) == []
    assert app.jobs.count() == 15


def test_payload_is_escaped_and_headers_are_strict(app, client):
    hostile = "<script>alert('owned')</script>"
    job = jobs_project.echo.apply_async(kwargs={"value": hostile}, queue=app.settings.default_queue)
    wait_queued(app, job.id)
    for url in (f"/jobs/{job.id}", "/jobs?task=jobs_project.echo"):
        page = client.get(url)
        assert page.status_code == 200
        assert "<script>" not in page.text  # the pages have no script at all
    detail = client.get(f"/jobs/{job.id}")
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;" in element(detail.text, "payload")
    policy = detail.headers["content-security-policy"]
    assert "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert detail.headers["x-frame-options"] == "DENY"
    assert detail.headers["x-content-type-options"] == "nosniff"
    # The row id works as well as the task id; an unknown job is a 404 page.
    assert element(client.get(f"/jobs/{app.jobs.get(job.id).id}").text, "status") == "queued"
    missing = client.get("/jobs/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and "x-frame-options" in missing.headers


def test_detail_shows_attempts_traceback_and_lineage(app, client, start_worker):
    start_worker()
    failed = jobs_project.fail.delay("boom <b>bold</b>")
    with pytest.raises(ValueError):
        failed.get(timeout=30)
    steps = (jobs_project.add.s(1, 2) | jobs_project.add.s(3)).apply_async()
    assert steps.get(timeout=30) == 6
    members = group(jobs_project.add.s(i, i) for i in range(3)).apply_async()
    assert members.get(timeout=30) == [0, 2, 4]

    page = client.get(f"/jobs/{failed.id}").text
    assert element(page, "status") == "failed"
    assert "boom &lt;b&gt;bold&lt;/b&gt;" in element(page, "job-error")
    assert "ValueError" in element(page, "traceback")
    row = app.jobs.get(failed.id)
    logs = page.split('id="attempt-logs"', 1)[1].split("</ol>", 1)[0]
    assert len(row.attempt_logs) == logs.count("<li>") >= 1
    assert 'id="retry"' in page and 'id="cancel"' not in page

    first = steps.parent.id
    second = client.get(f"/jobs/{steps.id}").text
    assert element(second, "result").strip() == "6"
    lineage = second.split('id="lineage"', 1)[1]
    assert f'href="/jobs/{first}"' in lineage.split("</dl>", 1)[0]  # parent and root
    parent = client.get(f"/jobs/{first}").text
    assert f'href="/jobs/{steps.id}"' in parent.split('id="children"', 1)[1]

    member = members.results[0].id
    others = client.get(f"/jobs/{member}").text.split('id="group"', 1)[1].split("</ul>", 1)[0]
    assert sorted(TASK_LINK.findall(others)) == sorted(r.id for r in members.results[1:])


def test_actions_need_the_csrf_token_and_change_the_row(app, client, start_worker, tmp_path):
    queued = jobs_project.add.delay(2, 2)  # no worker yet: it stays queued
    wait_queued(app, queued.id)
    token = csrf_of(client, f"/jobs/{queued.id}")
    for data in ({}, {"csrf_token": "forged"}, {"csrf_token": token + "x"}):
        refused = client.post(f"/jobs/{queued.id}/cancel", data=data)
        assert refused.status_code == 403, data
        assert "CSRF" in refused.text
    # A token signed by another dashboard process is refused too.
    with TestClient(create_app(app), base_url="http://127.0.0.1") as other:
        foreign = csrf_of(other, f"/jobs/{queued.id}")
    client.cookies.set("heretic_csrf", foreign)
    refused = client.post(f"/jobs/{queued.id}/cancel", data={"csrf_token": foreign})
    assert refused.status_code == 403
    assert app.jobs.get(queued.id).status == states.QUEUED
    client.cookies.clear()

    token = csrf_of(client, f"/jobs/{queued.id}")
    done = client.post(f"/jobs/{queued.id}/cancel", data={"csrf_token": token})
    assert done.status_code == 200 and done.url.path == f"/jobs/{queued.id}"
    assert "Cancelled" in element(done.text, "notice")
    assert element(done.text, "status") == "revoked"
    assert app.jobs.get(queued.id).status == states.REVOKED
    again = client.post(f"/jobs/{queued.id}/cancel", data={"csrf_token": token})
    assert "Not cancelled" in element(again.text, "notice")

    start_worker()
    marker = tmp_path / "fixed"
    failed = ct.needs_file.delay(str(marker))
    with pytest.raises(FileNotFoundError):
        failed.get(timeout=30)
    assert client.post(f"/jobs/{failed.id}/retry", data={}).status_code == 403
    assert app.jobs.get(failed.id).status == states.FAILED
    marker.write_text("ok")
    retried = client.post(f"/jobs/{failed.id}/retry", data={"csrf_token": token})
    assert "Sent again" in element(retried.text, "notice")
    wait_for(lambda: failed.state == "SUCCESS", 30, "the retried job")
    row = app.jobs.get(failed.id)
    assert row.attempts == 2 and "retried by operator" in " ".join(row.attempt_logs)
    assert element(client.get(f"/jobs/{failed.id}").text, "status") == "succeeded"
    # The revoked add can be retried as well; a succeeded job cannot.
    client.post(f"/jobs/{queued.id}/retry", data={"csrf_token": token})
    assert queued.get(timeout=30) == 4
    refused = client.post(f"/jobs/{queued.id}/retry", data={"csrf_token": token})
    assert "Not retried" in element(refused.text, "notice")
    assert client.post("/jobs/nope/retry", data={"csrf_token": token}).status_code == 404


def test_dead_letters_list_show_and_replay(app, client, start_worker):
    worker = start_worker()
    lost = app.send_task("late.task", ["x"])  # no worker knows this task yet
    # The row is left as it is (issue 15, item 6); the message is dead-lettered.
    wait_for(lambda: len(app.jobs.dead_letters()) == 1, 30, "the dead-lettering")
    # Not run, not failed: still waiting for a worker that knows the task.
    assert app.jobs.get(lost.id).status in (states.PENDING, states.QUEUED)
    queue = app.settings.default_queue
    listing = client.get("/dead")
    assert listing.status_code == 200
    letters = listing.text.split('id="letters"', 1)[1].split("</table>", 1)[0]
    assert "late.task" in letters and lost.id in letters
    shown = client.get(f"/dead/{queue}/1")
    assert shown.status_code == 200 and "late.task" in element(shown.text, "headers")
    assert client.get(f"/dead/{queue}/9").status_code == 404
    assert client.get("/dead", params={"queue": "never-used"}).status_code == 404
    token = CSRF.search(listing.text).group(1)
    assert client.post(f"/dead/{queue}/replay", data={"which": lost.id}).status_code == 403
    # Deploy the task (a worker that knows it), then replay from the page.
    worker.terminate()
    start_worker("-A", "late_project")
    replayed = client.post(f"/dead/{queue}/replay", data={"which": lost.id, "csrf_token": token})
    assert "Replayed 1 dead letter(s)." in element(replayed.text, "notice")
    assert lost.get(timeout=30) == "late x"
    assert 'id="no-letters"' in client.get("/dead").text


def test_overview_and_metrics(app, client, start_worker):
    start_worker()
    assert jobs_project.add.delay(1, 1).get(timeout=30) == 2
    with pytest.raises(ValueError):
        jobs_project.fail.delay("no").get(timeout=30)
    waiting = jobs_project.add.apply_async((1, 2), countdown=3600)  # scheduled
    overview = client.get("/")
    assert overview.status_code == 200
    assert element(overview.text, "finished-total") == "2"
    assert element(overview.text, "failed-total") == "1"
    assert 'class="failed"' in overview.text.split('id="throughput"', 1)[1]
    counts = overview.text.split('id="task-counts"', 1)[1].split("</table>", 1)[0]
    assert "jobs_project.add" in counts and "jobs_project.fail" in counts
    queues = overview.text.split('id="queues"', 1)[1].split("</table>", 1)[0]
    assert app.settings.default_queue in queues
    workers = overview.text.split('id="workers"', 1)[1].split("</table>", 1)[0]
    assert "w1@" in workers

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    queue = app.settings.default_queue
    assert samples[("heretic_jobs", (("status", "succeeded"), ("task", "jobs_project.add")))] == 1
    assert samples[("heretic_jobs", (("status", "failed"), ("task", "jobs_project.fail")))] == 1
    assert samples[("heretic_jobs", (("status", "scheduled"), ("task", "jobs_project.add")))] == 1
    runtime = ("task", "jobs_project.add")
    assert samples[("heretic_job_runtime_seconds_count", (runtime,))] == 1
    assert samples[("heretic_job_runtime_seconds_bucket", (("le", "+Inf"), runtime))] == 1
    assert samples[("heretic_queue_jobs", (("queue", queue), ("status", "scheduled")))] == 1
    assert samples[("heretic_queue_ready_messages", (("queue", queue),))] == 0
    assert samples[("heretic_dead_letters", (("queue", queue),))] == 0
    assert samples[("heretic_workers_seen", ())] == 1
    assert samples[("heretic_broker_up", ())] == 1
    assert app.jobs.cancel(waiting.id)


def test_token_and_basic_auth_are_enforced(app):
    tokened = create_app(app, Access(token="s3cret-token"))
    with TestClient(
        tokened, base_url="http://dashboard.example", headers={"Origin": "http://dashboard.example"}
    ) as web:
        first = web.get("/jobs?task=x", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"].startswith("/login?next=")
        assert web.get("/metrics").status_code == 401
        assert web.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = web.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and "heretic_jobs" in ok.text
        login = web.get("/login")
        token = CSRF.search(login.text).group(1)
        wrong = web.post("/login", data={"csrf_token": token, "token": "guess"})
        assert wrong.status_code == 401 and "wrong token" in wrong.text
        assert web.post("/login", data={"token": "s3cret-token"}).status_code == 403  # no CSRF
        good = web.post(
            "/login", data={"csrf_token": token, "token": "s3cret-token", "next": "//evil.example"}
        )
        assert good.status_code == 200 and good.url.path == "/"
        assert web.get("/jobs").status_code == 200
        token = csrf_of(web, "/jobs")  # logged in, the forms carry the session's token
        web.post("/logout", data={"csrf_token": token})
        assert web.get("/jobs", follow_redirects=False).status_code == 303

    basic = create_app(app, Access(basic_auth=("ops", "pa:ss")))
    with TestClient(basic, base_url="http://10.1.2.3:5555") as web:
        refused = web.get("/")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith(
            "Basic"
        )
        assert web.get("/", auth=("ops", "wrong")).status_code == 401
        assert web.get("/", auth=("other", "pa:ss")).status_code == 401
        assert web.get("/", auth=("ops", "pa:ss")).status_code == 200
        job = jobs_project.add.delay(1, 1)
        # Basic auth is sent by the browser on its own: actions still need the CSRF token.
        assert web.post(f"/jobs/{job.id}/cancel", auth=("ops", "pa:ss")).status_code == 403
        wait_queued(app, job.id)

    # Without credentials only loopback names are answered (DNS rebinding).
    with TestClient(create_app(app), base_url="http://attacker.example") as web:
        assert web.get("/").status_code == 400
    with TestClient(create_app(app), base_url="http://localhost:5555") as web:
        assert web.get("/").status_code == 200


@pytest.mark.parametrize(
    "params",
    [
        {"since": "999999999w"},
        {"until": "9999-12-31T23:30-01:00"},
        {"where": "kwargs.n>1e400"},
        {"task": "add\x00"},
        {"root": "not-a-task-id"},
    ],
)
def test_hostile_search_filters_answer_400_with_the_reason(client, params):
    page = client.get("/jobs", params=params)
    assert page.status_code == 400
    assert element(page.text, "error").strip()


def test_posts_from_another_origin_are_refused(app, client):
    """A page on another port of the same host is same-site: it gets the cookies sent
    (and can set them), so only the origin tells it apart."""
    queued = jobs_project.add.delay(3, 4)
    wait_queued(app, queued.id)
    token = csrf_of(client, f"/jobs/{queued.id}")
    cancel = f"/jobs/{queued.id}/cancel"
    for headers in (
        {"Origin": "http://127.0.0.1:8081"},
        {"Origin": "http://localhost"},
        {"Origin": "https://127.0.0.1:8443"},
        {"Origin": "null"},
        {"Origin": "", "Referer": "http://127.0.0.1:8081/attack.html"},
        {"Origin": ""},  # neither: a script without credentials
    ):
        refused = client.post(cancel, data={"csrf_token": token}, headers=headers)
        assert refused.status_code == 403, headers
        assert "did not come from a page of this dashboard" in refused.text
    assert app.jobs.get(queued.id).status == states.QUEUED
    by_referer = client.post(
        cancel,
        data={"csrf_token": token},
        headers={"Origin": "", "Referer": f"http://127.0.0.1/jobs/{queued.id}"},
    )
    assert by_referer.status_code == 200
    assert app.jobs.get(queued.id).status == states.REVOKED


def test_login_sessions_bind_the_csrf_token_and_end_at_logout(app):
    queued = jobs_project.add.delay(5, 6)
    wait_queued(app, queued.id)
    origin = {"Origin": "http://127.0.0.1"}
    with TestClient(
        create_app(app, Access(token="s3cret-token")), base_url="http://127.0.0.1", headers=origin
    ) as web:
        # Anyone may load the login page and get a token with its cookie...
        anonymous = csrf_of(web, "/login")
        anonymous_cookie = web.cookies.get("heretic_csrf")
        web.post("/login", data={"csrf_token": anonymous, "token": "s3cret-token"})
        login_cookie = web.cookies.get("heretic_auth")
        # ...but logged in, only the session's own token acts.
        refused = web.post(f"/jobs/{queued.id}/cancel", data={"csrf_token": anonymous})
        assert refused.status_code == 403 and "CSRF" in refused.text
        assert web.cookies.get("heretic_csrf") == anonymous_cookie
        assert app.jobs.get(queued.id).status == states.QUEUED
        token = csrf_of(web, f"/jobs/{queued.id}")
        assert token != anonymous
        done = web.post(f"/jobs/{queued.id}/cancel", data={"csrf_token": token})
        assert "Cancelled" in element(done.text, "notice")

        web.post("/logout", data={"csrf_token": token})
        # The old cookie, replayed after logout, opens nothing.
        web.cookies.set("heretic_auth", login_cookie)
        assert web.get("/jobs", follow_redirects=False).status_code == 303
        after = web.post(f"/jobs/{queued.id}/retry", data={"csrf_token": token})
        assert after.status_code == 401


def test_failed_logins_are_throttled(app):
    origin = {"Origin": "http://127.0.0.1"}
    with TestClient(
        create_app(app, Access(token="s3cret-token")), base_url="http://127.0.0.1", headers=origin
    ) as web:
        token = csrf_of(web, "/login")
        for _ in range(5):
            wrong = web.post("/login", data={"csrf_token": token, "token": "guess"})
            assert wrong.status_code == 401
        # Even the right token waits now: a guesser cannot tell it found it.
        held = web.post("/login", data={"csrf_token": token, "token": "s3cret-token"})
        assert held.status_code == 429 and "too many failed logins" in held.text
        assert 0 < int(held.headers["retry-after"]) <= 300
        assert web.get("/jobs", follow_redirects=False).status_code == 303


def heretic(*args: str, env: dict[str, str] | None = None, code: str | None = None):
    environment = dict(os.environ, PYTHONPATH=str(PROJECTS), **(env or {}))
    command = (
        [sys.executable, "-m", "heretic_kombu.cli"]
        if code is None
        else [
            sys.executable,
            "-c",
            code,
        ]
    )
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=environment, timeout=60
    )


def test_cli_refuses_a_public_bind_without_credentials(backend):
    for args, env in [
        (["--host", "0.0.0.0"], {}),
        ([], {"HERETIC_DASHBOARD_HOST": "::"}),
        (["--host", "dashboard.example"], {}),
        (["--host", "0.0.0.0", "--basic-auth", "no-colon"], {}),
    ]:
        result = heretic("dashboard", "-A", "jobs_project", *args, env=env)
        assert result.returncode == 2, result.stderr
        assert "--token" in result.stderr or "USER:PASSWORD" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # The core imports without the extra; the command then names what to install.
    blocked = "import sys; sys.modules['starlette'] = sys.modules['uvicorn'] = None; "
    core = heretic(code=blocked + "import heretic_kombu, heretic_kombu.cli; print('ok')")
    assert core.stdout.strip() == "ok", core.stderr
    needs = heretic(
        "dashboard",
        "-A",
        "jobs_project",
        code=blocked + "from heretic_kombu.cli import main; sys.argv[0] = 'heretic'; main()",
    )
    assert needs.returncode == 1 and 'pip install "heretic-kombu[dashboard]"' in needs.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_a_public_bind_with_a_token(backend, tmp_path):
    port = free_port()
    log = tmp_path / "dashboard.log"
    env = dict(os.environ, PYTHONPATH=str(PROJECTS), HERETIC_DASHBOARD_TOKEN="t0ken-t0ken")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "heretic_kombu.cli", "dashboard", "-A", "jobs_project"]
            + ["--host", "0.0.0.0", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def status(headers: dict[str, str]) -> int | None:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                assert process.poll() is None, log.read_text()
                return None

        assert wait_for(lambda: status({}), 30, "the dashboard to listen") == 401
        assert status({"Authorization": "Bearer t0ken-t0ken"}) == 200
        basic = base64.b64encode(b"a:b").decode()
        assert status({"Authorization": f"Basic {basic}"}) == 401
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
