"""How SQLite write transactions run: statements on the event loop, what waits on the writer
thread. The loop must never wait for SQLite's locks, and a commit that fails leaves nothing
behind and the writer connection usable."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from table_rows import a_definition, a_task

from opscore.domain.errors import StorageFull
from opscore.domain.models import Effects
from opscore.store import checkpoints, migrate
from opscore.store.checkpoints import CHECKPOINT_EVERY
from opscore.store.database import open_database
from opscore.store.sqlite import SqliteDatabase
from opscore.store.tables import metadata
from opscore.store.writer import Batch, Followup, Tx, Writer

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


def add_definition(definition_id: str, description: str = "") -> Callable[[Connection], None]:
    def work(conn: Connection) -> None:
        conn.execute(insert(_definitions), a_definition(definition_id, NOW, description))

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


@pytest.mark.parametrize("alone", [False, True], ids=["on the thread", "alone, on the loop"])
async def test_a_commit_that_fails_writes_nothing_and_the_writer_goes_on(
    database: SqliteDatabase, alone: bool
) -> None:
    def orphan_task(conn: Connection) -> None:
        # Checked only at COMMIT.
        conn.exec_driver_sql("PRAGMA defer_foreign_keys=ON")
        add_definition("lost")(conn)  # type: ignore[operator]
        conn.execute(insert(_tasks), a_task("t", "no-such-run", 0))

    told: list[object] = []
    with pytest.raises(IntegrityError):
        await database.run(orphan_task, write=True, alone=alone, committed=told.append)
    assert told == []
    await database.run(add_definition("kept"), write=True, alone=alone, committed=told.append)
    assert told == [None]
    assert await database.run(definition_ids, write=False) == ["kept"]


async def test_a_commit_on_the_thread_is_told_a_turn_before_its_caller_resumes(
    database: SqliteDatabase,
) -> None:
    """`committed` runs in the loop's turn that learns of the commit; the caller wakes in the
    next one, so what `committed` releases (a batch's pushes and answers) goes first."""
    loop = asyncio.get_running_loop()
    order: list[str] = []

    def committed(value: object) -> None:
        order.append(f"committed {value}")
        loop.call_soon(order.append, "the turn after")

    def work(conn: Connection) -> str:
        add_definition("told")(conn)  # type: ignore[operator]
        return "its value"

    value = await database.run(work, write=True, committed=committed)
    order.append(f"the caller, with {value}")
    assert order == ["committed its value", "the turn after", "the caller, with its value"]


def definitions_in_database_file(sqlite_url: str) -> int:
    """The definitions a checkpoint has copied into the database file (not those in the WAL)."""
    path = sqlite_url.removeprefix("sqlite:///")
    direct = sqlite3.connect(f"file:{path}?immutable=1", uri=True)  # the file alone
    try:
        tables = direct.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if ("definitions",) not in tables.fetchall():
            return 0
        return int(direct.execute("SELECT count(*) FROM definitions").fetchone()[0])
    finally:
        direct.close()


def bulk(count: int, prefix: str) -> Callable[[Connection], None]:
    """A write of `count` definitions of about a kilobyte each, in one statement."""

    def work(conn: Connection) -> None:
        conn.execute(
            insert(_definitions),
            [a_definition(f"{prefix}{index}", NOW, "x" * 1000) for index in range(count)],
        )

    return work


async def test_the_wal_is_checkpointed_beside_the_writes(
    database: SqliteDatabase, sqlite_url: str
) -> None:
    for index in range(CHECKPOINT_EVERY - 2):  # the migration was one write already
        await database.run(add_definition(f"d{index}"), write=True)
    assert definitions_in_database_file(sqlite_url) == 0  # no commit checkpoints on its own
    await database.run(add_definition("last"), write=True)
    await database.checkpointed()
    assert definitions_in_database_file(sqlite_url) == CHECKPOINT_EVERY - 1


async def test_a_bulk_write_is_checkpointed_without_waiting_for_more_commits(
    database: SqliteDatabase, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROWS", 500)
    await database.run(bulk(400, "small"), write=True)
    await database.checkpointed()
    assert definitions_in_database_file(sqlite_url) == 0
    await database.run(bulk(200, "more"), write=True)
    await database.checkpointed()
    assert definitions_in_database_file(sqlite_url) == 600


async def test_the_wal_starts_over_while_writes_go_on(
    database: SqliteDatabase, sqlite_url: str
) -> None:
    """Under writes that never pause, the WAL is written again from its start after each
    checkpoint instead of growing without end (a checkpoint beside the writes never catches up
    with the last commit on its own)."""
    wal = sqlite_url.removeprefix("sqlite:///") + "-wal"

    def wal_size() -> int:
        return os.path.getsize(wal)

    for index in range(CHECKPOINT_EVERY):
        await database.run(add_definition(f"first{index}"), write=True)
    one_period = wal_size()
    for index in range(5 * CHECKPOINT_EVERY):
        await database.run(add_definition(f"d{index}"), write=True)
    assert wal_size() < 3 * one_period


async def test_after_a_burst_of_writes_another_checkpoint_goes_before_the_wal_starts_over(
    database: SqliteDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer copies the rest of the WAL itself (and so starts it over) after a checkpoint
    that followed light writes; after a burst, another checkpoint goes first (the writer's copy
    then held a batch for 23-33 ms)."""
    monkeypatch.setattr(checkpoints, "HEAVY_FRAMES", 50)

    await database.run(bulk(1000, "burst"), write=True)  # about 250 pages
    # As the writer's CHECKPOINT_EVERY-th commit would have it:
    database._checkpoints.start()
    await database.checkpointed()
    assert not database._checkpoints.restart_due()
    await database.checkpointed()  # the one that went first: little was written since
    assert database._checkpoints.restart_due()
    assert not database._checkpoints.restart_due()


async def test_a_batch_storage_refuses_fails_every_caller_at_once_and_the_writer_goes_on(
    database: SqliteDatabase,
) -> None:
    """A full disk (the writer's connection limited to the pages it has, which SQLite reports
    as it reports a full disk) refuses the whole batch: each caller gets the fault, no request
    is run again on its own, what the batch's hook placed is given back, and the next batch is
    written once there is room."""
    writer = Writer(database)
    ran: list[str] = []
    given_back: list[str] = []
    armed = False

    def place(batch: Batch, followups: list[Followup]) -> None:
        if not armed:
            return
        # As the dispatcher's placements are: registered, then written (here, too much).
        followups.append(Followup(Tx(batch), lambda: given_back.append("placed")))
        add_definition(f"placed{len(ran)}", "x" * 100_000)(batch.conn)

    running = asyncio.create_task(writer.run(place))

    def small(name: str) -> Callable[[Tx], None]:
        def write(tx: Tx) -> None:
            ran.append(name)
            tx.will_apply(Effects())
            add_definition(name)(tx.conn)

        return write

    def limit(pages: int | None) -> Callable[[Tx], None]:
        def write(tx: Tx) -> None:
            count = tx.conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            tx.conn.exec_driver_sql(f"PRAGMA max_page_count = {pages or count + 2}")

        return write

    try:
        await writer.submit(limit(None))
        armed = True
        refused = await asyncio.gather(
            *(writer.submit(small(name)) for name in ("a", "b", "c")), return_exceptions=True
        )
        assert all(isinstance(error, StorageFull) for error in refused), refused
        assert len({id(error) for error in refused}) == 3  # one of its own for each caller
        assert (ran, given_back) == (["a", "b", "c"], ["placed"])
        await writer.submit(limit(1 << 30))
        await writer.submit(small("d"))
    finally:
        writer.close()
        await running
    assert await database.run(definition_ids, write=False) == ["d", "placed4"]
