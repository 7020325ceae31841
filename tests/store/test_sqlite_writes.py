"""How SQLite write transactions run: statements on the event loop, what waits on the writer
thread. The loop must never wait for SQLite's locks, and a commit that fails leaves nothing
behind and the writer connection usable."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from opscore.store import migrate
from opscore.store.database import SqliteDatabase, open_database
from opscore.store.tables import metadata

NOW = datetime(2026, 1, 2, tzinfo=UTC)
_definitions = metadata.tables["definitions"]
_tasks = metadata.tables["tasks"]


@pytest.fixture
async def database(sqlite_url: str) -> AsyncIterator[SqliteDatabase]:
    opened = open_database(sqlite_url)
    assert isinstance(opened, SqliteDatabase)
    await migrate.upgrade(opened)
    yield opened
    await opened.dispose()


def add_definition(definition_id: str) -> object:
    def work(conn: Connection) -> None:
        conn.execute(
            insert(_definitions),
            {
                "definition_id": definition_id,
                "name": definition_id,
                "version": 1,
                "description": "",
                "tasks": [],
                "request_id": None,
                "created_at": NOW,
            },
        )

    return work


def definition_ids(conn: Connection) -> list[str]:
    return list(conn.execute(select(_definitions.c.definition_id)).scalars())


async def test_a_write_waits_for_another_processes_lock_off_the_loop(
    database: SqliteDatabase, sqlite_url: str
) -> None:
    await database.run(add_definition("first"), write=True)  # the writer connection is open
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # as `opscore db upgrade` beside the server would
    try:
        write = asyncio.create_task(database.run(add_definition("second"), write=True))
        # Were the wait on the loop, these sleeps would not run until the lock gave out.
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not write.done()
    finally:
        other.execute("ROLLBACK")
        other.close()
    await asyncio.wait_for(write, 10)
    assert await database.run(definition_ids, write=False) == ["first", "second"]


async def test_a_commit_that_fails_writes_nothing_and_the_writer_goes_on(
    database: SqliteDatabase,
) -> None:
    def orphan_task(conn: Connection) -> None:
        # Checked only at COMMIT, which runs on the writer thread.
        conn.exec_driver_sql("PRAGMA defer_foreign_keys=ON")
        add_definition("lost")(conn)  # type: ignore[operator]
        conn.execute(
            insert(_tasks),
            {
                "task_id": "t",
                "run_id": "no-such-run",
                "position": 0,
                "name": "t",
                "capability": "c",
                "labels": {},
                "depends_on": [],
                "fallback": "",
                "timeout_ms": None,
                "retry_policy": None,
                "pinned_agent_id": None,
                "input": {},
                "state": "queued",
                "attempt": 0,
                "agent_id": None,
                "output": None,
                "error": "",
            },
        )

    with pytest.raises(IntegrityError):
        await database.run(orphan_task, write=True)
    await database.run(add_definition("kept"), write=True)
    assert await database.run(definition_ids, write=False) == ["kept"]
