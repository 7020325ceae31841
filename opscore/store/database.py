"""Where transactions run: the one place where SQLite and PostgreSQL are driven differently.

Every store operation is plain synchronous SQLAlchemy over a `Connection`, run whole inside one
transaction by `Database.run`. How that transaction reaches its database is the only thing that
differs between the backends:

- SQLite: the standard `sqlite3` driver, each transaction run start to finish on a thread (writes
  on one dedicated thread and connection, reads on a small pool), so a transaction of any size
  costs one hand-over between threads. An async driver that hands over once per statement
  (aiosqlite) measured here 0.8 ms a statement, against 0.05 ms for the statement itself: a
  store operation of eight statements would cost 6 ms, and no batching of commits could win
  that back.
- PostgreSQL: asyncpg on the event loop (no threads), each operation run through SQLAlchemy's
  greenlet bridge (`AsyncConnection.run_sync`); its statements are network round trips anyway.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

T = TypeVar("T")

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

WRITER_MARK = "opscore_writer"
"""Set in the writer connection's `info`: its transactions begin IMMEDIATE (see below)."""

READ_THREADS = 4
"""Threads (and so connections) serving SQLite reads at once."""


class Database(abc.ABC):
    """Runs store operations, each in one transaction (see the module docstring)."""

    dialect: str
    """`sqlite` or `postgresql`."""

    @abc.abstractmethod
    async def run(self, work: Callable[[Connection], T], *, write: bool) -> T:
        """Run `work` in one transaction, committed if it returns, rolled back if it raises.
        Writes must come from one caller at a time (the `Writer`)."""

    @abc.abstractmethod
    async def dispose(self) -> None:
        """Close every connection."""


def normalize_url(url: str) -> str:
    """Accept plain `sqlite:///` and `postgresql://` URLs and name the drivers used for them."""
    for plain, named in (
        ("sqlite+aiosqlite://", "sqlite+pysqlite://"),
        ("sqlite://", "sqlite+pysqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return named + url[len(plain) :]
    return url


def open_database(url: str) -> Database:
    """The Database for `url`: SQLite (a file path) or PostgreSQL."""
    normalized = normalize_url(url)
    if normalized.startswith("sqlite"):
        return SqliteDatabase(normalized)
    return PostgresDatabase(normalized)


class SqliteDatabase(Database):
    """SQLite, each transaction run whole on a thread (see the module docstring)."""

    dialect = "sqlite"

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, pool_size=READ_THREADS + 1, max_overflow=0)
        _configure_sqlite(self.engine)
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="opscore-sqlite-writer")
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="opscore-sqlite-reader")
        self._writer: Connection | None = None
        self._writer_lock = threading.Lock()

    async def run(self, work: Callable[[Connection], T], *, write: bool) -> T:
        """Run `work` on the writer thread or a reader thread."""
        loop = asyncio.get_running_loop()
        if write:
            return await loop.run_in_executor(self._writes, self._write, work)
        return await loop.run_in_executor(self._reads, self._read, work)

    def _write(self, work: Callable[[Connection], T]) -> T:
        with self._writer_lock:
            if self._writer is None:
                self._writer = self.engine.connect()
                self._writer.info[WRITER_MARK] = True
            with self._writer.begin():
                return work(self._writer)

    def _read(self, work: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn, conn.begin():
            return work(conn)

    async def dispose(self) -> None:
        """Close the writer's connection and the pool; stop the threads."""

        def close() -> None:
            with self._writer_lock:
                if self._writer is not None:
                    self._writer.info.pop(WRITER_MARK, None)
                    self._writer.close()
                    self._writer = None

        await asyncio.get_running_loop().run_in_executor(self._writes, close)
        self._writes.shutdown()
        self._reads.shutdown()
        self.engine.dispose()


class PostgresDatabase(Database):
    """PostgreSQL through asyncpg (see the module docstring)."""

    dialect = "postgresql"

    def __init__(self, url: str, **options: Any) -> None:
        self.engine: AsyncEngine = create_async_engine(url, **options)

    async def run(self, work: Callable[[Connection], T], *, write: bool) -> T:
        """Run `work` on a pooled connection through the greenlet bridge."""
        async with self.engine.connect() as conn, conn.begin():
            return await conn.run_sync(work)

    async def dispose(self) -> None:
        """Close the pool."""
        await self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    """Set the pragmas on every connection, and take transaction control away from the sqlite3
    module (which would begin transactions only before DML, so the reads of a write operation
    ran outside it): IMMEDIATE for the writer (the write lock is taken up front, never upgraded
    mid-transaction), DEFERRED for readers (a consistent snapshot across their statements)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Straight to the driver: a statement through SQLAlchemy costs more than BEGIN itself.
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None  # a connection that is beginning is open
        cursor = dbapi_connection.cursor()
        cursor.execute("BEGIN IMMEDIATE" if conn.info.get(WRITER_MARK) else "BEGIN")
        cursor.close()
