"""SQLite transactions: writes on the event loop with their commits on a thread of their own.

Store operations run through the standard `sqlite3` driver. An async driver that hands over to a
thread once per statement (aiosqlite) costs many times the statement itself on every statement,
and no batching of commits could win that back. Reads run whole on a small pool of threads. A
write transaction's statements run on the event loop, on the one writer connection, and only
what waits goes to the writer thread: the commit (an fsync) and, when another process holds the
write lock, the wait for it. Statements are Python-bound, so on a thread they would hold the
interpreter lock all the same and add its hand-overs; the fsync is the only wait worth moving
off the loop, and the loop serves the requests that make up the next batch meanwhile (more
throughput than running the whole transaction on the thread: see the performance log). The WAL
is copied into the database file by a checkpointer of its own, never inside a commit, and then
written again from its start (see `checkpoints.py`).
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

from opscore.domain.health import StorageHealth
from opscore.store.checkpoints import WalCheckpoints, catch_up
from opscore.store.transactions import Committed, Database, Work

T = TypeVar("T")

SQLITE_PRAGMAS = (
    # Readers never block the writer, and the writer never blocks readers.
    "PRAGMA journal_mode=WAL",
    # Every commit reaches the disk before it is acknowledged: an acknowledged write survives a
    # power cut, not only a crash of the process. Group commit makes the fsync per batch cheap.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    # No commit copies the WAL into the database file as it goes: see checkpoints.py.
    "PRAGMA wal_autocheckpoint=0",
)

WRITER_MARK = "opscore_writer"
"""Set in the writer connection's `info`: its transactions begin IMMEDIATE (see below)."""

LOCK_WAIT_MS = 10_000
"""How long a transaction waits for a lock another process holds (an operator's `sqlite3` shell
beside a server, a reader's checkpoint) before failing: always on a thread, never on the event
loop."""


READ_THREADS = 4
"""Threads (and so connections) serving SQLite reads at once."""


class _WriterThread:
    """The thread the writer connection's waits run on, one call at a time: its commits, a
    wait for another process's lock, the copy that lets the WAL start over. A thread of its own
    rather than a one-thread executor: the executor's future (a concurrent future with its own
    lock, chained to one of the loop's) costs the loop much more a hand-over than a call
    answered through `call_soon_threadsafe`, and a write batch hands over its commit every
    time."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(
        self, work: Callable[[], T], then: Callable[[], None] | None = None
    ) -> asyncio.Future[T]:
        """Run `work` on the thread; a future of the loop's for its result. `then`, if `work`
        returns, runs on the loop just before the future is done (in the same turn, where the
        future's waiter wakes only in the next)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put(_Call(loop, future, work, then))
        return future

    def stop(self) -> None:
        """Let the calls already made finish, then end the thread."""
        self._calls.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                result = call.work()
            except BaseException as error:  # noqa: BLE001 - the caller receives it
                call.loop.call_soon_threadsafe(_settle, call.future, None, error, None)
            else:
                call.loop.call_soon_threadsafe(_settle, call.future, result, None, call.then)


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    work: Callable[[], T]
    then: Callable[[], None] | None


def _settle(
    future: asyncio.Future[T],
    result: T | None,
    error: BaseException | None,
    then: Callable[[], None] | None,
) -> None:
    try:
        if then is not None:
            then()
    finally:
        # Whatever `then` does, the waiter learns how the work went.
        if not future.done():  # else its waiter was cancelled: nobody wants the outcome
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]  # None only with an error


