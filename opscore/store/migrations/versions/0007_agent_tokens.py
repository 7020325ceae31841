"""Agent tokens: each agent keeps the digest of its current token (never the token).

Agents stored before this migration have none: their agents register again to get one.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this migration."""
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("token_digest", sa.String(length=64), nullable=True))
        batch.create_unique_constraint(batch.f("uq_agents_token_digest"), ["token_digest"])


def downgrade() -> None:
    """Revert this migration."""
    with op.batch_alter_table("agents") as batch:
        batch.drop_constraint(batch.f("uq_agents_token_digest"), type_="unique")
        batch.drop_column("token_digest")
