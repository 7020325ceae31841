"""A migrated store on every backend, with its writer running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from opscore.domain.retry import ResolvedRetryPolicy
from opscore.store import migrate
from opscore.store.database import open_database
from opscore.store.queries import Store
from opscore.store.writer import Writer


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    database = open_database(db_url)
    await migrate.upgrade(database)
    writer = Writer(database)
    running = asyncio.create_task(writer.run())
    yield Store(database, writer, ResolvedRetryPolicy(max_attempts=1))
    writer.close()
    await running
    await database.dispose()
