"""The dashboard (reliability.md S40): deny by default, CSRF on every change, every field
escaped, payloads never loaded, mounted in Flask and Pyramid, and served alone on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
import webtest

from sqla_pq.cli import build_parser, main
from sqla_pq.dashboard import Dashboard, allow_all, data, flask_authorize, pyramid_authorize
from sqla_pq.dashboard.serve import (
    AccessRefused,
    ThreadingWSGIServer,
    access_from,
    build_app,
    is_loopback,
    make_wsgi_server,
)
from sqla_pq.testing import drain
from tests import tasks

XSS = "<img src=x onerror=alert(1)>"
PAGES = ["/", "/jobs", "/jobs?state=failed", "/workers", "/schedules", "/flows"]
ACTIONS = ["/jobs/1/requeue", "/jobs/1/cancel", "/jobs/1/delete", "/workers/stop",
           "/schedules/1/pause", "/schedules/1/resume", "/queues/pause", "/queues/resume"]


@pytest.fixture
def client(pq) -> webtest.TestApp:
    return webtest.TestApp(Dashboard(pq, authorize=allow_all))


def sql(engine: sa.Engine, statement: str, **params: Any) -> Any:
    with engine.begin() as c:
        result = c.exec_driver_sql(statement, params)
        return result.fetchall() if result.returns_rows else None


def press(page: webtest.TestResponse, action: str) -> webtest.TestResponse:
    """Submit the button form of ``page`` that posts to ``action``, as a browser would."""
    for form in page.forms.values():
        if form.action == action:
            return form.submit(status=303)
    raise AssertionError(f"no form posts to {action}: {[f.action for f in page.forms.values()]}")


def add_worker(engine: sa.Engine, worker_id: str = "w1.abc", name: str = "w1") -> None:
    sql(engine, "INSERT INTO pq_worker (id, name, hostname, pid, queues, isolation, state, "
                "expires_at) VALUES (%(id)s, %(name)s, 'host-1', 4242, ARRAY['default'], "
                "'thread', 'idle', now() + interval '1 hour')", id=worker_id, name=name)


# -- access ------------------------------------------------------------------------------------


def test_every_route_is_denied_until_an_authorization_hook_is_configured(pq):
    app = webtest.TestApp(Dashboard(pq))
    for path in [*PAGES, "/jobs/1", "/flows/1", "/nowhere"]:
        page = app.get(path, status=403)
        assert "authorize=" in page.text and "allow_all" in page.text
        assert "Set-Cookie" not in page.headers
    for path in ACTIONS:
        app.post(path, {"queue": "default"}, status=403)
        app.get(path, status=403)  # denied before the 405 could say anything


def test_a_hook_decides_from_the_environ_and_a_raising_hook_denies(pq):
    seen: list[str] = []

    def admins_only(environ: dict[str, Any]) -> bool:
        seen.append(environ["PATH_INFO"])
        return environ.get("HTTP_X_ROLE") == "admin"

    app = webtest.TestApp(Dashboard(pq, authorize=admins_only))
    assert "You may not" in app.get("/jobs", status=403).text
    assert "Overview" in app.get("/", headers={"X-Role": "admin"}).text
    assert seen == ["/jobs", "/"]

    def broken(environ: dict[str, Any]) -> bool:
        raise RuntimeError("the login service is down")

    webtest.TestApp(Dashboard(pq, authorize=broken)).get("/", status=403)


def test_pages_carry_security_headers_and_a_strict_csrf_cookie(client):
    page = client.get("/")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["Cache-Control"] == "no-store"
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith("sqla_pq_csrf=") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/;" in cookie
    assert "<script" not in page.text
    assert client.head("/").body == b""


# -- reading -----------------------------------------------------------------------------------


def test_jobs_are_listed_by_queue_and_state_with_paging(pq, engine):
    pq.enqueue(tasks.fail, "nope", queue="mail")
    drain(pq, queues=["mail"])
    for i in range(4):
        pq.enqueue(tasks.add, i, 1, queue="mail")
    pq.enqueue(tasks.add, 9, 9, queue="other")
    app = webtest.TestApp(Dashboard(pq, authorize=allow_all, page_size=2))

    overview = app.get("/")
    assert 'href="/jobs?queue=mail&amp;state=queued">4</a>' in overview.text
    assert 'href="/jobs?queue=mail&amp;state=failed">1</a>' in overview.text
    assert "ValueError: nope" in overview.text  # recent failures

    first = app.get("/jobs", {"queue": "mail", "state": "queued"})
    ids = [int(i) for i in re.findall(r'<td><a href="/jobs/(\d+)">', first.text)]
    assert ids == [5, 4] and "[3, 1]" in first.text
    older = first.click(linkid=None, href=r"before=4", index=0)
    assert [int(i) for i in re.findall(r'<td><a href="/jobs/(\d+)">', older.text)] == [3, 2]
    assert "older »" not in older.text and "« newest" in older.text
    failed = app.get("/jobs", {"state": "failed"})
    assert re.findall(r'<td><a href="/jobs/(\d+)">', failed.text) == ["1"]
    app.get("/jobs", {"before": "x"}, status=400)


def test_job_detail_shows_every_field_error_and_traceback(pq, client):
    job = pq.enqueue(tasks.fail, "it broke", queue="mail", client_id="welcome-1")
    drain(pq, queues=["mail"])
    page = client.get(f"/jobs/{job.id}")
    for column in sa.inspect(type(job)).columns:
        if column.key not in ("error", "traceback"):
            assert f"<th>{column.key}</th>" in page.text
    assert "welcome-1" in page.text and "ValueError: it broke" in page.text
    assert "Traceback (most recent call last)" in page.text
    client.get("/jobs/999999", status=404)
    client.get("/flows/999999", status=404)


def test_hostile_text_in_every_field_renders_escaped(pq, engine):
    flow = sql(engine, "INSERT INTO pq_flow (name, queue) VALUES (%(x)s, 'evil/q:1') RETURNING id",
               x=XSS)[0][0]
    job_id = sql(engine, "INSERT INTO pq_job (queue, task, args, kwargs, status, error, traceback, "
                         "client_id, worker_id, flow_id, finished_at) VALUES ('evil/q:1', %(x)s, "
                         "%(args)s, %(kwargs)s, 'failed', %(x)s, %(x)s, %(x)s, %(x)s, %(flow)s, "
                         "now()) RETURNING id",
                 x=XSS, args=json.dumps([XSS]), kwargs=json.dumps({XSS: XSS}), flow=flow)[0][0]
    add_worker(engine, worker_id=XSS, name=XSS)
    sql(engine, "INSERT INTO pq_schedule (task, key, queue, args, interval, next_run_at) VALUES "
                "(%(x)s, %(x)s, 'evil/q:1', %(args)s, 60, now())", x=XSS, args=json.dumps([XSS]))
    app = webtest.TestApp(Dashboard(pq, authorize=allow_all, title=XSS))
    paths = [*PAGES, f"/jobs/{job_id}", f"/flows/{flow}", "/jobs?queue=" + XSS,
             "/flows?name=" + XSS]
    for path in paths:
        text = app.get(path).text
        assert "<img" not in text, path
        assert "&lt;img" in text, path
    missing = app.get("/" + XSS, status=404).text
    assert "<img" not in missing and "&lt;img" in missing


def test_dill_arguments_are_shown_sealed_and_never_loaded(pq, engine, tmp_path):
    import dill

    canary = tmp_path / "dashboard-canary"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {canary}",))

    blob = dill.dumps(((Evil(),), {}, None))
    job_id = sql(engine, "INSERT INTO pq_job (queue, task, encoding, payload, result_payload, "
                         "status) VALUES ('default', 'tests.tasks.identity', 'dill', %(p)s, %(p)s, "
                         "'failed') RETURNING id", p=blob)[0][0]
    statements: list[str] = []
    sa.event.listen(pq.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *a: statements.append(statement))
    app = webtest.TestApp(Dashboard(pq, authorize=allow_all))
    for path in ["/", "/jobs", f"/jobs/{job_id}"]:
        assert f"⟨dill, {len(blob)} bytes⟩" in app.get(path).text
    assert not canary.exists()
    assert statements
    for statement in statements:  # payloads and signatures are only ever measured
        rest = re.sub(r"octet_length\([\w.\"]+\)", "", statement)
        assert not re.search(r"\.\"?(result_)?(payload|signature)\b", rest), statement


def test_workers_schedules_and_flows_pages(pq, engine, client):
    add_worker(engine)
    schedule = pq.schedule(tasks.nothing, run_every=60, key="tick")
    with pq.flow("default", name="nightly") as flow:
        flow.enqueue(tasks.add, 1, 1)
        flow.enqueue(tasks.add, 2, 2)
    workers = client.get("/workers").text
    assert "w1.abc" in workers and "host-1" in workers and 'action="/workers/stop"' in workers
    schedules = client.get("/schedules").text
    assert "tests.tasks.nothing [tick]" in schedules and "every 60s" in schedules
    assert f'action="/schedules/{schedule.id}/pause"' in schedules
    flows = client.get("/flows", {"name": "nightly"}).text
    assert f'href="/flows/{flow.id}"' in flows and "1 deferred, 1 queued" in flows
    detail = client.get(f"/flows/{flow.id}").text
    assert "pending" in detail and detail.count('<td><a href="/jobs/') == 2


def test_queries_run_read_only_with_a_statement_timeout(pq, monkeypatch):
    with data.reading(pq, 0.25) as session:
        assert session.execute(sa.text("SHOW statement_timeout")).scalar() == "250ms"
        assert session.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
    with pq.session() as session:  # SET LOCAL: gone with the transaction
        assert session.execute(sa.text("SHOW statement_timeout")).scalar() == "0"

    def slow(session: Any) -> list[Any]:
        session.execute(sa.text("SELECT pg_sleep(5)"))
        return []

    monkeypatch.setattr(data, "queues", slow)
    app = webtest.TestApp(Dashboard(pq, authorize=allow_all, statement_timeout=0.1))
    assert "statement_timeout" in app.get("/", status=503).text


# -- changing ----------------------------------------------------------------------------------


def test_actions_take_only_a_post_with_the_csrf_token(pq, client):
    job = pq.enqueue(tasks.add, 1, 1, run_at="1h")
    for path in ACTIONS:
        page = client.get(path, status=405)
        assert page.headers["Allow"] == "POST"
    client.post("/", status=405)
    token = client.get("/").html.find("input", {"name": "csrf_token"})["value"]
    url = f"/jobs/{job.id}/cancel"
    client.post(url, {}, status=403)
    client.post(url, {"csrf_token": "x" * 43}, status=403)
    client.post(url, {"csrf_token": token}, headers={"Sec-Fetch-Site": "cross-site"}, status=403)
    bare = webtest.TestApp(client.app)  # the right value, but no cookie: not a double submit
    bare.post(url, {"csrf_token": token}, status=403)
    assert pq.get_job(job.id).status == "queued"
    client.post(url, {"csrf_token": token}, status=303)
    assert pq.get_job(job.id).status == "cancelled"


def test_requeue_cancel_and_delete_change_the_job(pq, client):
    failed = pq.enqueue(tasks.fail, queue="mail")
    drain(pq, queues=["mail"])
    waiting = pq.enqueue(tasks.add, 1, 1, run_at="1h")
    doomed = pq.enqueue(tasks.add, 2, 2)

    answer = press(client.get(f"/jobs/{failed.id}"), f"/jobs/{failed.id}/requeue")
    assert answer.headers["Location"] == f"/jobs/{failed.id}"
    assert pq.get_job(failed.id).status == "queued"

    answer = press(client.get("/jobs"), f"/jobs/{waiting.id}/cancel")
    assert answer.headers["Location"] == "/jobs"
    cancelled = pq.get_job(waiting.id)
    assert cancelled.status == "cancelled" and "dashboard" in (cancelled.error or "")

    answer = press(client.get(f"/jobs/{doomed.id}"), f"/jobs/{doomed.id}/delete")
    assert answer.headers["Location"] == "/jobs?queue=default"
    assert doomed.id not in [j.id for j in pq.list_jobs(queue="default")]
    answer.follow()

    token = client.get("/").html.find("input", {"name": "csrf_token"})["value"]
    refused = client.post(f"/jobs/{waiting.id}/cancel", {"csrf_token": token}, status=409)
    assert "cannot cancel" in refused.text
    client.post("/jobs/999999/delete", {"csrf_token": token}, status=404)
    redirected = client.post(f"/jobs/{failed.id}/delete",
                             {"csrf_token": token, "next": "//evil.example/"}, status=303)
    assert redirected.headers["Location"] == "/jobs"


def test_stop_a_worker_and_switch_schedules_and_queues(pq, engine, client):
    add_worker(engine)
    schedule = pq.schedule(tasks.nothing, run_every=60)
    pq.enqueue(tasks.add, 1, 1, queue="mail")

    press(client.get("/workers"), "/workers/stop")
    assert sql(engine, "SELECT stop_requested FROM pq_worker WHERE id = 'w1.abc'") == [(True,)]
    assert 'action="/workers/stop"' not in client.get("/workers").text

    press(client.get("/schedules"), f"/schedules/{schedule.id}/pause")
    assert pq.get_schedule(schedule.id).active is False
    press(client.get("/schedules"), f"/schedules/{schedule.id}/resume")
    assert pq.get_schedule(schedule.id).active is True

    overview = client.get("/")
    press(overview, "/queues/pause")
    assert pq.paused_queues() == ["mail"]
    assert "paused" in client.get("/").text
    press(client.get("/"), "/queues/resume")
    assert pq.paused_queues() == []

    token = client.get("/").html.find("input", {"name": "csrf_token"})["value"]
    client.post("/workers/stop", {"csrf_token": token, "worker": "nobody"}, status=404)
    client.post("/queues/pause", {"csrf_token": token, "queue": XSS}, status=400)
    client.post("/schedules/999999/pause", {"csrf_token": token}, status=404)


# -- mounted -----------------------------------------------------------------------------------


def test_a_prefix_moves_the_dashboard_and_its_links(pq):
    app = webtest.TestApp(Dashboard(pq, authorize=allow_all, prefix="/ops/queue"))
    page = app.get("/ops/queue/")
    assert 'href="/ops/queue/jobs"' in page.text
    assert "Path=/ops/queue;" in page.headers["Set-Cookie"]
    app.get("/elsewhere", status=404)
    with pytest.raises(ValueError):
        Dashboard(pq, prefix="ops/")


def test_mounted_in_flask_behind_the_apps_login(url_str, engine):
    import flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from tests import flask_app

    app = flask_app.create_app(url_str, SECRET_KEY="test only")

    @app.post("/login")
    def login() -> str:
        flask.session["admin"] = True
        return "welcome"

    core = flask_app.pq.state(app).pq
    dashboard = Dashboard(core, authorize=flask_authorize(
        app, lambda: flask.session.get("admin") is True))
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/admin/pq": dashboard})  # type: ignore[method-assign]
    job = core.enqueue(tasks.add, 1, 1, run_at="1h")

    browser = webtest.TestApp(app)
    browser.get("/admin/pq/", status=403)
    browser.post("/login")
    page = browser.get("/admin/pq/jobs")
    assert 'href="/admin/pq/jobs/' in page.text and 'href="/admin/pq/workers"' in page.text
    answer = press(page, f"/admin/pq/jobs/{job.id}/cancel")
    assert answer.headers["Location"] == "/admin/pq/jobs"
    assert core.get_job(job.id).status == "cancelled"


def test_mounted_in_pyramid_behind_its_security_policy(url_str):
    from pyramid.config import Configurator
    from pyramid.security import Allowed, Denied
    from pyramid.wsgi import wsgiapp2

    from sqla_pq.pyramid import get_pq

    class HeaderPolicy:
        def identity(self, request: Any) -> str | None:
            return request.headers.get("X-User")

        def authenticated_userid(self, request: Any) -> str | None:
            return self.identity(request)

        def permits(self, request: Any, context: Any, permission: str) -> Any:
            if self.identity(request) == "admin" and permission == "pq.admin":
                return Allowed("admin")
            return Denied("not an admin")

        def remember(self, request: Any, userid: str, **kw: Any) -> list[Any]:
            return []

        def forget(self, request: Any, **kw: Any) -> list[Any]:
            return []

    with Configurator(settings={"sqla_pq.url": url_str}) as config:
        config.include("sqla_pq.pyramid")
        config.set_security_policy(HeaderPolicy())
        core = get_pq(config.registry)
        dashboard = Dashboard(core, authorize=pyramid_authorize(
            lambda request: request.has_permission("pq.admin")))
        config.add_route("pq", "/pq/*subpath")
        config.add_view(wsgiapp2(dashboard), route_name="pq", require_csrf=False)
        wsgi = config.make_wsgi_app()
    job = core.enqueue(tasks.add, 1, 1, run_at="1h")

    webtest.TestApp(wsgi).get("/pq/", status=403)
    admin = webtest.TestApp(wsgi, extra_environ={"HTTP_X_USER": "admin"})
    page = admin.get(f"/pq/jobs/{job.id}")
    assert 'href="/pq/jobs"' in page.text and 'href="/pq/flows"' in page.text
    answer = press(page, f"/pq/jobs/{job.id}/cancel")
    assert urlsplit(answer.headers["Location"]).path == f"/pq/jobs/{job.id}"  # webob: absolute
    assert core.get_job(job.id).status == "cancelled"
    core.engine.dispose()


# -- served alone ------------------------------------------------------------------------------


def test_the_standalone_server_binds_to_loopback_and_asks_for_basic_credentials(pq, url_str):
    args = build_parser().parse_args(["--url", url_str, "dashboard"])
    assert (args.host, args.port, args.auth, args.no_auth) == ("127.0.0.1", 8321, None, False)
    server = make_wsgi_server(build_app(pq, access_from(args.host, "admin:s3cret")), args.host, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{host}:{port}/", timeout=5)
        assert refused.value.code == 401 and "Basic" in refused.value.headers["WWW-Authenticate"]
        for wrong in ("admin:nope", "root:s3cret"):
            request = urllib.request.Request(f"http://{host}:{port}/", headers={
                "Authorization": "Basic " + base64.b64encode(wrong.encode()).decode()})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(request, timeout=5)
        request = urllib.request.Request(f"http://{host}:{port}/jobs", headers={
            "Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()})
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 200 and b"<h1>Jobs</h1>" in reply.read()
    finally:
        server.shutdown()
        server.server_close()


def test_the_command_refuses_no_auth_off_loopback_and_serves_deny_by_default(
        url_str, monkeypatch, capsys):
    served: list[Any] = []
    monkeypatch.setattr(ThreadingWSGIServer, "serve_forever",
                        lambda self, *a, **kw: served.append((self.server_address,
                                                              self.get_app())))
    monkeypatch.delenv("SQLA_PQ_DASHBOARD_AUTH", raising=False)

    assert main(["--url", url_str, "dashboard", "--host", "0.0.0.0", "--no-auth"]) == 2
    assert "loopback" in capsys.readouterr().err and served == []

    assert main(["--url", url_str, "dashboard", "--port", "0"]) == 0
    (host, _port), app = served.pop()
    assert host == "127.0.0.1" and isinstance(app, Dashboard) and app.authorize is None
    assert "every page answers 403" in capsys.readouterr().err

    assert main(["--url", url_str, "dashboard", "--port", "0", "--no-auth"]) == 0
    assert served.pop()[1].authorize is allow_all

    with pytest.raises(AccessRefused):
        access_from("127.0.0.1", "no-colon")
    assert access_from("::1", None, no_auth=True).everyone
    assert access_from("0.0.0.0", None, environ={"SQLA_PQ_DASHBOARD_AUTH": "a:b"}).credentials \
        == ("a", "b")
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and not is_loopback("0.0.0.0")
    assert not is_loopback("example.org")
