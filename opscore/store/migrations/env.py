"""Alembic's entry point. Migrations run on a connection the caller opened (see
`opscore.store.migrate`), so the same code serves `opscore db upgrade`, start-up and the tests.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from opscore.store.tables import metadata


def run_migrations(connection: Connection) -> None:
    """Apply the migrations inside the caller's transaction."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_connection = context.config.attributes.get("connection")
if _connection is None:
    raise RuntimeError("run migrations with `opscore db upgrade`, which provides the connection")
run_migrations(_connection)
