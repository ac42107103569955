"""DDL that SQLAlchemy's table model cannot express: the NOTIFY trigger on new jobs.

Used by the migration and by ``metadata.create_all`` alike.  Versioned names (``_v1``) let a
later migration add a ``_v2`` beside it.
"""

from __future__ import annotations

from .tables import JOB_STORAGE_PARAMETERS, NOTIFY_CHANNEL

NOTIFY_FUNCTION = "pq_notify_v1"
NOTIFY_TRIGGER = "pq_job_notify_v1"


def qualify(name: str, schema: str | None) -> str:
    return f'"{schema}".{name}' if schema else name


def create_notify_trigger(schema: str | None = None) -> list[str]:
    """One NOTIFY per queue per inserting statement (and PostgreSQL folds identical
    notifications of one transaction into one), delivered at commit; payload: the queue name."""
    fn = qualify(NOTIFY_FUNCTION, schema)
    table = qualify("pq_job", schema)
    return [
        f"""
        CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{NOTIFY_CHANNEL}', q.queue)
            FROM (SELECT DISTINCT queue FROM new_jobs WHERE status = 'queued') AS q;
            RETURN NULL;
        END
        $$
        """,
        f"""
        CREATE TRIGGER {NOTIFY_TRIGGER} AFTER INSERT ON {table}
        REFERENCING NEW TABLE AS new_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION {fn}()
        """,
    ]


def drop_notify_trigger(schema: str | None = None) -> list[str]:
    return [
        f"DROP TRIGGER IF EXISTS {NOTIFY_TRIGGER} ON {qualify('pq_job', schema)}",
        f"DROP FUNCTION IF EXISTS {qualify(NOTIFY_FUNCTION, schema)}()",
    ]


def job_table_extras(schema: str | None = None) -> list[str]:
    """Storage parameters of the job table, then its NOTIFY trigger."""
    return [
        f"ALTER TABLE {qualify('pq_job', schema)} SET ({JOB_STORAGE_PARAMETERS})",
        *create_notify_trigger(schema),
    ]
