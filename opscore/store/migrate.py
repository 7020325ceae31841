"""Schema migrations (Alembic), run programmatically: `opscore db upgrade`, and at server start."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from opscore.store.transactions import Database

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration that needs no alembic.ini: the scripts ship inside the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def upgrade(database: Database, revision: str = "head") -> None:
    """Bring the database's schema to `revision` in one transaction."""

    def run(connection: Connection) -> None:
        command.upgrade(alembic_config(connection), revision)

    await database.run(run, write=True)


async def revisions(database: Database) -> tuple[str | None, str]:
    """The schema's revision (None on an empty database) and the one this build needs."""

    def run(connection: Connection) -> tuple[str | None, str]:
        current = MigrationContext.configure(connection).get_current_revision()
        head = ScriptDirectory.from_config(alembic_config(connection)).get_current_head()
        assert head is not None  # the package ships its migrations
        return current, head

    return await database.run(run, write=False)
