"""Indexes for listings of runs (by creation time and id, alone and after each filter) and of a
run's tasks (by position).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FILTERS = ("state", "definition_id", "agent_id", "workflow_name")
KEY = ["created_at", "run_id"]


def upgrade() -> None:
    """Apply this migration."""
    op.create_index("ix_runs_created_at_run_id", "runs", KEY)
    for column in FILTERS:
        op.create_index(f"ix_runs_{column}_created_at_run_id", "runs", [column, *KEY])
    # The indexes above lead with these columns, so they serve every look-up these did.
    for column in ("state", "definition_id", "agent_id"):
        op.drop_index(f"ix_runs_{column}", table_name="runs")
    op.create_index("ix_tasks_run_id_position", "tasks", ["run_id", "position"])


def downgrade() -> None:
    """Revert this migration."""
    op.drop_index("ix_tasks_run_id_position", table_name="tasks")
    for column in ("state", "definition_id", "agent_id"):
        op.create_index(f"ix_runs_{column}", "runs", [column])
    for column in FILTERS:
        op.drop_index(f"ix_runs_{column}_created_at_run_id", table_name="runs")
    op.drop_index("ix_runs_created_at_run_id", table_name="runs")
