"""The shipped revisions: equal to the models, reversible, runnable three ways, in the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sqla_pq import migrations
from sqla_pq.models import metadata
from tests.conftest import ROOT
from tests.helpers import scalar

HEAD = "sqla_pq_0002"


def _diff(engine, schema=None):
    with engine.connect() as conn:
        if schema:  # reflect that schema as the default one
            conn.exec_driver_sql(f'SET search_path TO "{schema}"')
        ctx = MigrationContext.configure(conn, opts={
            "version_table": migrations.VERSION_TABLE, "compare_type": True,
            # the test databases also hold the tests' own tables
            "include_object": lambda obj, name, type_, *a: not migrations.include_object(obj, name, type_, *a),
        })
        return compare_metadata(ctx, metadata)


def test_the_migrated_schema_equals_the_models(engine):
    assert _diff(engine) == []


def test_migrating_down_and_up_again(empty_db_url):
    engine = sa.create_engine(empty_db_url)
    migrations.upgrade(engine)
    assert migrations.current(engine) == HEAD
    migrations.downgrade(engine, "base")
    assert migrations.current(engine) is None
    assert scalar(engine, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'pq\\_%%' AND tablename <> 'pq_alembic_version'") == 0
    assert scalar(engine, "SELECT count(*) FROM pg_proc WHERE proname = 'pq_notify_v1'") == 0
    migrations.upgrade(engine)
    assert _diff(engine) == []
    assert scalar(engine, "SELECT count(*) FROM pg_trigger WHERE tgname = 'pq_job_notify_v1'") == 1
    options = scalar(engine, "SELECT reloptions::text FROM pg_class WHERE relname = 'pq_job'")
    assert "autovacuum_vacuum_scale_factor=0.01" in options
    engine.dispose()


def _job_checks(engine, schema="public"):
    with engine.connect() as c:
        return dict(c.exec_driver_sql(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'c' "
            f"AND conrelid = '\"{schema}\".pq_job'::regclass").all())


def test_revision_0002_gives_the_job_table_the_models_cheaper_checks_and_0001s_back(empty_db_url):
    """Upgraded, the CHECKs are the models' own (as create_all writes them); downgraded to
    0001 they are 0001's again; and the cheaper rules refuse what the old ones refused."""
    engine = sa.create_engine(empty_db_url)
    migrations.upgrade(engine, "sqla_pq_0001")
    old = _job_checks(engine)
    assert "ck_pq_job_priority" in old and "ARRAY[" in old["ck_pq_job_status"]
    migrations.upgrade(engine)
    new = _job_checks(engine)
    with engine.begin() as c:
        c.exec_driver_sql('CREATE SCHEMA "from_models"')
        metadata.create_all(c.execution_options(schema_translate_map={None: "from_models"}))
    assert new == _job_checks(engine, "from_models")
    assert set(new) == {"ck_pq_job_status", "ck_pq_job_queue_name", "ck_pq_job_on_parent_failure"}
    assert all("ARRAY[" not in sql for sql in new.values())
    insert = ("INSERT INTO pq_job (queue, task, status, on_parent_failure, priority) "
              "VALUES (%s, 't', %s, %s, %s)")
    refused = [("", "queued", "cancel", 0, "ck_pq_job_queue_name"),
               ("q", "bogus", "cancel", 0, "ck_pq_job_status"),
               ("q", "queued", "ignore", 0, "ck_pq_job_on_parent_failure"),
               ("q", "queued", "cancel", 40000, "out of range"),
               ("q" * 65, "queued", "cancel", 0, "too long")]
    for *values, message in refused:
        with pytest.raises(sa.exc.DBAPIError, match=message), engine.begin() as c:
            c.exec_driver_sql(insert, tuple(values))
    with engine.begin() as c:
        c.exec_driver_sql(insert, ("q" * 64, "deferred", "fail", -32768))
    migrations.downgrade(engine, "sqla_pq_0001")
    assert _job_checks(engine) == old
    engine.dispose()


