"""J. Security (S39-S40): the jobs table as a code-execution boundary, and the dashboard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.faults.harness import Scenario, wait_until

pytestmark = pytest.mark.fault

XSS = "<img src=x onerror=alert(1)>"


class _Evil:
    """A dill payload that would touch a file when loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.scenario("S39")
def test_s39_rows_naming_forbidden_code_or_carrying_forged_payloads_never_run(scenario: Scenario, tmp_path):
    import dill

    from sqla_pq.serialization import sign

    sc = scenario
    canaries = {k: tmp_path / k for k in ("system", "unsigned", "wrong-key", "cli")}
    sc.execute("INSERT INTO pq_job (queue, task, args, kwargs) VALUES ('default', 'os.system', %(a)s, '{}')",
               a=f'["touch {canaries["system"]}"]')
    unsigned = dill.dumps(((_Evil(str(canaries["unsigned"])),), {}, None))
    sc.execute("INSERT INTO pq_job (queue, task, encoding, payload) VALUES "
               "('default', 'tests.faults.tasks.echo', 'dill', %(p)s)", p=unsigned)
    forged = dill.dumps(((_Evil(str(canaries["wrong-key"])),), {}, None))
    job_id = sc.scalar("SELECT nextval('pq_job_id_seq')")
    sc.execute("INSERT INTO pq_job (id, queue, task, encoding, payload, signature) VALUES "
               "(%(i)s, 'default', 'tests.faults.tasks.echo', 'dill', %(p)s, %(s)s)", i=job_id, p=forged,
               s=sign((b"not-the-key",), job_id, "tests.faults.tasks.echo", forged))
    env = sc.env(secret_key="the-real-key")
    w = sc.worker("default", label="w", env=env)
    wait_until(lambda: sc.scalar("SELECT count(*) FROM pq_job WHERE status = 'failed'") == 3, 30,
               message="the three rows to fail")
    errors = [r[0] for r in sc.rows("SELECT error FROM pq_job ORDER BY id")]
    cli = subprocess.run([sys.executable, "-m", "sqla_pq", "enqueue", "os.system", f"touch {canaries['cli']}"],
                         env=env, capture_output=True, text=True, timeout=60)
    status = subprocess.run([sys.executable, "-m", "sqla_pq", "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    sc.record(errors=[e[:80] for e in errors], cli_exit=cli.returncode,
              files_created=[k for k, p in canaries.items() if p.exists()])
    assert not [k for k, p in canaries.items() if p.exists()]
    assert "standard library" in errors[0] or "not allowed" in errors[0].lower(), errors[0]
    assert "unsigned" in errors[1].lower() or "signature" in errors[1].lower(), errors[1]
    assert "signature" in errors[2].lower(), errors[2]
    assert cli.returncode != 0 and "os.system" in (cli.stdout + cli.stderr)
    assert status.returncode == 0 and w.alive()
    sc.notes.append("without a secret key (SQLA_PQ_SECRET_KEY) dill payloads are loaded unsigned, as the "
                    "SPEC says; the boundary above needs the key")


@pytest.mark.scenario("S40")
def test_s40_the_dashboard_denies_by_default_wants_csrf_posts_and_escapes_everything(scenario: Scenario):
    webtest = pytest.importorskip("webtest")
    from sqla_pq.cli import build_parser
    from sqla_pq.dashboard import Dashboard, allow_all
    from tests.faults import tasks

    sc = scenario
    pages = ["/", "/jobs", "/jobs?state=failed", "/workers", "/schedules", "/flows", "/jobs/1"]
    actions = ["/jobs/1/requeue", "/jobs/1/cancel", "/jobs/1/delete", "/workers/stop", "/schedules/1/pause",
               "/queues/pause"]
    job = sc.pq.queue("evil").enqueue(tasks.echo, XSS, run_at="1h")
    sc.execute("UPDATE pq_job SET error = %(x)s WHERE id = %(j)s", x=XSS, j=job.id)
    denied = webtest.TestApp(Dashboard(sc.pq))
    codes = {p: denied.get(p, expect_errors=True).status_int for p in pages}
    codes.update({f"POST {a}": denied.post(a, {}, expect_errors=True).status_int for a in actions})
    app = webtest.TestApp(Dashboard(sc.pq, authorize=allow_all))
    get_on_action = {a: app.get(a, expect_errors=True).status_int for a in actions}
    no_token = app.post(f"/jobs/{job.id}/cancel", {}, expect_errors=True).status_int
    page = app.get(f"/jobs/{job.id}").text + app.get("/jobs").text
    host = build_parser().parse_args(["dashboard"]).host
    sc.record(denied_codes=sorted(set(codes.values())), get_on_action=sorted(set(get_on_action.values())),
              post_without_csrf=no_token, standalone_host=host)
    assert set(codes.values()) <= {401, 403}, codes
    assert set(get_on_action.values()) == {405}, get_on_action
    assert no_token == 403 and sc.pq.get_job(job.id).status == "queued"
    assert XSS not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert host == "127.0.0.1"
