"""sqla_pq's alembic migrations, shipped inside the package so wheels carry them.

Three ways to run them:

* ``sqla-pq migrate`` (or ``PQ.migrate()``): standalone, with sqla_pq's own version table
  ``pq_alembic_version``;
* ``alembic upgrade head`` from the repository's top-level ``alembic/`` (for working on them);
* merged into your own alembic environment: add :data:`VERSION_LOCATION` to
  ``version_locations`` (with ``path_separator = space``), add ``sqla_pq.metadata`` to
  ``target_metadata``, and run ``alembic upgrade heads``.  See docs/alembic.md.

A database uses one mode or the other: the standalone mode records its revision in
``pq_alembic_version``, a merged environment in your ``alembic_version``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BRANCH = "sqla_pq"
"""The branch label of sqla_pq's revisions (``alembic upgrade sqla_pq@head``)."""

VERSION_LOCATION = "sqla_pq:migrations/versions"
"""What to add to ``version_locations`` in your alembic.ini."""

VERSION_TABLE = "pq_alembic_version"
"""The version table of the standalone mode."""

SCRIPT_LOCATION = str(Path(__file__).parent)

MIGRATION_LOCK = 7_170_413_870_275_137
"""Advisory lock key taken while migrating, so concurrent ``migrate`` runs queue up."""


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """For your env.py's ``context.configure(include_object=...)``: leave sqla_pq's tables to
    sqla_pq's migrations (autogenerate then neither drops nor re-creates them)."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    table_name = name if type_ == "table" else getattr(table, "name", "") or ""
    return not (table_name or "").startswith("pq_")


def config(url: Any = None, *, schema: str | None = None, connection: Any = None) -> Any:
    """An alembic Config for the standalone mode."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.set_main_option("version_locations", str(Path(SCRIPT_LOCATION) / "versions"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", str(url).replace("%", "%%"))
    cfg.attributes["schema"] = schema
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Any, revision: str = "heads", schema: str | None = None, sql: bool = False) -> None:
    """Upgrade the database behind ``engine`` (standalone mode)."""
    from alembic import command

    if sql:
        url = engine.url.render_as_string(hide_password=False)
        command.upgrade(config(url, schema=schema), revision, sql=True)
        return
    with engine.begin() as connection:
        command.upgrade(config(schema=schema, connection=connection), revision)


def downgrade(engine: Any, revision: str = "base", schema: str | None = None) -> None:
    from alembic import command

    with engine.begin() as connection:
        command.downgrade(config(schema=schema, connection=connection), revision)


def revision_schema() -> str | None:
    """Inside a revision: the schema sqla_pq is being installed into (the connection's
    ``schema_translate_map``, or with ``--sql`` the env's ``version_table_schema``), or None."""
    from alembic import op

    if op.get_context().as_sql:
        return op.get_context().opts.get("version_table_schema")
    options = op.get_bind().get_execution_options()
    return (options.get("schema_translate_map") or {}).get(None)


def known_revisions() -> set[str]:
    """The revision ids this package ships (read from the files: a worker checking its schema
    at start should not have to import alembic)."""
    import re

    pattern = re.compile(r"""^revision(?::[^=]*)?\s*=\s*['"]([^'"]+)['"]""", re.MULTILINE)
    found = set()
    for path in (Path(SCRIPT_LOCATION) / "versions").glob("*.py"):
        match = pattern.search(path.read_text(encoding="utf-8"))
        if match:
            found.add(match.group(1))
    return found


def check_compatible(connection: Any, schema: str | None = None) -> None:
    """Refuse to run against a database without sqla_pq's tables (SchemaMissing: run
    ``sqla-pq migrate``) or with a schema newer than this package knows (upgrade sqla_pq)."""
    from sqlalchemy import text

    from ..errors import ConfigurationError, SchemaMissing

    # One catalog query (the inspector takes three, compiled at every worker start).
    prefix = f'"{schema}".' if schema else ""
    exists = connection.execute(
        text("SELECT to_regclass(:job), to_regclass(:ours), to_regclass(:alembic)"),
        {"job": prefix + "pq_job", "ours": prefix + VERSION_TABLE,
         "alembic": prefix + "alembic_version"},
    ).one()
    if exists[0] is None:
        raise SchemaMissing()
    found: set[str] = set()
    for table, present in ((VERSION_TABLE, exists[1]), ("alembic_version", exists[2])):
        if present is not None:
            found |= {r[0] for r in connection.execute(text(f"SELECT version_num FROM {prefix}{table}"))}
    ours = {r for r in found if r.startswith(f"{BRANCH}_")}
    unknown = ours - known_revisions()
    if unknown:
        raise ConfigurationError(
            f"the database's sqla_pq schema is at revision {', '.join(sorted(unknown))}, newer than "
            "this installed sqla_pq knows: upgrade sqla_pq on this machine"
        )


def current(engine: Any, schema: str | None = None) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        ctx = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
        )
        heads = ctx.get_current_heads()
    return heads[0] if heads else None
