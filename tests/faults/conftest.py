"""Fixtures of the fault-injection suite (``pytest -m fault``; full sizes with ``--full-faults``
or ``SQLA_PQ_FAULTS=full``).

- ``scenario``: a fresh migrated database on the session's server (``SQLA_PQ_TEST_URL`` or the
  embedded one), for scenarios that break processes, connections and clocks but not the server;
- ``own_scenario``: a fresh database on ``restartable_pg``, a PostgreSQL these tests own and
  may restart, crash, stop or make read-only;
- after each scenario, :meth:`Scenario.check_invariants`, and a JSON line with its measured
  figures appended to ``$SQLA_PQ_FAULT_REPORT`` when that is set.

Scenarios carry ``@pytest.mark.fault`` and ``@pytest.mark.scenario("Snn")``.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.faults.harness import Scenario, write_report
from tests.faults.pg import PgCluster, pg_bin_dir


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "scenario(code): the reliability plan's scenario (S01-S40)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--full-faults") or os.environ.get("SQLA_PQ_FAULTS") == "full":
        for item in items:  # the plan's sizes take minutes per scenario
            if item.get_closest_marker("fault") is not None:
                item.add_marker(pytest.mark.timeout(1800))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def full_faults(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--full-faults")) or os.environ.get("SQLA_PQ_FAULTS") == "full"


@pytest.fixture(scope="session")
def restartable_pg() -> Iterator[PgCluster]:
    """A PostgreSQL of our own (own port and data folder), with a migrated template database."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        pytest.skip("pgserver's PostgreSQL binaries are not installed (pip install pgserver)")
    cluster = PgCluster(bin_dir)
    cluster.init()
    cluster.start()
    from sqla_pq.migrations import upgrade

    with cluster.admin() as c:
        c.exec_driver_sql('CREATE DATABASE "fault_tpl"')
    engine = sa.create_engine(cluster.url("fault_tpl"), poolclass=sa.pool.NullPool)
    upgrade(engine)
    engine.dispose()
    try:
        yield cluster
    finally:
        cluster.destroy()


def _code(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("scenario")
    return marker.args[0] if marker else request.node.name


def _finish(request: pytest.FixtureRequest, sc: Scenario, began: float) -> None:
    call = getattr(request.node, "rep_call", None)
    xfail = request.node.get_closest_marker("xfail") is not None
    failed = call is None or call.failed or call.skipped
    try:
        invariants = sc.check_invariants()
    except Exception as exc:  # noqa: BLE001 - reported, then raised below unless xfail
        invariants = {"violations": [f"the invariant check itself failed: {exc!r}"]}
    line = {
        "scenario": sc.code,
        "test": request.node.name,
        "size": "full" if sc.full else "ci",
        "outcome": "xfailed" if (xfail and failed) else ("failed" if failed else "passed"),
        "wall_s": round(time.monotonic() - began, 2),
        "figures": sc.figures,
        "invariants": invariants,
        "notes": sc.notes,
    }
    write_report(line)
    if failed and call is not None and not call.skipped:
        # shown with the failure: what the workers said
        print(f"--- worker logs of {sc.code} ---\n{sc.logs()}")
        print(f"--- jobs ---\n{sc.rows('SELECT id, status, attempts, worker_id, error FROM pq_job ORDER BY id LIMIT 20')}")
    violations = invariants.get("violations") or []
    if violations and not (xfail and failed) and not (call is not None and call.skipped):
        raise AssertionError(f"{sc.code}: invariant violations after the scenario:\n  - "
                             + "\n  - ".join(violations) + "\n" + sc.logs())


@pytest.fixture
def scenario(request: pytest.FixtureRequest, db_url: sa.URL, full_faults: bool) -> Iterator[Scenario]:
    """A scenario on the session's (shared) server: its own fresh database."""
    began = time.monotonic()
    sc = Scenario(_code(request), request.node.nodeid, db_url, full=full_faults)
    try:
        yield sc
        _finish(request, sc, began)
    finally:
        sc.close()


@pytest.fixture
def tcp_scenario(request: pytest.FixtureRequest, db_url: sa.URL) -> Scenario:
    """A scenario whose server is reached over TCP, for scenarios that put a proxy in between:
    the shared server when it listens on TCP, else ``restartable_pg`` (the embedded pgserver
    listens on a unix socket only)."""
    if db_url.host and not db_url.host.startswith("/") and "host" not in db_url.query:
        return request.getfixturevalue("scenario")
    return request.getfixturevalue("own_scenario")


@pytest.fixture
def own_scenario(request: pytest.FixtureRequest, restartable_pg: PgCluster,
                 full_faults: bool) -> Iterator[Scenario]:
    """A scenario on ``restartable_pg``: a fresh database cloned from its migrated template."""
    began = time.monotonic()
    restartable_pg.ensure_running()
    name = f"fault_{uuid.uuid4().hex[:12]}"
    with restartable_pg.admin() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "fault_tpl"')
    sc = Scenario(_code(request), request.node.nodeid, restartable_pg.url(name), full=full_faults,
                  cluster=restartable_pg)
    try:
        yield sc
        _finish(request, sc, began)
    finally:
        sc.close()
        try:
            restartable_pg.ensure_running()
            with restartable_pg.admin() as c:
                c.exec_driver_sql("ALTER SYSTEM RESET ALL")
                c.exec_driver_sql("SELECT pg_reload_conf()")
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception:  # noqa: BLE001 - the next scenario gets a server anyway
            pass


@pytest.fixture
def faketime_available() -> None:
    from tests.faults.harness import faketime_lib

    if faketime_lib() is None:
        pytest.skip("libfaketime is not installed (Debian package faketime)")


@pytest.fixture
def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if not found:
        pytest.skip("pgbouncer is not installed (Debian package pgbouncer)")
    return found
