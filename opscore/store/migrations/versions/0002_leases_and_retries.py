"""Leases and retries: a queued task's retry time and who recorded its error; a lost agent's
grace start.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# A frozen copy of the column type this revision creates.
TIMESTAMP = sa.DateTime(timezone=True)

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this migration."""
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.add_column(sa.Column("not_before", TIMESTAMP, nullable=True))
        batch_op.add_column(
            sa.Column("error_reported", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("agents") as batch_op:
        batch_op.add_column(sa.Column("disconnected_at", TIMESTAMP, nullable=True))
        batch_op.create_index(batch_op.f("ix_agents_disconnected_at"), ["disconnected_at"])


def downgrade() -> None:
    """Revert this migration."""
    with op.batch_alter_table("agents") as batch_op:
        batch_op.drop_index(batch_op.f("ix_agents_disconnected_at"))
        batch_op.drop_column("disconnected_at")
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.drop_column("error_reported")
        batch_op.drop_column("not_before")
