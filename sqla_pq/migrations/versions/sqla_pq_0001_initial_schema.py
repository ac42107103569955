"""sqla_pq's initial schema: jobs, dependencies, flows, workers, queues, schedules, ticks.

Revision ID: sqla_pq_0001
Revises:
Create Date: 2026-11-21 11:36:55.280577
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op
from sqla_pq.ddl import drop_notify_trigger, job_table_extras
from sqla_pq.migrations import revision_schema

revision: str = 'sqla_pq_0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ('sqla_pq',)
depends_on: str | Sequence[str] | None = None


JOB_ID_SEQ = sa.Sequence("pq_job_id_seq")


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(JOB_ID_SEQ))
    op.create_table('pq_flow',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('queue', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pq_flow'))
    )
    op.create_index('ix_pq_flow_name', 'pq_flow', ['name'], unique=False)
    op.create_table('pq_queue',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('paused', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_pq_queue'))
    )
    op.create_table('pq_schedule',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('task', sa.Text(), nullable=False),
    sa.Column('key', sa.String(length=255), server_default='', nullable=False),
    sa.Column('queue', sa.String(length=64), nullable=False),
    sa.Column('priority', sa.SmallInteger(), server_default=sa.text('50'), nullable=False),
    sa.Column('encoding', sa.String(length=16), server_default='json', nullable=False),
    sa.Column('args', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('kwargs', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('payload', sa.LargeBinary(), nullable=True),
    sa.Column('signature', sa.LargeBinary(), nullable=True),
    sa.Column('job_options', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('cron', sa.String(length=255), nullable=True),
    sa.Column('interval', sa.Double(), nullable=True),
    sa.Column('interval_relative', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('timezone', sa.String(length=64), nullable=True),
    sa.Column('between_start', sa.Time(), nullable=True),
    sa.Column('between_end', sa.Time(), nullable=True),
    sa.Column('weekdays', postgresql.ARRAY(sa.SmallInteger()), nullable=True),
    sa.Column('anchor_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('runs', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('repeats_left', sa.Integer(), nullable=True),
    sa.Column('until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_run_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('max_concurrent', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pq_schedule'))
    )
    op.create_index('ix_pq_schedule_due', 'pq_schedule', ['next_run_at'], unique=False, postgresql_where=sa.text('active'))
    op.create_index('uq_pq_schedule_task_key', 'pq_schedule', ['task', 'key'], unique=True)
    op.create_table('pq_worker',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('queues', postgresql.ARRAY(sa.Text()), nullable=True),
    sa.Column('isolation', sa.String(length=16), nullable=False),
    sa.Column('concurrency', sa.Integer(), server_default=sa.text('1'), nullable=False),
    sa.Column('state', sa.String(length=16), server_default='starting', nullable=False),
    sa.Column('current_job_id', sa.BigInteger(), nullable=True),
    sa.Column('jobs_done', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stop_requested', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('version', sa.String(length=32), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pq_worker'))
    )
    op.create_index('ix_pq_worker_expires', 'pq_worker', ['expires_at'], unique=False)
    op.create_table('pq_job',
    sa.Column('id', sa.BigInteger(), server_default=JOB_ID_SEQ.next_value(), nullable=False),
    sa.Column('queue', sa.String(length=64), nullable=False),
    sa.Column('task', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), server_default='queued', nullable=False),
    sa.Column('priority', sa.SmallInteger(), server_default=sa.text('50'), nullable=False),
    sa.Column('encoding', sa.String(length=16), server_default='json', nullable=False),
    sa.Column('args', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('kwargs', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('payload', sa.LargeBinary(), nullable=True),
    sa.Column('signature', sa.LargeBinary(), nullable=True),
    sa.Column('run_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expected_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('failures', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('max_retries', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('retry_policy', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('interruptions', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('max_interruptions', sa.SmallInteger(), server_default=sa.text('3'), nullable=False),
    sa.Column('timeout', sa.Double(), nullable=True),
    sa.Column('result_ttl', sa.Integer(), server_default=sa.text('500'), nullable=False),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('result_payload', sa.LargeBinary(), nullable=True),
    sa.Column('result_signature', sa.LargeBinary(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('traceback', sa.Text(), nullable=True),
    sa.Column('worker_id', sa.String(length=128), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('client_id', sa.String(length=255), nullable=True),
    sa.Column('serial', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('flow_id', sa.BigInteger(), nullable=True),
    sa.Column('waiting_on', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('has_dependants', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('on_parent_failure', sa.String(length=16), server_default='cancel', nullable=False),
    sa.Column('schedule_id', sa.BigInteger(), nullable=True),
    sa.Column('workspace', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('step', sa.SmallInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('meta', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.CheckConstraint("on_parent_failure IN ('cancel', 'fail')", name=op.f('ck_pq_job_on_parent_failure')),
    sa.CheckConstraint("status IN ('deferred', 'queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_pq_job_status')),
    sa.CheckConstraint('char_length(queue) BETWEEN 1 AND 64', name=op.f('ck_pq_job_queue_name')),
    sa.CheckConstraint('priority BETWEEN -32768 AND 32767', name=op.f('ck_pq_job_priority')),
    sa.ForeignKeyConstraint(['flow_id'], ['pq_flow.id'], name=op.f('fk_pq_job_flow_id_pq_flow'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['schedule_id'], ['pq_schedule.id'], name=op.f('fk_pq_job_schedule_id_pq_schedule'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pq_job'))
    )
    op.create_index('ix_pq_job_expires', 'pq_job', ['expires_at'], unique=False, postgresql_where=sa.text('expires_at IS NOT NULL'))
    op.create_index('ix_pq_job_failed', 'pq_job', ['finished_at'], unique=False, postgresql_where=sa.text("status = 'failed'"))
    op.create_index('ix_pq_job_flow', 'pq_job', ['flow_id'], unique=False, postgresql_where=sa.text('flow_id IS NOT NULL'))
    op.create_index('ix_pq_job_ready', 'pq_job', ['queue', sa.literal_column('priority DESC'), 'expected_at', 'run_at', 'id'], unique=False, postgresql_where=sa.text("status = 'queued'"))
    op.create_index('ix_pq_job_ready_any', 'pq_job', [sa.literal_column('priority DESC'), 'expected_at', 'run_at', 'id'], unique=False, postgresql_where=sa.text("status = 'queued' AND priority IS NOT NULL"))
    op.create_index('ix_pq_job_running', 'pq_job', ['worker_id'], unique=False, postgresql_where=sa.text("status = 'running'"))
    op.create_index('ix_pq_job_deferred', 'pq_job', ['id'], unique=False, postgresql_where=sa.text("status = 'deferred'"))
    op.create_index('ix_pq_job_schedule_active', 'pq_job', ['schedule_id'], unique=False, postgresql_where=sa.text("schedule_id IS NOT NULL AND status IN ('deferred', 'queued', 'running')"))
    op.create_index('uq_pq_job_client_id', 'pq_job', ['client_id'], unique=True, postgresql_where=sa.text('client_id IS NOT NULL'))
    op.create_index('uq_pq_job_serial_running', 'pq_job', ['queue'], unique=True, postgresql_where=sa.text("status = 'running' AND serial"))
    # The sequence belongs to the table; autovacuum settings for a queue table; the NOTIFY
    # trigger that wakes workers when the inserting transaction commits.
    schema = revision_schema()
    qualified = f'"{schema}".' if schema else ""
    op.execute(f"ALTER SEQUENCE {qualified}pq_job_id_seq OWNED BY {qualified}pq_job.id")
    for statement in job_table_extras(schema):
        op.execute(statement)
    op.create_table('pq_tick',
    sa.Column('schedule_id', sa.BigInteger(), nullable=False),
    sa.Column('tick_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('job_id', sa.BigInteger(), nullable=True),
    sa.Column('skipped', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['schedule_id'], ['pq_schedule.id'], name=op.f('fk_pq_tick_schedule_id_pq_schedule'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('schedule_id', 'tick_at', name=op.f('pk_pq_tick'))
    )
    op.create_table('pq_dependency',
    sa.Column('job_id', sa.BigInteger(), nullable=False),
    sa.Column('parent_id', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['pq_job.id'], name=op.f('fk_pq_dependency_job_id_pq_job'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'parent_id', name=op.f('pk_pq_dependency'))
    )
    op.create_index('ix_pq_dependency_parent', 'pq_dependency', ['parent_id'], unique=False)


def downgrade() -> None:
    for statement in drop_notify_trigger(revision_schema()):
        op.execute(statement)
    op.drop_index('ix_pq_dependency_parent', table_name='pq_dependency')
    op.drop_table('pq_dependency')
    op.drop_table('pq_tick')
    op.drop_index('uq_pq_job_serial_running', table_name='pq_job', postgresql_where=sa.text("status = 'running' AND serial"))
    op.drop_index('uq_pq_job_client_id', table_name='pq_job', postgresql_where=sa.text('client_id IS NOT NULL'))
    op.drop_index('ix_pq_job_schedule_active', table_name='pq_job', postgresql_where=sa.text("schedule_id IS NOT NULL AND status IN ('deferred', 'queued', 'running')"))
    op.drop_index('ix_pq_job_running', table_name='pq_job', postgresql_where=sa.text("status = 'running'"))
    op.drop_index('ix_pq_job_deferred', table_name='pq_job', postgresql_where=sa.text("status = 'deferred'"))
    op.drop_index('ix_pq_job_ready_any', table_name='pq_job', postgresql_where=sa.text("status = 'queued' AND priority IS NOT NULL"))
    op.drop_index('ix_pq_job_ready', table_name='pq_job', postgresql_where=sa.text("status = 'queued'"))
    op.drop_index('ix_pq_job_flow', table_name='pq_job', postgresql_where=sa.text('flow_id IS NOT NULL'))
    op.drop_index('ix_pq_job_failed', table_name='pq_job', postgresql_where=sa.text("status = 'failed'"))
    op.drop_index('ix_pq_job_expires', table_name='pq_job', postgresql_where=sa.text('expires_at IS NOT NULL'))
    op.drop_table('pq_job')
    op.drop_index('ix_pq_worker_expires', table_name='pq_worker')
    op.drop_table('pq_worker')
    op.drop_index('uq_pq_schedule_task_key', table_name='pq_schedule')
    op.drop_index('ix_pq_schedule_due', table_name='pq_schedule', postgresql_where=sa.text('active'))
    op.drop_table('pq_schedule')
    op.drop_table('pq_queue')
    op.drop_index('ix_pq_flow_name', table_name='pq_flow')
    op.drop_table('pq_flow')
    op.execute(sa.schema.DropSequence(JOB_ID_SEQ, if_exists=True))
