"""alembic env for sqla_pq's standalone mode (``sqla-pq migrate``) and the repository's
top-level ``alembic/`` folder."""

from __future__ import annotations

import os

from sqlalchemy import text

from alembic import context
from sqla_pq.db import create_engine, normalize_url
from sqla_pq.migrations import MIGRATION_LOCK, VERSION_TABLE
from sqla_pq.tables import metadata

config = context.config
schema = (
    config.attributes.get("schema")
    or config.get_main_option("sqla_pq_schema")
    or os.environ.get("SQLA_PQ_SCHEMA")
    or None
)


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit(
            "no database: set DATABASE_URL, or sqlalchemy.url in alembic.ini, or pass --url"
        )
    return normalize_url(url).render_as_string(hide_password=False)


def _configure(**kw: object) -> None:
    context.configure(
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        include_schemas=False,
        compare_type=True,
        **kw,
    )


def run_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection) -> None:  # type: ignore[no-untyped-def]
    # Two migrate runs at once: the second waits here (before alembic even looks for its
    # version table), then finds nothing to do.  The lock ends with the caller's transaction.
    connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
    if schema:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        connection = connection.execution_options(schema_translate_map={None: schema})
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
        if not context.is_offline_mode():
            # running workers check that they still understand the schema
            connection.execute(text("SELECT pg_notify('sqla_pq', '!migrated')"))


if context.is_offline_mode():
    run_offline()
else:
    given = config.attributes.get("connection")
    if given is not None:
        run_online(given)
    else:
        engine = create_engine(_url())
        with engine.begin() as conn:
            run_online(conn)
        engine.dispose()
