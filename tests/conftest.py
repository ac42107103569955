"""Test infrastructure: one PostgreSQL for the session, a fresh database per test.

With ``SQLA_PQ_TEST_URL`` set, tests use that server (they create and drop databases on it).
Otherwise they start a throwaway embedded PostgreSQL (pgserver) in a temporary folder.  Each
test that touches the database gets its own database, cloned from a migrated template, so
workers in other processes, NOTIFY and committed data never leak between tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import sessionmaker

ROOT = Path(__file__).resolve().parent.parent

# Fast heartbeats and leases for every PQ built in this process and in the workers it starts.
FAST = {
    "SQLA_PQ_HEARTBEAT": "0.5",
    "SQLA_PQ_LEASE": "2",
    "SQLA_PQ_RESCUE_INTERVAL": "0.5",
    "SQLA_PQ_WORKER_TTL": "30",
    "SQLA_PQ_PRUNE_INTERVAL": "1",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    # here, not in tests/faults/conftest.py: pytest reads options only from the first conftests
    parser.addoption("--full-faults", action="store_true", default=False,
                     help="run the fault-injection scenarios (tests/faults) at the plan's full sizes")


@pytest.fixture(scope="session", autouse=True)
def _fast_settings() -> Iterator[None]:
    old = {k: os.environ.get(k) for k in FAST}
    os.environ.update(FAST)
    os.environ.pop("DATABASE_URL", None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _admin(url: URL) -> sa.Engine:
    return sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT",
                            poolclass=sa.pool.NullPool)


@pytest.fixture(scope="session")
def server_url() -> Iterator[URL]:
    given = os.environ.get("SQLA_PQ_TEST_URL")
    if given:
        from sqla_pq.db import normalize_url

        yield normalize_url(given)
        return
    from sqla_pq import embedded

    tmp = tempfile.mkdtemp(prefix="sqla_pq_tests_")
    server = embedded.start(Path(tmp) / "pg", cleanup="delete")
    url = make_url(embedded.url_of(server))
    admin = _admin(url)
    with admin.connect() as c:  # a throwaway server: durability buys nothing here
        c.exec_driver_sql("ALTER SYSTEM SET fsync = off")
        c.exec_driver_sql("ALTER SYSTEM SET synchronous_commit = off")
        c.exec_driver_sql("ALTER SYSTEM SET full_page_writes = off")
        c.exec_driver_sql("SELECT pg_reload_conf()")
    admin.dispose()
    yield url
    shutil.rmtree(tmp, ignore_errors=True)


def _create_db(url: URL, name: str, template: str | None = None) -> URL:
    admin = _admin(url)
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        if template:
            c.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        else:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return url.set(database=name)


def _drop_db(url: URL, name: str) -> None:
    admin = _admin(url)
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


LEDGER_DDL = """
CREATE TABLE test_ledger (
    id bigserial PRIMARY KEY,
    job_id bigint,
    attempt int,
    pid int,
    tag text,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
CREATE TABLE test_users (id serial PRIMARY KEY, email text NOT NULL UNIQUE);
"""


@pytest.fixture(scope="session")
def template(server_url: URL) -> Iterator[str]:
    """A database migrated with sqla_pq's shipped revisions, plus the tests' ledger table."""
    from sqla_pq.migrations import upgrade

    name = f"sqla_pq_tpl_{os.getpid()}"
    url = _create_db(server_url, name)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    upgrade(engine)
    with engine.begin() as c:
        c.exec_driver_sql(LEDGER_DDL)
    engine.dispose()
    yield name
    _drop_db(server_url, name)


@pytest.fixture
def db_url(server_url: URL, template: str) -> Iterator[URL]:
    """A fresh, migrated database for this test."""
    name = f"sqla_pq_t_{uuid.uuid4().hex[:12]}"
    url = _create_db(server_url, name, template=template)
    yield url
    _drop_db(server_url, name)


@pytest.fixture
def empty_db_url(server_url: URL) -> Iterator[URL]:
    """A fresh database without sqla_pq's tables."""
    name = f"sqla_pq_e_{uuid.uuid4().hex[:12]}"
    url = _create_db(server_url, name)
    yield url
    _drop_db(server_url, name)


@pytest.fixture
def url_str(db_url: URL) -> str:
    return db_url.render_as_string(hide_password=False)


@pytest.fixture
def cli(url_str: str, capsys: pytest.CaptureFixture[str]):
    """``sqla-pq ARGS...`` on the test's database, in this process: (exit code, output)."""
    from sqla_pq.cli import main

    def run(*args: str) -> tuple[int, str]:
        code = main(["--url", url_str, *args])
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


@pytest.fixture
def engine(db_url: URL) -> Iterator[sa.Engine]:
    from sqla_pq.db import create_engine

    engine = create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def Session(engine: sa.Engine) -> sessionmaker:
    return sessionmaker(engine)


@pytest.fixture
def pq(Session: sessionmaker):
    from sqla_pq import PQ

    return PQ(Session)


@pytest.fixture
def worker_env(url_str: str) -> dict[str, str]:
    """Environment for worker processes started by a test."""
    env = dict(os.environ)
    env.update(FAST)
    env["DATABASE_URL"] = url_str
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env
