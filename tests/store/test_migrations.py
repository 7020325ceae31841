"""The migrations produce exactly the models' schema, on every backend, and can be undone."""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from opscore.store import migrate
from opscore.store.database import open_database
from opscore.store.tables import metadata


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrations_match_the_models(db_url: str) -> None:
    database = open_database(db_url)
    try:
        await migrate.upgrade(database)
        assert await database.run(_differences, write=False) == []
    finally:
        await database.dispose()


def test_head_is_the_last_migration() -> None:
    head = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    assert head == migrate.HEAD


async def test_upgrade_is_repeatable_and_downgrade_removes_everything(db_url: str) -> None:
    database = open_database(db_url)
    try:
        await migrate.upgrade(database)
        await migrate.upgrade(database)

        def downgrade(connection: Connection) -> list[str]:
            command.downgrade(migrate.alembic_config(connection), "base")
            return [t for t in inspect(connection).get_table_names() if t != "alembic_version"]

        assert await database.run(downgrade, write=True) == []
        await migrate.upgrade(database)
        assert await database.run(_differences, write=False) == []
    finally:
        await database.dispose()
