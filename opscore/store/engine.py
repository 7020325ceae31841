"""Opening the database: the one place where SQLite and PostgreSQL are set up differently."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from opscore.store.writer import WRITER_MARK

SQLITE_PRAGMAS = (
    # Readers never block the writer, and the writer never blocks readers.
    "PRAGMA journal_mode=WAL",
    # Every commit reaches the disk before it is acknowledged: an acknowledged write survives a
    # power cut, not only a crash of the process. Group commit makes the fsync per batch cheap.
    "PRAGMA synchronous=FULL",
    # Another process (`opscore db upgrade` beside a server) waits for the lock instead of failing.
    "PRAGMA busy_timeout=10000",
    "PRAGMA foreign_keys=ON",
)


def normalize_url(url: str) -> str:
    """Accept plain `sqlite:///` and `postgresql://` URLs and pick the async drivers for them."""
    for plain, asynchronous in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return asynchronous + url[len(plain) :]
    return url


def open_engine(url: str, **options: Any) -> AsyncEngine:
    """Create the async engine for `url`, with SQLite's durability and locking set-up applied."""
    engine = create_async_engine(normalize_url(url), **options)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    """Take transaction control away from the sqlite3 module, which would otherwise begin
    transactions only before DML (so reads of a write operation ran outside it), and begin them
    ourselves: IMMEDIATE for the writer (the write lock is taken up front, never upgraded
    mid-transaction), DEFERRED for readers (a consistent snapshot across their statements).
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get(WRITER_MARK) else "BEGIN")
