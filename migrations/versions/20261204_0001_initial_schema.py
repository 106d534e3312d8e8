"""Create projects, compose_specs, deployments and deployment_events.

Revision ID: 0001
Revises:
Create Date: 2026-12-04 19:49:40.596710
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('projects',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_projects')),
    sa.UniqueConstraint('name', name=op.f('uq_projects_name'))
    )
    op.create_table('compose_specs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('project_id', sa.Uuid(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('yaml', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_compose_specs_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_compose_specs')),
    sa.UniqueConstraint('project_id', 'checksum', name=op.f('uq_compose_specs_project_id_checksum'))
    )
    op.create_table('deployments',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('project_id', sa.Uuid(), nullable=False),
    sa.Column('spec_id', sa.Uuid(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('image_ref', sa.String(length=512), nullable=False),
    sa.Column('strategy', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'in_progress', 'succeeded', 'failed', 'rolled_back', 'cancelled', 'superseded', 'stopped')", name=op.f('ck_deployments_status')),
    sa.CheckConstraint("strategy IN ('recreate', 'rolling', 'blue-green')", name=op.f('ck_deployments_strategy')),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_deployments_project_id_projects'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['spec_id'], ['compose_specs.id'], name=op.f('fk_deployments_spec_id_compose_specs'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deployments')),
    sa.UniqueConstraint('project_id', 'version', name=op.f('uq_deployments_project_id_version'))
    )
    op.create_index('ix_deployments_project_id_created_at', 'deployments', ['project_id', 'created_at'], unique=False)
    op.create_index('ix_deployments_status', 'deployments', ['status'], unique=False)
    op.create_table('deployment_events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('deployment_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('clock_timestamp()'), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('duration_ms', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], name=op.f('fk_deployment_events_deployment_id_deployments'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deployment_events'))
    )
    op.create_index('ix_deployment_events_deployment_id_id', 'deployment_events', ['deployment_id', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_deployment_events_deployment_id_id', table_name='deployment_events')
    op.drop_table('deployment_events')
    op.drop_index('ix_deployments_status', table_name='deployments')
    op.drop_index('ix_deployments_project_id_created_at', table_name='deployments')
    op.drop_table('deployments')
    op.drop_table('compose_specs')
    op.drop_table('projects')
