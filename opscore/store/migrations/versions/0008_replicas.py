"""Replicas: the servers sharing one database, each under a lease, and the replica holding each
agent's stream.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)
_QUEUED = sa.text("state = 'queued'")


def upgrade() -> None:
    """Apply this migration."""
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(length=128), nullable=False),
        sa.Column("address", sa.String(length=300), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("renewed_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("replica_id", name=op.f("pk_replicas")),
    )
    op.create_index(op.f("ix_replicas_expires_at"), "replicas", ["expires_at"])
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("replica_id", sa.String(length=128), nullable=True))
        batch.add_column(
            sa.Column("stream_generation", sa.Integer(), server_default="0", nullable=False)
        )
    op.create_index(
        op.f("ix_tasks_queued_capability"),
        "tasks",
        ["capability", "queued_at", "task_id"],
        sqlite_where=_QUEUED,
        postgresql_where=_QUEUED,
    )


def downgrade() -> None:
    """Revert this migration."""
    op.drop_index(op.f("ix_tasks_queued_capability"), table_name="tasks")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("stream_generation")
        batch.drop_column("replica_id")
    op.drop_index(op.f("ix_replicas_expires_at"), table_name="replicas")
    op.drop_table("replicas")
