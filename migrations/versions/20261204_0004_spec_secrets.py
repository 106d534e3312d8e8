"""Create spec_secrets, the encrypted secret values of each Compose spec.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 22:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spec_secrets",
        sa.Column("spec_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=1024), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["spec_id"], ["compose_specs.id"], name=op.f("fk_spec_secrets_spec_id_compose_specs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("spec_id", "name", name=op.f("pk_spec_secrets")),
    )


def downgrade() -> None:
    op.drop_table("spec_secrets")
