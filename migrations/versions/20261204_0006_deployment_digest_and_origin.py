"""Add the image digest, the requesting token and the rollback source to deployments.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 21:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deployments", sa.Column("image_digest", sa.String(length=512), nullable=True))
    op.add_column("deployments", sa.Column("requested_by", sa.String(length=100), nullable=True))
    op.add_column("deployments", sa.Column("rollback_of", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        op.f("fk_deployments_rollback_of_deployments"),
        "deployments",
        "deployments",
        ["rollback_of"],
        ["id"],
        ondelete="SET NULL",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("fk_deployments_rollback_of_deployments"), "deployments", type_="foreignkey")
    op.drop_column("deployments", "rollback_of")
    op.drop_column("deployments", "requested_by")
    op.drop_column("deployments", "image_digest")