def test_a_configurable_schema(empty_db_url):
    from sqla_pq import PQ
    from sqla_pq.testing import work_one
    from tests import tasks

    pq = PQ(empty_db_url, schema="jobs")
    pq.migrate()
    assert _diff(pq.engine, "jobs") == []
    job = pq.enqueue(tasks.add, 1, 2)
    assert scalar(pq.engine, "SELECT count(*) FROM jobs.pq_job") == 1
    assert scalar(pq.engine, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'pq_job'") == 0
    assert work_one(pq)
    assert pq.get_job(job.id).return_value() == 3
    pq.engine.dispose()


def test_concurrent_migrations_queue_up(empty_db_url):
    """Three processes migrating one empty database at once: one creates, two wait and find
    nothing to do."""
    env = _env(empty_db_url)
    procs = [subprocess.Popen([sys.executable, "-m", "sqla_pq", "migrate"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    engine = sa.create_engine(empty_db_url)
    assert migrations.current(engine) == HEAD
    engine.dispose()


def _env(url) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = url.render_as_string(hide_password=False)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_alembic_upgrade_head_from_the_repository_folder(empty_db_url):
    subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT / "alembic",
                   env=_env(empty_db_url), check=True, capture_output=True)
    engine = sa.create_engine(empty_db_url)
    assert _diff(engine) == []
    engine.dispose()


def test_merged_into_a_users_alembic_environment(empty_db_url, tmp_path):
    """version_locations with sqla_pq's folder, target_metadata with its MetaData, upgrade heads."""
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    (tmp_path / "alembic.ini").write_text(textwrap.dedent("""
        [alembic]
        script_location = %(here)s/migrations
        path_separator = space
        version_locations = %(here)s/migrations/versions sqla_pq:migrations/versions
    """))
    (tmp_path / "myapp_models.py").write_text(textwrap.dedent("""
        import sqlalchemy as sa
        from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

        class Base(DeclarativeBase):
            pass

        class User(Base):
            __tablename__ = "users"
            id: Mapped[int] = mapped_column(primary_key=True)
            email: Mapped[str] = mapped_column(sa.String(200))
    """))
    (tmp_path / "migrations" / "env.py").write_text(textwrap.dedent("""
        import os
        from alembic import context
        import sqlalchemy as sa
        import sqla_pq
        from myapp_models import Base

        target_metadata = [Base.metadata, sqla_pq.metadata]
        engine = sa.create_engine(os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg2://", 1))
        with engine.begin() as connection:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
    """))
    (tmp_path / "migrations" / "script.py.mako").write_text(
        (ROOT / "sqla_pq" / "migrations" / "script.py.mako").read_text())
    (tmp_path / "migrations" / "versions" / "app_0001_users.py").write_text(textwrap.dedent("""
        import sqlalchemy as sa
        from alembic import op

        revision = "app_0001"
        down_revision = None
        branch_labels = ("myapp",)
        depends_on = None

        def upgrade():
            op.create_table("users", sa.Column("id", sa.Integer, primary_key=True),
                            sa.Column("email", sa.String(200), nullable=False))

        def downgrade():
            op.drop_table("users")
    """))
    env = _env(empty_db_url)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    run = lambda *a: subprocess.run([sys.executable, "-m", "alembic", *a], cwd=tmp_path,  # noqa: E731
                                    env=env, capture_output=True, text=True)
    result = run("heads")
    assert f"{HEAD} (sqla_pq)" in result.stdout and "app_0001 (myapp)" in result.stdout
    assert run("upgrade", "heads").returncode == 0
    engine = sa.create_engine(empty_db_url)
    assert scalar(engine, "SELECT count(*) FROM pg_tables WHERE tablename IN ('users', 'pq_job')") == 2
    with engine.connect() as c:
        versions = {r for (r,) in c.exec_driver_sql("SELECT version_num FROM alembic_version")}
    assert versions == {HEAD, "app_0001"}
    check = run("check")
    assert check.returncode == 0, check.stdout + check.stderr  # autogenerate proposes nothing
    engine.dispose()


@pytest.mark.slow
def test_the_wheel_carries_the_revisions_and_migrate_works_after_pip_install(empty_db_url, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("sqla_pq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sqla_pq/migrations/versions/sqla_pq_0001_initial_schema.py" in names
    assert "sqla_pq/migrations/env.py" in names and "sqla_pq/migrations/script.py.mako" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    subprocess.run([str(pip), "install", "--quiet", str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["DATABASE_URL"] = empty_db_url.render_as_string(hide_password=False)
    result = subprocess.run([str(venv / "bin" / "sqla-pq"), "migrate"], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    engine = sa.create_engine(empty_db_url)
    assert migrations.current(engine) == HEAD
    engine.dispose()
