"""Which database errors mean that storage cannot be used now, rather than a fault of the code.

`Database.run` asks `classify` about every exception a transaction raises. An error that means
the database cannot be reached, closed the connection, is shutting down, refuses writes, is full
or stayed locked past the wait becomes a domain `StorageFault` with a stable reason and a delay
before trying again; every other error (a constraint the code broke, SQL the database refuses)
stays what it is, a fault of the server, answered INTERNAL and logged with its traceback.

The errors are recognised by what the drivers say of them (an SQLite result code, a PostgreSQL
SQLSTATE, an errno), never by their message text; the tables below are the whole of it, and
docs/operations.md lays them out for operators.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Iterator
from datetime import timedelta

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from opscore.domain.errors import (
    OpsCoreError,
    StorageFault,
    StorageFull,
    StorageLost,
    StorageUnavailable,
)

UNAVAILABLE_RETRY = timedelta(seconds=1)
"""When a client may try again after `StorageUnavailable`: the server looks for the database's
return about as often (see `StorageHealth.watch`)."""
FULL_RETRY = timedelta(seconds=5)
"""When a client may try again after `StorageFull`: space comes back when someone frees it."""
LOST_RETRY = timedelta(seconds=5)
"""When a client may try again after `StorageLost`, elsewhere or once the server is restarted."""

_SQLITE: dict[int, type[StorageFault]] = {
    sqlite3.SQLITE_FULL: StorageFull,
    sqlite3.SQLITE_READONLY: StorageUnavailable,
    sqlite3.SQLITE_IOERR: StorageUnavailable,
    sqlite3.SQLITE_BUSY: StorageUnavailable,  # still locked after the wait
    sqlite3.SQLITE_LOCKED: StorageUnavailable,
    sqlite3.SQLITE_CANTOPEN: StorageUnavailable,
    sqlite3.SQLITE_PROTOCOL: StorageUnavailable,
    sqlite3.SQLITE_CORRUPT: StorageLost,
    sqlite3.SQLITE_NOTADB: StorageLost,
}
"""SQLite's primary result codes (the low byte of the extended code)."""

_POSTGRES: dict[str, type[StorageFault]] = {
    "53100": StorageFull,  # disk_full
    "57P01": StorageUnavailable,  # admin_shutdown
    "57P02": StorageUnavailable,  # crash_shutdown
    "57P03": StorageUnavailable,  # cannot_connect_now
    "53200": StorageUnavailable,  # out_of_memory
    "53300": StorageUnavailable,  # too_many_connections
    "25006": StorageUnavailable,  # read_only_sql_transaction
    "3D000": StorageLost,  # invalid_catalog_name: the database does not exist
    "28000": StorageLost,  # invalid_authorization_specification
    "28P01": StorageLost,  # invalid_password
}
"""PostgreSQL's SQLSTATEs."""
_POSTGRES_CLASSES: dict[str, type[StorageFault]] = {"08": StorageUnavailable}
"""Whole classes of SQLSTATEs: 08, connection exception."""

_RETRY: dict[type[StorageFault], timedelta] = {
    StorageUnavailable: UNAVAILABLE_RETRY,
    StorageFull: FULL_RETRY,
    StorageLost: LOST_RETRY,
}

_OS_FULL = {errno.ENOSPC, errno.EDQUOT}

_CHAIN_DEPTH = 8
"""Most exceptions looked at down one error's chain (wrapped driver errors, their causes)."""


def classify(error: BaseException) -> StorageFault | None:
    """The storage fault `error` means, or None if it means something else (a domain error
    raised inside the transaction, or a fault of the server). What the driver says (an SQLite
    result code, a PostgreSQL SQLSTATE) anywhere down the chain decides before what any error
    is in general (a closed connection, an `OSError`)."""
    chain = list(_chain(error))
    for found in chain:
        if isinstance(found, OpsCoreError):
            return None  # a decision of the domain, made while the database answered
        fault = _driver_fault(found)
        if fault is not None:
            return fault
    for found in chain:
        fault = _connection_fault(found)
        if fault is not None:
            return fault
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what it wraps: SQLAlchemy's `orig` (the driver's error), the cause and the
    context (an adapter's translation, a rollback's failure while handling the first error)."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending and len(seen) < _CHAIN_DEPTH:
        found = pending.pop(0)
        if id(found) in seen:
            continue
        seen.add(id(found))
        yield found
        orig = getattr(found, "orig", None)
        for inner in (orig, found.__cause__, found.__context__):
            if isinstance(inner, BaseException):
                pending.append(inner)


def _fault(kind: type[StorageFault], error: BaseException) -> StorageFault:
    # The driver's words, without SQLAlchemy's statement and parameters (payloads, at times).
    said = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    return kind(f"{type(said).__name__}: {said}", _RETRY[kind])


def _driver_fault(error: BaseException) -> StorageFault | None:
    """What an SQLite result code or a PostgreSQL SQLSTATE says."""
    code = getattr(error, "sqlite_errorcode", None)
    sqlstate = getattr(error, "sqlstate", None)
    kind: type[StorageFault] | None = None
    if isinstance(error, sqlite3.Error) and isinstance(code, int):
        kind = _SQLITE.get(code & 0xFF)
    elif isinstance(sqlstate, str):
        kind = _POSTGRES.get(sqlstate) or _POSTGRES_CLASSES.get(sqlstate[:2])
    return None if kind is None else _fault(kind, error)


CONFLICTS = frozenset({"40P01", "40001"})
"""PostgreSQL's SQLSTATEs for a transaction that lost to a concurrent one (deadlock_detected,
serialization_failure): nobody's fault, and the same transaction run again succeeds. Only
writers in other processes (other servers on the database) can cause them."""


def is_conflict(error: BaseException) -> bool:
    """Whether `error` says its transaction lost to a concurrent one (see `CONFLICTS`)."""
    return any(getattr(found, "sqlstate", None) in CONFLICTS for found in _chain(error))


def _connection_fault(error: BaseException) -> StorageFault | None:
    """A connection found closed, a pool that gave none in time, or the network's refusal."""
    if isinstance(error, OSError):
        return _fault(StorageFull if error.errno in _OS_FULL else StorageUnavailable, error)
    if isinstance(error, PoolTimeout) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    ):
        return _fault(StorageUnavailable, error)
    return None
