"""Which processes own a database: on SQLite one server for its whole life, or `opscore db upgrade`
for its duration; on PostgreSQL any number of server replicas together, or `opscore db upgrade`
alone.

- SQLite: an exclusive `flock` (POSIX systems) on a file beside the database, `<file>.lock`,
  holding a line that names its holder. Not a lock on the database file itself: SQLite locks
  that file with POSIX record locks, and closing any descriptor of a file drops every such lock
  the process holds on it. The operating system releases the lock when the process ends, however
  it ends; the file stays.
- PostgreSQL: a session-level advisory lock on a connection of its own, whose `application_name`
  names its holder; PostgreSQL releases it when the session ends. `db upgrade` takes it
  exclusively; a replica takes it exclusively if it can (no other process runs on the database:
  it may migrate the schema), and shares it with the other replicas otherwise (a replica started
  while others run must find the schema it needs). If that connection is lost (the database
  restarted), the lock is taken again as soon as the database answers, and if `db upgrade` took
  it meanwhile, `watch` raises OwnershipLost.
- An in-memory SQLite database belongs to its process: there is nothing to lock.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from opscore.store.database import name_of, normalize_url, sqlite_file

LOCK_KEY = 0x6F707363
"""The first key of the PostgreSQL advisory lock ("opsc"); the second is a hash of the schema, so
that Ops-Cores in different schemas of one database do not exclude each other."""

PROBE_EVERY = 5.0
"""Seconds between two checks that the PostgreSQL lock's connection still answers: a closed
connection is noticed at once, but a database restarted behind a network partition leaves a
socket that only a statement finds dead."""

RETAKE_EVERY = 1.0
"""Seconds between two attempts to take the PostgreSQL lock again after its connection was lost."""

JOIN_WAIT = 60.0
"""Seconds a replica waits to join while one process holds the PostgreSQL lock alone (another
replica migrating the schema, or `db upgrade`)."""

KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}
"""PostgreSQL ends the session, and so releases the lock, of a server that vanished without
closing its connection (its host lost) within about 25 seconds, not the system's two hours."""

APPLICATION_NAME_LENGTH = 63
"""PostgreSQL keeps this many bytes of an `application_name`."""

log = logging.getLogger("opscore.store")


@dataclass(frozen=True, slots=True)
class Holder:
    """Who takes a database: shown to whoever is refused it."""

    command: str
    """`serve` or `db upgrade`."""
    listen: str = ""
    """The address a server listens on."""
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    since: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def __str__(self) -> str:
        listening = f", listening on {self.listen}" if self.listen else ""
        return (
            f"opscore {self.command} (pid {self.pid} on {self.host}{listening}, since {self.since})"
        )

    @property
    def application_name(self) -> str:
        """The holder in PostgreSQL's `application_name`, most telling first."""
        name = f"opscore {self.command} pid {self.pid} {self.listen} {self.host}"
        return " ".join(name.split())[:APPLICATION_NAME_LENGTH]


class DatabaseOwned(Exception):
    """Another process owns the database: which database, and who holds it."""

    def __init__(self, database: str, holder: str) -> None:
        self.database = database
        self.holder = holder
        super().__init__(f"in use by {holder}")


class OwnershipLost(DatabaseOwned):
    """A server lost its database to another one while it ran (the lock's connection was lost,
    and another server took the lock before it could take it again)."""

    def __str__(self) -> str:
        return f"the database {self.database} was taken over by {self.holder}"


class Ownership(abc.ABC):
    """A database owned until `release`."""

    alone = True
    """Whether no other process holds the database: it may be migrated."""

    async def share(self) -> None:  # noqa: B027 (only PostgreSQL's lock has anything to do)
        """Let replicas join (PostgreSQL): the database is held from now on as they hold it."""

    @abc.abstractmethod
    async def watch(self) -> None:
        """Keep the ownership while the server runs, until cancelled (it may return at once when
        nothing can take it away); raises OwnershipLost if another server took it."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the database up."""


async def claim(url: str, holder: Holder) -> Ownership:
    """Own the database of `url` for `holder`, or raise DatabaseOwned naming who does."""
    normalized = normalize_url(url)
    if normalized.startswith("sqlite"):
        database = sqlite_file(normalized)
        return _InMemory() if database is None else _LockFile.take(database, holder)
    return await _AdvisoryLock.take(url, holder)


async def join(url: str, holder: Holder) -> Ownership:
    """Hold the database of `url` for a server: alone on SQLite (or raise DatabaseOwned, as
    `claim`); on PostgreSQL alone if no other process holds it, or beside the replicas that do
    (`Ownership.alone` says which; `share` once done with what only a lone holder may do)."""
    if normalize_url(url).startswith("sqlite"):
        return await claim(url, holder)
    return await _AdvisoryLock.take(url, holder, replica=True)


class _InMemory(Ownership):
    async def watch(self) -> None:
        """Nothing can take an in-memory database away."""

    async def release(self) -> None:
        """Nothing was taken."""


