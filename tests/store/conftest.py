"""A migrated store on every backend, with its writer running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from opscore.domain.retry import ResolvedRetryPolicy
from opscore.store import migrate
from opscore.store.engine import open_engine
from opscore.store.queries import Store
from opscore.store.writer import Writer


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    engine = open_engine(db_url)
    await migrate.upgrade(engine)
    writer = Writer(engine)
    running = asyncio.create_task(writer.run())
    yield Store(engine, writer, ResolvedRetryPolicy(max_attempts=1))
    writer.close()
    await running
    await engine.dispose()
