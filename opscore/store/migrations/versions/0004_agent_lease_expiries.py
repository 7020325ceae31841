"""Quarantine: each agent's task leases that expired in a row, and whether the server put it in
ERROR for them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this migration."""
    with op.batch_alter_table("agents") as batch_op:
        batch_op.add_column(
            sa.Column("lease_expiries", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("quarantined", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    """Revert this migration."""
    with op.batch_alter_table("agents") as batch_op:
        batch_op.drop_column("quarantined")
        batch_op.drop_column("lease_expiries")
