"""Add the force flag, the reused deployment of a no-op, and retention's pruning time; let retention drop specs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 22:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deployments", sa.Column("force", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("deployments", sa.Column("reused_from", sa.Uuid(), nullable=True))
    op.add_column("deployments", sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))
    op.create_foreign_key(
        op.f("fk_deployments_reused_from_deployments"),
        "deployments",
        "deployments",
        ["reused_from"],
        ["id"],
        ondelete="SET NULL",
    )
    op.alter_column("deployments", "spec_id", existing_type=sa.Uuid(), nullable=True)


def downgrade() -> None:
    pruned = op.get_bind().scalar(sa.text("SELECT count(*) FROM deployments WHERE spec_id IS NULL"))
    if pruned:
        raise RuntimeError(
            f"{pruned} deployment(s) lost their spec to retention and cannot satisfy NOT NULL again; "
            "downgrading would have to delete their history rows, so it stops here"
        )
    op.alter_column("deployments", "spec_id", existing_type=sa.Uuid(), nullable=False)
    op.drop_constraint(op.f("fk_deployments_reused_from_deployments"), "deployments", type_="foreignkey")
    op.drop_column("deployments", "pruned_at")
    op.drop_column("deployments", "reused_from")
    op.drop_column("deployments", "force")
