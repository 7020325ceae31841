"""Initial schema: agents and their capabilities, workflow definitions, runs and tasks.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Frozen copies of the column types this revision creates (opscore.store.types may change later).
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this migration."""
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=200), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("max_concurrent_tasks", sa.Integer(), nullable=False),
        sa.Column("reported_state", sa.String(length=16), nullable=False),
        sa.Column("state_detail", sa.Text(), nullable=False),
        sa.Column("connected", sa.Boolean(), nullable=False),
        sa.Column("registered_at", TIMESTAMP, nullable=False),
        sa.Column("last_seen_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agents")),
    )
    op.create_table(
        "definitions",
        sa.Column("definition_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("tasks", JSON, nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("definition_id", name=op.f("pk_definitions")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_definitions_name_version")),
        sa.UniqueConstraint("request_id", name=op.f("uq_definitions_request_id")),
    )
    op.create_table(
        "agent_capabilities",
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("capability", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["agents.agent_id"],
            name=op.f("fk_agent_capabilities_agent_id_agents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("agent_id", "capability", name=op.f("pk_agent_capabilities")),
    )
    with op.batch_alter_table("agent_capabilities", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_agent_capabilities_capability"), ["capability"], unique=False
        )

    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("definition_id", sa.String(length=128), nullable=True),
        sa.Column("workflow_name", sa.String(length=200), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("input", JSON, nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["definition_id"],
            ["definitions.definition_id"],
            name=op.f("fk_runs_definition_id_definitions"),
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
        sa.UniqueConstraint("request_id", name=op.f("uq_runs_request_id")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_runs_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_runs_definition_id"), ["definition_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_runs_state"), ["state"], unique=False)

    op.create_table(
        "tasks",
        sa.Column("task_id", sa.String(length=128), nullable=False),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("capability", sa.String(length=200), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("depends_on", JSON, nullable=False),
        sa.Column("fallback", sa.String(length=200), nullable=False),
        sa.Column("timeout_ms", sa.Integer(), nullable=True),
        sa.Column("retry_policy", JSON, nullable=True),
        sa.Column("pinned_agent_id", sa.String(length=128), nullable=True),
        sa.Column("input", JSON, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=True),
        sa.Column("output", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("queued_at", TIMESTAMP, nullable=True),
        sa.Column("assigned_at", TIMESTAMP, nullable=True),
        sa.Column("deadline", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.run_id"],
            name=op.f("fk_tasks_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("run_id", "name", name=op.f("uq_tasks_run_id_name")),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tasks_agent_id_state"), ["agent_id", "state"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_tasks_state_deadline"), ["state", "deadline"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_tasks_state_queued_at"), ["state", "queued_at"], unique=False
        )


def downgrade() -> None:
    """Revert this migration."""
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tasks_state_queued_at"))
        batch_op.drop_index(batch_op.f("ix_tasks_state_deadline"))
        batch_op.drop_index(batch_op.f("ix_tasks_agent_id_state"))

    op.drop_table("tasks")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_state"))
        batch_op.drop_index(batch_op.f("ix_runs_definition_id"))
        batch_op.drop_index(batch_op.f("ix_runs_agent_id"))

    op.drop_table("runs")
    with op.batch_alter_table("agent_capabilities", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agent_capabilities_capability"))

    op.drop_table("agent_capabilities")
    op.drop_table("definitions")
    op.drop_table("agents")
