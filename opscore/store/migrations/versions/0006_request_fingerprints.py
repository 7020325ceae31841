"""Request fingerprints: a run started with a request_id keeps a digest of what was asked
(definition, input, pin), so a request_id reused for another request is refused.

Runs stored before this migration have none, and a repeat of their request_id is taken as the
same request (as it was when they were written).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this migration."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("request_fingerprint", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Revert this migration."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("request_fingerprint")
