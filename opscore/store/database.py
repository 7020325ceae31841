"""Where transactions run: the one place where SQLite and PostgreSQL are driven differently.

Every store operation is plain synchronous SQLAlchemy over a `Connection`, run whole inside one
transaction by `Database.run`. How that transaction reaches its database is the only thing that
differs between the backends:

- SQLite: the standard `sqlite3` driver. An async driver that hands over to a thread once per
  statement (aiosqlite) measured here 0.8 ms a statement, against 0.05 ms for the statement
  itself: a store operation of eight statements would cost 6 ms, and no batching of commits
  could win that back. Reads run whole on a small pool of threads. A write transaction's
  statements run on the event loop, on the one writer connection, and only what waits goes to
  the writer thread: the commit (an fsync) and, when another process holds the write lock, the
  wait for it. Statements are Python-bound, so on a thread they would hold the interpreter lock
  all the same and add its hand-overs; the fsync is the only wait worth moving off the loop,
  and the loop serves the requests that make up the next batch meanwhile. Measured against
  running the whole transaction on the thread: 10-30% more throughput. The WAL is copied into
  the database file by a checkpointer of its own (see CHECKPOINT_EVERY), never inside a commit,
  and then written again from its start (see `SqliteDatabase._restart_due`).
- PostgreSQL: asyncpg on the event loop (no threads), each operation run through SQLAlchemy's
  greenlet bridge (`AsyncConnection.run_sync`); its statements are network round trips anyway.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import AdaptedConnection, Connection, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from opscore.domain.errors import StorageFault
from opscore.domain.health import StorageHealth
from opscore.store.faults import classify
from opscore.store.tables import metadata

T = TypeVar("T")

SQLITE_PRAGMAS = (
    # Readers never block the writer, and the writer never blocks readers.
    "PRAGMA journal_mode=WAL",
    # Every commit reaches the disk before it is acknowledged: an acknowledged write survives a
    # power cut, not only a crash of the process. Group commit makes the fsync per batch cheap.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    # No commit copies the WAL into the database file as it goes: see CHECKPOINT_EVERY.
    "PRAGMA wal_autocheckpoint=0",
)

CHECKPOINT_EVERY = 200
"""Write transactions between two checkpoints (the WAL copied into the database file). A
checkpoint copies pages and syncs the file: 5-20 ms measured here, every couple of hundred
commits. Run inside a commit, as SQLite does by default, it stalls that batch and every request
queued behind it; here it runs PASSIVE (it blocks neither the writer nor readers) on a thread and
connection of its own, while writes go on."""

CHECKPOINT_ROWS = 10_000
"""Rows changed since the last checkpoint that call for the next one sooner than CHECKPOINT_EVERY
commits: a few triggers of runs of a thousand tasks write as much as hundreds of ordinary
commits, and the WAL they leave (appended to, never started over) made every commit after them
slower until the next checkpoint."""

CATCH_UP_FRAMES = 256
"""Most WAL frames (pages) the checkpointer leaves for the writer to copy before it starts the
WAL over (see `SqliteDatabase._restart_due`): it goes on copying until no more than this many
are left, at most CHECKPOINT_ROUNDS times."""

CHECKPOINT_ROUNDS = 8
"""Most PASSIVE checkpoints in a row one background checkpoint runs (see CATCH_UP_FRAMES)."""

HEAVY_FRAMES = 8192
"""WAL frames (32 MiB of pages) written since the previous checkpoint beyond which the writer does
not copy the rest itself at once (see `SqliteDatabase._restart_due`): right after 100,000 tasks
were inserted in bulk, copying the last few dozen pages held its next batch for 23-33 ms (the
database file's sync). Another checkpoint in the background goes first."""

WRITER_MARK = "opscore_writer"
"""Set in the writer connection's `info`: its transactions begin IMMEDIATE (see below)."""

LOCK_WAIT_MS = 10_000
"""How long a transaction waits for a lock another process holds (an operator's `sqlite3` shell
beside a server, a reader's checkpoint) before failing: always on a thread, never on the event
loop."""


READ_THREADS = 4
"""Threads (and so connections) serving SQLite reads at once."""

STATISTICS_CHECK = 1.0
"""Seconds between two looks at how Ops-Core's tables have grown, on PostgreSQL (see
`PostgresDatabase.maintain`)."""
STATISTICS_RETRY = 60.0
"""Seconds before looking again after a look or an ANALYZE failed."""
ANALYZE_GROWTH = 4
"""A table is analyzed once it holds this many times the rows its statistics say it has..."""
ANALYZE_MIN_ROWS = 1_000
"""...and at least this many: below, any plan is cheap."""

log = logging.getLogger("opscore.store")

Work = Callable[[Connection], T]
"""A store operation: statements over a connection, run whole inside one transaction."""
Committed = Callable[[T], None] | None
"""What to tell once a write has committed (see `Database.run`)."""


class Database(abc.ABC):
    """Runs store operations, each in one transaction (see the module docstring)."""

    dialect: str
    """`sqlite` or `postgresql`."""
    health: StorageHealth
    """Told how every transaction went (see `run`)."""

    async def run(
        self,
        work: Callable[[Connection], T],
        *,
        write: bool,
        alone: bool = False,
        committed: Callable[[T], None] | None = None,
    ) -> T:
        """Run `work` in one transaction, committed if it returns, rolled back if it raises.
        Writes must come from one caller at a time (the `Writer`). `alone`: a write that the
        server has nothing else to do beside (see `Writer.run`). `committed` (it must not raise)
        is given a write's value once it has committed, before the caller resumes: on SQLite in
        the loop's turn that learns of the commit from the writer thread, a turn sooner.

        An error that means storage cannot be used now is raised as the `StorageFault` it
        means (see `faults.py`), and `health` is told of every transaction's outcome; any other
        error is raised as it is."""
        try:
            value = await self._run(work, write, alone, committed)
        except Exception as error:
            fault = classify(error)
            if fault is None:
                raise
            self.health.failed(fault, write)
            raise fault from error
        self.health.succeeded(write)
        return value

    @abc.abstractmethod
    async def _run(self, work: Work[T], write: bool, alone: bool, committed: Committed[T]) -> T:
        """`run` on this backend, its errors as the driver raised them."""

    @abc.abstractmethod
    async def dispose(self) -> None:
        """Close every connection."""

    @abc.abstractmethod
    async def maintain(self) -> None:
        """Upkeep the database needs while the server runs, until cancelled (it may return at
        once when there is none)."""


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


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, made absolute; None for an in-memory database."""
    database = make_url(normalize_url(url)).database
    return None if database in (None, "", ":memory:") else Path(database).absolute()


def name_of(url: str) -> str:
    """The database of `url` as an operator names it: a SQLite file's path, or the URL without
    its password."""
    if normalize_url(url).startswith("sqlite"):
        return str(sqlite_file(url) or ":memory:")
    return make_url(url).render_as_string(hide_password=True)


def open_database(url: str, health: StorageHealth | None = None) -> Database:
    """The Database for `url`: SQLite (a file path) or PostgreSQL; `health` is told how its
    transactions go (a tracker of its own if None)."""
    normalized = normalize_url(url)
    if normalized.startswith("sqlite"):
        return SqliteDatabase(normalized, health)
    return PostgresDatabase(normalized, health)


class _WriterThread:
    """The thread the writer connection's waits run on, one call at a time: its commits, a
    wait for another process's lock, the copy that lets the WAL start over. A thread of its own
    rather than a one-thread executor: the executor's future (a concurrent future with its own
    lock, chained to one of the loop's) cost the loop 33-35 µs a hand-over, against 19-20 µs
    for a call answered through `call_soon_threadsafe` (measured), and a write batch hands over
    its commit every time."""

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
        self._checkpoints = ThreadPoolExecutor(1, thread_name_prefix="opscore-sqlite-checkpoint")
        self._checkpoint: Future[int | None] | None = None
        """The background checkpoint under way or last run (see `_run_checkpoint`)."""
        self._commits_since_checkpoint = 0
        self._changes_at_checkpoint = 0
        """The writer connection's rows changed in all, when the last checkpoint began."""
        self._restart_pending = False
        self._frames_at_checkpoint = 0
        """The WAL's frames when the last background checkpoint ended; zero once the writer
        starts the WAL over (written by one side at a time: a checkpoint runs, or the writer
        looks at its result)."""

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
        if self._restart_due():
            await self._writes.call(functools.partial(_catch_up, dbapi_connection))
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
                # CPU is slow to wake for (about 65 us each way, measured at a trickle).
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
        self._commits_since_checkpoint += 1
        changes = dbapi_connection.total_changes
        if (
            self._commits_since_checkpoint >= CHECKPOINT_EVERY
            or changes - self._changes_at_checkpoint >= CHECKPOINT_ROWS
        ) and (self._checkpoint is None or self._checkpoint.done()):
            self._commits_since_checkpoint = 0
            self._changes_at_checkpoint = changes
            self._checkpoint = self._checkpoints.submit(self._run_checkpoint)
            self._restart_pending = True
        return value

    def _restart_due(self) -> bool:
        """Whether the WAL is to be started over before the next write: once a checkpoint in the
        background has copied it. SQLite starts the WAL over, writing it again from its first
        byte, only when a write transaction begins after every frame in it was copied; while
        writes go on, a checkpoint beside them never catches up with the last commit, and the
        WAL grew by about 30 MB a second on 10-task chains (every commit appended to the file,
        so every fsync also wrote its new size: 270 µs against 140-170 µs for an fsync of
        pages written over, measured on this disk). So the writer copies what was committed
        since that checkpoint began itself, on its thread, between two of its transactions:
        a few commits' pages (CATCH_UP_FRAMES), usually in under a millisecond. When the
        checkpointer left more (writes heavier than it could follow), or after a burst of writes
        (HEAVY_FRAMES), another checkpoint goes first."""
        checkpoint = self._checkpoint
        if not (self._restart_pending and checkpoint is not None and checkpoint.done()):
            return False
        written = checkpoint.result()
        if written is not None and written > HEAVY_FRAMES:
            # One more checkpoint first: it finds little to copy, and it waits out on its own
            # thread the sync that the database file takes after a burst.
            self._checkpoint = self._checkpoints.submit(self._run_checkpoint)
            return False
        self._restart_pending = False
        if written is None:
            return False
        self._frames_at_checkpoint = 0  # the WAL starts over
        return True

    async def checkpointed(self) -> None:
        """Return once the checkpoint under way, if any, is done."""
        if self._checkpoint is not None:
            await asyncio.wrap_future(self._checkpoint)

    def _run_checkpoint(self) -> int | None:
        """Copy what the WAL holds into the database file, without waiting for anyone, again
        while writes add more than CATCH_UP_FRAMES meanwhile. Once few are left, the frames
        written since the previous checkpoint; None if more are left, or nothing could be done."""
        try:
            with self.engine.connect() as conn:
                dbapi_connection = conn.connection.dbapi_connection
                assert dbapi_connection is not None  # just checked out
                for _ in range(CHECKPOINT_ROUNDS):
                    busy, frames, copied = dbapi_connection.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchone()
                    if busy or frames - copied <= CATCH_UP_FRAMES:
                        # Frames count from the WAL's last start: what came since the
                        # previous checkpoint, unless the WAL started over since.
                        since = self._frames_at_checkpoint
                        written = frames - since if frames >= since else frames
                        self._frames_at_checkpoint = frames
                        return None if busy else written
        except Exception as error:  # noqa: BLE001 - the next one copies what this one did not
            _log_failure("checkpoint failed", error)
        return None

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
        its checkpoints follow the commits (see CHECKPOINT_EVERY)."""


class PostgresDatabase(Database):
    """PostgreSQL through asyncpg (see the module docstring)."""

    dialect = "postgresql"

    def __init__(self, url: str, health: StorageHealth | None = None, **options: Any) -> None:
        self.health = StorageHealth() if health is None else health
        self.engine: AsyncEngine = create_async_engine(url, **options)
        _warn_without_autovacuum(self.engine)

    async def _run(self, work: Work[T], write: bool, alone: bool, committed: Committed[T]) -> T:
        """Run `work` on a pooled connection through the greenlet bridge (no thread to spare
        a write that comes alone)."""
        async with self.engine.connect() as conn, conn.begin():
            value = await conn.run_sync(work)
        if committed is not None:
            committed(value)
        return value

    async def dispose(self) -> None:
        """Close the pool."""
        await self.engine.dispose()

    async def maintain(self) -> None:
        """Analyze Ops-Core's tables while they are young: each one that holds `ANALYZE_GROWTH`
        times the rows its statistics say (and at least `ANALYZE_MIN_ROWS`).

        The driver prepares every statement, and PostgreSQL caches a generic plan for it after
        five executions, made from the statistics of the moment. A new database's tables have
        none, so the plans are made for empty tables and hold until the first ANALYZE, which
        autovacuum runs up to a minute or so later, and a server without autovacuum never
        (there this is what refreshes them, see `_warn_without_autovacuum`). On new databases
        with PostgreSQL's default settings (two interleaved runs, rounds of about 20 s), 1-task
        runs at 8 agents measured 0.18-0.30 of the ceiling until then (one to five rounds), and
        0.33-0.42 from the first round with this. An ANALYZE samples at most 30,000 rows and
        takes no lock that writes wait for; it invalidates the cached plans, which are made
        again from the new statistics. Once a table has grown to its working size, autovacuum
        (where it runs) keeps its statistics, and this no longer fires."""
        tables = [table.name for table in metadata.sorted_tables]
        while True:
            await asyncio.sleep(STATISTICS_CHECK)
            try:
                grown = await self.run(functools.partial(_analyze_grown, tables), write=False)
            except StorageFault:
                continue  # the outage is logged by `health`; the next look comes as usual
            except DBAPIError:
                log.warning("refreshing table statistics failed", exc_info=True)
                await asyncio.sleep(STATISTICS_RETRY)
                continue
            if grown:
                log.info("table statistics refreshed", extra={"tables": grown})


def _analyze_grown(tables: list[str], conn: Connection) -> list[str]:
    """ANALYZE the tables among `tables` that have grown (see `PostgresDatabase.maintain`);
    their names."""
    grown = list(
        conn.execute(
            _GROWN_TABLES, {"tables": tables, "growth": ANALYZE_GROWTH, "rows": ANALYZE_MIN_ROWS}
        ).scalars()
    )
    if grown:
        quote = conn.dialect.identifier_preparer.quote
        conn.execute(text(f"ANALYZE {', '.join(quote(name) for name in grown)}"))
    return grown


_GROWN_TABLES = text(
    """
    SELECT s.relname
    FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
    WHERE s.schemaname = current_schema()
      AND s.relname = ANY(:tables)
      AND s.n_live_tup >= :rows
      AND s.n_live_tup > :growth * GREATEST(c.reltuples, 0)
    ORDER BY s.relname
    """
)
"""Ops-Core's tables whose live rows (as PostgreSQL's statistics system counts them, within a
second of each commit) have outgrown the row count of their last ANALYZE (`reltuples`, -1 when
never analyzed)."""


def _warn_without_autovacuum(engine: AsyncEngine) -> None:
    """Log once, at the first connection, if the server runs without autovacuum: nothing then
    removes the dead rows that every update of a task leaves, nor refreshes statistics once the
    tables have stopped growing (`PostgresDatabase.maintain` does while they grow), so such a
    server needs `VACUUM ANALYZE` on a schedule.

    Ops-Core used to plan every statement at each execution on such a server, so that no plan
    cached while its tables were nearly empty would stay; the young tables' ANALYZE now replaces
    those plans on every server. On this machine's CI PostgreSQL (autovacuum off), interleaved
    with the ceiling, 8 rounds: the cached plans gave 10-task chains at 8 agents 0.360 of the
    ceiling against 0.306 planned per execution, 1-task runs 0.420 against 0.345."""
    checked = False

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        nonlocal checked
        if checked:
            return
        checked = True  # before the read: connections opened meanwhile need not check again
        assert isinstance(dbapi_connection, AdaptedConnection)  # asyncpg, adapted
        # On asyncpg's own connection: through the adapted cursor the read would begin a
        # transaction that the pool then has to end.
        autovacuum = dbapi_connection.run_async(
            lambda driver: driver.fetchval("SELECT current_setting('autovacuum')")
        )
        if autovacuum != "on":
            log.warning(
                "PostgreSQL runs without autovacuum: nothing removes dead rows or refreshes "
                "statistics unless VACUUM ANALYZE is run on a schedule",
                extra={"autovacuum": autovacuum},
            )


def _catch_up(dbapi_connection: DBAPIConnection) -> None:
    """On the writer's connection, between two transactions: copy the rest of the WAL into the
    database file, so that the next transaction writes the WAL again from its start."""
    try:
        dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except Exception as error:  # noqa: BLE001 - the WAL goes on growing until the next one
        _log_failure("checkpoint before restarting the WAL failed", error)


def _log_failure(event: str, error: Exception) -> None:
    """Log a failure beside the writes: a storage fault in one line (the outage itself is told
    by `StorageHealth`), anything else with its traceback."""
    fault = classify(error)
    if fault is None:
        log.warning(event, exc_info=error)
    else:
        log.warning(event, extra={"reason": fault.reason, "cause": fault.cause})


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