class SqliteDatabase(Database):
    """SQLite: writes on the loop with their commits on a thread, reads on threads (see the
    module docstring)."""

    dialect = "sqlite"

    def __init__(self, url: str, health: StorageHealth | None = None) -> None:
        self.health = StorageHealth() if health is None else health
        self.engine: Engine = create_engine(
            url,
            pool_size=READ_THREADS + 2,  # and the writer, and the checkpointer
            max_overflow=0,
            # The writer connection runs statements on the loop and commits on its thread (one
            # at a time: the writer awaits each commit before its next statement).
            connect_args={"check_same_thread": False},
        )
        _configure_sqlite(self.engine)
        self._writes = _WriterThread("opscore-sqlite-writer")
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="opscore-sqlite-reader")
        self._writer: Connection | None = None
        self._checkpoints = WalCheckpoints(self.engine)

    async def _run(self, work: Work[T], write: bool, alone: bool, committed: Committed[T]) -> T:
        """Run a write's statements on the loop and its commit on the writer thread, or on the
        loop too when it comes `alone`; a read whole on a reader thread."""
        loop = asyncio.get_running_loop()
        if not write:
            return await loop.run_in_executor(self._reads, self._read, work)
        conn = self._writer
        if conn is None:
            conn = self._writer = await self._writes.call(self._connect_writer)
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None  # the writer connection stays open
        if self._checkpoints.restart_due():
            await self._writes.call(functools.partial(catch_up, dbapi_connection))
        try:
            # The write lock, taken at once: it is free unless another process writes.
            dbapi_connection.execute("BEGIN IMMEDIATE")
        except self.engine.dialect.loaded_dbapi.OperationalError:
            await self._writes.call(functools.partial(_begin_waiting, dbapi_connection))
        transaction = conn.begin()  # SQLAlchemy's side of the transaction begun above
        try:
            value = work(conn)
        except BaseException:
            transaction.rollback()
            raise
        try:
            if alone:
                # Nothing else waits for the loop: blocking it for the fsync costs nothing, and
                # spares the hand-overs to the writer thread and back, which an idle virtual
                # CPU is slow to wake for.
                transaction.commit()
                if committed is not None:
                    committed(value)
            else:
                commit = self._writes.call(
                    transaction.commit,
                    None if committed is None else functools.partial(committed, value),
                )
                try:
                    # Shielded: once begun, a commit finishes on its thread whatever happens
                    # here, and the connection must not be touched until it has.
                    await asyncio.shield(commit)
                except asyncio.CancelledError:
                    await asyncio.wait([commit])
                    raise
        except Exception:
            conn.rollback()
            # A COMMIT that SQLite refuses (a deferred constraint) leaves its transaction open.
            if dbapi_connection.in_transaction:
                dbapi_connection.rollback()
            raise
        self._checkpoints.committed(dbapi_connection.total_changes)
        return value

    async def checkpointed(self) -> None:
        """Return once the checkpoint under way, if any, is done."""
        await self._checkpoints.checkpointed()

    def _connect_writer(self) -> Connection:
        conn = self.engine.connect()
        conn.info[WRITER_MARK] = True
        # Its BEGIN runs on the loop, which must never wait for a lock (see `run`).
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None  # just connected
        dbapi_connection.execute("PRAGMA busy_timeout=0")
        return conn

    def _read(self, work: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn, conn.begin():
            return work(conn)

    async def dispose(self) -> None:
        """Close the writer's connection and the pool; stop the threads."""

        def close() -> None:
            if self._writer is not None:
                self._writer.info.pop(WRITER_MARK, None)
                self._writer.close()
                self._writer = None

        await self.checkpointed()
        await self._writes.call(close)
        self._checkpoints.shutdown()
        self._writes.stop()
        self._reads.shutdown()
        self.engine.dispose()

    async def maintain(self) -> None:
        """Nothing to do beside the writes: SQLite plans a statement when it is prepared, and
        its checkpoints follow the commits (see `checkpoints.py`)."""


def _begin_waiting(dbapi_connection: DBAPIConnection) -> None:
    """The writer's BEGIN IMMEDIATE, on the writer thread, waiting for the write lock that
    another process holds."""
    dbapi_connection.execute(f"PRAGMA busy_timeout={LOCK_WAIT_MS}")
    try:
        dbapi_connection.execute("BEGIN IMMEDIATE")
    finally:
        dbapi_connection.execute("PRAGMA busy_timeout=0")


def _configure_sqlite(engine: Engine) -> None:
    """Set the pragmas on every connection, and take transaction control away from the sqlite3
    module (which would begin transactions only before DML, so the reads of a write operation
    ran outside it): IMMEDIATE for the writer (the write lock is taken up front, never upgraded
    mid-transaction), DEFERRED for readers (a consistent snapshot across their statements).
    Readers wait for locks (on their threads); the writer's BEGIN on the loop does not wait,
    and is tried again on the writer thread with the wait (see `SqliteDatabase.run`)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.execute(f"PRAGMA busy_timeout={LOCK_WAIT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Straight to the driver: a statement through SQLAlchemy costs more than BEGIN itself.
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None  # a connection that is beginning is open
        if not conn.info.get(WRITER_MARK):  # the writer's BEGIN: see `SqliteDatabase.run`
            dbapi_connection.execute("BEGIN")