class _LockFile(Ownership):
    """An exclusive flock on `<database>.lock`, which names its holder."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor

    @classmethod
    def take(cls, database: Path, holder: Holder) -> _LockFile:
        path = database.with_name(f"{database.name}.lock")
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(descriptor, errors="replace") as held:
                named = held.read().strip()
            raise DatabaseOwned(str(database), named or f"another process (see {path})") from None
        except BaseException:
            os.close(descriptor)
            raise
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{holder}\n".encode())
        return cls(descriptor)

    async def watch(self) -> None:
        """The operating system keeps the lock for as long as the process lives."""

    async def release(self) -> None:
        """Empty the file and unlock it (closing it unlocks it). On a disk that turned read-only
        or full the file keeps its line, which names a holder that is gone: the lock is what
        counts, and it goes all the same."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._descriptor, 0)
        os.close(self._descriptor)


_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key, hashtext(current_schema()))")
_TRY_SHARED = text("SELECT pg_try_advisory_lock_shared(:key, hashtext(current_schema()))")
_SHARE = text(
    "SELECT pg_advisory_lock_shared(:key, hashtext(current_schema())),"
    " pg_advisory_unlock(:key, hashtext(current_schema()))"
)

_LOCK_HOLDER = text(
    """
    SELECT a.application_name, a.pid, a.client_addr, a.backend_start
    FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = :key AND l.objid = hashtext(current_schema())::oid AND l.objsubid = 2
    """
)
"""The session holding the lock, as `pg_locks` shows a two-key advisory lock."""


class _AdvisoryLock(Ownership):
    """A session-level advisory lock on a connection of its own."""

    def __init__(self, url: str, holder: Holder, *, replica: bool) -> None:
        self._engine = create_async_engine(
            normalize_url(url),
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",  # no transaction stays open on this connection
            connect_args={
                "server_settings": {"application_name": holder.application_name, **KEEPALIVES}
            },
        )
        self._name = name_of(url)
        self._replica = replica
        self._shared = False
        """Whether the lock is held shared (by a replica that joined others, or `share`d)."""
        self._connection: AsyncConnection | None = None
        self._closed = asyncio.Event()
        """Set when the lock's connection closes (each connection has its own)."""

    @classmethod
    async def take(cls, url: str, holder: Holder, *, replica: bool = False) -> _AdvisoryLock:
        lock = cls(url, holder, replica=replica)
        try:
            await lock._take()
        except BaseException:
            await lock._engine.dispose()
            raise
        return lock

    async def share(self) -> None:
        """Hold the lock shared from now on, as the replicas that join hold it."""
        if not self._shared:
            assert self._connection is not None  # taken
            await self._connection.execute(_SHARE, {"key": LOCK_KEY})
            self._shared = True

    async def _take(self) -> None:
        connection = await self._engine.connect()
        try:
            statement = _TRY_SHARED if self._shared else _TRY_LOCK
            taken = (await connection.execute(statement, {"key": LOCK_KEY})).scalar_one()
            if not taken and self._replica and not self._shared:
                # Replicas hold it shared; one migrating, or `db upgrade`, holds it alone for a
                # while: wait for that to end.
                self.alone = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(JOIN_WAIT):
                        while not taken:
                            await asyncio.sleep(RETAKE_EVERY / 4)
                            taken = (
                                await connection.execute(_TRY_SHARED, {"key": LOCK_KEY})
                            ).scalar_one()
                self._shared = taken
            if not taken:
                row = (await connection.execute(_LOCK_HOLDER, {"key": LOCK_KEY})).first()
                raise DatabaseOwned(
                    self._name,
                    "another process (it has just released it)"
                    if row is None
                    else f"{row.application_name!r} (PostgreSQL backend pid {row.pid}, client "
                    f"{row.client_addr or 'local'}, connected since "
                    f"{row.backend_start.isoformat(timespec='seconds')})",
                )
            driver = (await connection.get_raw_connection()).driver_connection
            assert driver is not None  # just connected
            closed = asyncio.Event()
            driver.add_termination_listener(lambda _: closed.set())
        except BaseException:
            await connection.close()
            raise
        self._connection, self._closed = connection, closed

    async def watch(self) -> None:
        """Take the lock again whenever its connection is lost."""
        while True:
            await self._lost()
            log.warning("database ownership lost; taking it again", extra={"database": self._name})
            await self._retake()
            log.info("database ownership taken again", extra={"database": self._name})

    async def _lost(self) -> None:
        """Return once the lock's connection is closed or no longer answers."""
        connection = self._connection
        assert connection is not None  # taken, and taken again before each call
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_EVERY):
                    await self._closed.wait()
                    return
            try:
                async with asyncio.timeout(PROBE_EVERY):
                    await connection.execute(text("SELECT 1"))
            except (DBAPIError, OSError):  # OSError includes the TimeoutError
                return

    async def _retake(self) -> None:
        """Take the lock on a new connection once the database answers again."""
        connection, self._connection = self._connection, None
        assert connection is not None  # lost, not yet given up
        await connection.invalidate()  # closed at once: it has nothing left to say
        await connection.close()
        while True:
            try:
                await self._take()
            except DatabaseOwned as owned:
                raise OwnershipLost(owned.database, owned.holder) from None
            except (DBAPIError, OSError):
                await asyncio.sleep(RETAKE_EVERY)
            else:
                return

    async def release(self) -> None:
        """End the lock's session, which releases the lock."""
        if self._connection is not None:
            with contextlib.suppress(DBAPIError, OSError):  # lost already: nothing to release
                await self._connection.close()
        await self._engine.dispose()
