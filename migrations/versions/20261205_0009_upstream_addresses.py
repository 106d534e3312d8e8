"""Add the sequence that numbers the loopback addresses of routed containers.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 01:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(sa.schema.CreateSequence(sa.Sequence("upstream_address_seq")))


def downgrade() -> None:
    op.execute(sa.schema.DropSequence(sa.Sequence("upstream_address_seq")))
