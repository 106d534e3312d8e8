"""Create proxy_routes, the desired Caddy route of each project.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 20:20:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "proxy_routes",
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("route_id", sa.String(length=128), nullable=False),
        sa.Column("hosts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("upstreams", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("deployment_id", sa.Uuid(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"], ["projects.id"], name=op.f("fk_proxy_routes_project_id_projects"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["deployment_id"],
            ["deployments.id"],
            name=op.f("fk_proxy_routes_deployment_id_deployments"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("project_id", name=op.f("pk_proxy_routes")),
        sa.UniqueConstraint("route_id", name=op.f("uq_proxy_routes_route_id")),
    )


def downgrade() -> None:
    op.drop_table("proxy_routes")
