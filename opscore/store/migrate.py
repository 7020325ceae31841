"""Schema migrations (Alembic), run programmatically: `opscore db upgrade`, and at server start.

Alembic takes about a quarter of a second to import, a third of a server's start: a database
already at this build's revision (`HEAD`, read with one statement) is left alone without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from opscore.store.transactions import Database

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"

HEAD = "0008"
"""The revision of this build's last migration (a test checks it is Alembic's head)."""

_VERSION = text("SELECT version_num FROM alembic_version")


class MigrationRefused(Exception):
    """Alembic refused to migrate the database (a revision this build does not know, made by a
    later release)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration that needs no alembic.ini: the scripts ship inside the package."""
    from alembic.config import Config  # noqa: PLC0415 - see the module docstring

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    found: str | None = connection.execute(_VERSION).scalar_one_or_none()
    return found


async def revision_of(database: Database) -> str | None:
    """The database's revision (None on an empty database)."""
    return await database.run(_revision, write=False)


async def upgrade(database: Database, revision: str = "head") -> None:
    """Bring the database's schema to `revision` in one transaction."""
    if revision == "head" and await revision_of(database) == HEAD:
        return

    def run(connection: Connection) -> None:
        from alembic import command  # noqa: PLC0415 - see the module docstring
        from alembic.util.exc import CommandError  # noqa: PLC0415

        try:
            command.upgrade(alembic_config(connection), revision)
        except CommandError as error:
            raise MigrationRefused(str(error)) from error

    await database.run(run, write=True)
