"""Partial task indexes: only queued and assigned tasks are indexed by when they were queued, by
their lease's end and by their agent; finished tasks leave those indexes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

QUEUED = "state = 'queued'"
ASSIGNED = "state = 'assigned'"


def _create_partial(name: str, columns: list[str], condition: str) -> None:
    op.create_index(
        name,
        "tasks",
        columns,
        sqlite_where=sa.text(condition),
        postgresql_where=sa.text(condition),
    )


def upgrade() -> None:
    """Apply this migration."""
    op.drop_index("ix_tasks_state_queued_at", table_name="tasks")
    op.drop_index("ix_tasks_state_deadline", table_name="tasks")
    op.drop_index("ix_tasks_agent_id_state", table_name="tasks")
    _create_partial("ix_tasks_queued", ["queued_at", "task_id"], QUEUED)
    _create_partial("ix_tasks_assigned_deadline", ["deadline"], ASSIGNED)
    _create_partial("ix_tasks_assigned_agent_id", ["agent_id"], ASSIGNED)


def downgrade() -> None:
    """Revert this migration."""
    op.drop_index("ix_tasks_assigned_agent_id", table_name="tasks")
    op.drop_index("ix_tasks_assigned_deadline", table_name="tasks")
    op.drop_index("ix_tasks_queued", table_name="tasks")
    op.create_index("ix_tasks_state_queued_at", "tasks", ["state", "queued_at"])
    op.create_index("ix_tasks_state_deadline", "tasks", ["state", "deadline"])
    op.create_index("ix_tasks_agent_id_state", "tasks", ["agent_id", "state"])
