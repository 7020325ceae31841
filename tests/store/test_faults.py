"""Which errors mean that storage cannot be used now: real errors of the real drivers, each
classified as a full disk, an unavailable or a lost database, or left alone as what it is."""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import POSTGRES_URL, postgres_database
from processes import free_port
from sqlalchemy import insert, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from table_rows import a_definition

from opscore.domain.errors import (
    NotFound,
    Resource,
    StorageFault,
    StorageFull,
    StorageLost,
    StorageUnavailable,
)
from opscore.domain.health import StorageHealth
from opscore.store import migrate
from opscore.store.database import open_database
from opscore.store.faults import classify
from opscore.store.tables import metadata

postgres_only = pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set")
_definitions = metadata.tables["definitions"]


def raised(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except Exception as error:  # noqa: BLE001 - the error is the subject
        return error
    raise AssertionError("nothing was raised")


def a_database(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE t (x)")
    return db


def test_a_full_sqlite_database_is_storage_full(tmp_path: Path) -> None:
    db = a_database(tmp_path / "full.db")
    page_count = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {page_count}")
    fault = classify(raised(lambda: db.execute("INSERT INTO t VALUES (zeroblob(100000))")))
    assert isinstance(fault, StorageFull)
    assert (fault.reason, fault.retry_after.total_seconds()) == ("STORAGE_FULL", 5.0)
    assert "full" in fault.cause


def test_a_read_only_or_locked_or_unopenable_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    a_database(path).close()
    read_only = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    impatient = sqlite3.connect(path, timeout=0, isolation_level=None)
    errors = [
        raised(lambda: read_only.execute("INSERT INTO t VALUES (1)")),
        raised(lambda: impatient.execute("BEGIN IMMEDIATE")),
        raised(lambda: sqlite3.connect(tmp_path / "no-such-dir" / "x.db")),
    ]
    holder.execute("ROLLBACK")
    faults = [classify(error) for error in errors]
    assert all(isinstance(fault, StorageUnavailable) for fault in faults), errors
    assert {fault.reason for fault in faults if fault is not None} == {"STORAGE_UNAVAILABLE"}


def test_a_file_that_is_not_a_database_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, " * 200)
    fault = classify(raised(lambda: sqlite3.connect(path).execute("SELECT * FROM t")))
    assert isinstance(fault, StorageLost)
    assert fault.reason == "STORAGE_LOST"


def test_errors_of_the_code_or_of_the_domain_are_left_alone(tmp_path: Path) -> None:
    db = a_database(tmp_path / "fine.db")
    assert classify(raised(lambda: db.execute("SELECT no_such_column FROM t"))) is None
    assert classify(NotFound(Resource.RUN, "r1")) is None
    assert classify(ValueError("a bug")) is None


def test_errors_of_the_system_are_full_or_unavailable() -> None:
    assert isinstance(classify(OSError(errno.ENOSPC, "No space left")), StorageFull)
    assert isinstance(classify(ConnectionRefusedError(errno.ECONNREFUSED, "refused")), StorageFault)
    assert isinstance(classify(TimeoutError()), StorageUnavailable)


def add_definition(name: str) -> Callable[[Connection], None]:
    def work(conn: Connection) -> None:
        conn.execute(insert(_definitions), a_definition(name, datetime.now(UTC)))

    return work


async def test_a_transaction_raises_the_fault_and_tells_health(db_url: str) -> None:
    """Through `Database.run`, on either backend: the wrapped driver error becomes the domain's
    fault (its cause without the statement's text), the tracker counts it, and an error of the
    code stays what it is without counting."""
    health = StorageHealth(1)
    database = open_database(db_url, health)
    await migrate.upgrade(database)
    try:
        await database.run(add_definition("d"), write=True)
        error = await _failing(database.run(add_definition("d"), write=True))
        assert isinstance(error, IntegrityError)
        assert health.healthy
        stopped = await _failing(database.run(_stop_database, write=True))
        assert isinstance(stopped, StorageUnavailable), stopped
        assert "[SQL:" not in stopped.cause
        assert isinstance(stopped.__cause__, Exception)
        assert not health.healthy
        await database.run(add_definition("e"), write=True)  # storage works again
        assert health.healthy
    finally:
        await database.dispose()


def _stop_database(conn: Connection) -> None:
    """An error that says storage cannot be used now, as each backend's driver raises it."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")  # writes: "attempt to write a readonly"
        try:
            add_definition("refused")(conn)
        finally:
            conn.exec_driver_sql("PRAGMA query_only = OFF")
    else:
        conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))


async def _failing(call: object) -> BaseException:
    try:
        await call  # type: ignore[misc]
    except Exception as error:  # noqa: BLE001 - the error is the subject
        return error
    raise AssertionError("nothing was raised")


@postgres_only
async def test_postgres_that_refuses_connections_is_unavailable_and_a_missing_one_lost() -> None:
    async with postgres_database() as url:
        parsed = make_url(url)
        nobody = parsed.set(host="127.0.0.1", port=free_port())
        missing = parsed.set(database=f"{parsed.database}_missing")
        found: list[StorageFault] = []
        for where in (nobody, missing):
            database = open_database(where.render_as_string(hide_password=False))
            try:
                error = await _failing(database.run(lambda conn: None, write=False))
            finally:
                await database.dispose()
            assert isinstance(error, StorageFault), error
            found.append(error)
    assert [type(fault) for fault in found] == [StorageUnavailable, StorageLost]
