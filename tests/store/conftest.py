"""A migrated store on every backend, with its writer running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from machines import Placement, store_rules

from opscore.store.database import open_database
from opscore.store.queries import Store
from opscore.store.writer import Writer


@pytest.fixture
def placement() -> Placement:
    return Placement()


@pytest.fixture
async def store(migrated_url: str, placement: Placement) -> AsyncIterator[Store]:
    database = open_database(migrated_url)
    writer = Writer(database)
    running = asyncio.create_task(writer.run(placement))
    yield Store(database, writer, store_rules())
    writer.close()
    await running
    await database.dispose()
