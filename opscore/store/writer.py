"""Group commit: one writer task runs every write, many callers' writes to one transaction.

Committing each RPC on its own makes the server pay a transaction (and, on SQLite, a hand-over to
the database thread and an fsync) per write. Callers submit a write operation and wait; the
writer takes every operation waiting, runs them in one transaction, commits once, and only then
releases each caller with its result. Nothing is acknowledged before it is durable, and SQLite's
single-writer rule is met by construction: no `database is locked` can reach a client.

An operation may fail on purpose (a domain error, such as a result from the wrong agent). Since
it may have written before failing, the whole batch is rolled back and each operation is run
again in a transaction of its own, so one caller's mistake never touches another caller's write.
Operations are therefore pure functions of the database: they may be run twice, and whatever
they change outside it goes in `Tx.after_commit` callbacks, run in commit order once durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection

from opscore.domain.errors import Unavailable
from opscore.store.database import Database

T = TypeVar("T")


class Tx:
    """The transaction an operation runs in, and the effects to apply once it commits."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._callbacks: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this transaction is durable, in commit order, before the caller
        is released. In-memory state (the dispatcher's indexes) changes only here, so it always
        follows the committed history."""
        self._callbacks.append(callback)

    def _run_callbacks(self) -> None:
        for callback in self._callbacks:
            callback()


WriteOp = Callable[[Tx], T]
"""A write: given a transaction, run the statements and return the caller's result."""


@dataclass(slots=True)
class _Pending(Generic[T]):
    op: WriteOp[T]
    future: asyncio.Future[T] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _run_all(conn: Connection, batch: list[_Pending[Any]]) -> list[tuple[Any, Tx]]:
    results: list[tuple[Any, Tx]] = []
    for pending in batch:
        tx = Tx(conn)
        results.append((pending.op(tx), tx))
    return results


class Writer:
    """Serializes and batches every write of the process (see the module docstring)."""

    def __init__(self, database: Database, *, max_batch: int = 512) -> None:
        self._database = database
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending[Any] | None] = asyncio.Queue()
        self._closed = False
        self.batches = 0
        self.operations = 0

    async def submit(self, op: WriteOp[T]) -> T:
        """Run `op` in the next batch and return its result once the batch has committed."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        pending: _Pending[T] = _Pending(op)
        self._queue.put_nowait(pending)
        return await asyncio.shield(pending.future)

    def close(self) -> None:
        """Refuse new writes; `run` returns once every write already submitted is committed."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    async def run(self) -> None:
        """The writer loop: one batch at a time until closed and drained."""
        draining = False
        while not (draining and self._queue.empty()):
            first = await self._queue.get()
            if first is None:
                draining = True
                continue
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    draining = True
                else:
                    batch.append(item)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending[Any]]) -> None:
        self.batches += 1
        self.operations += len(batch)
        try:
            results = await self._database.run(lambda conn: _run_all(conn, batch), write=True)
        except Exception:  # noqa: BLE001 - isolate the failing operation, see module docstring
            for pending in batch:
                await self._run_alone(pending)
            return
        for pending, (value, tx) in zip(batch, results, strict=True):
            tx._run_callbacks()
            if not pending.future.done():
                pending.future.set_result(value)

    async def _run_alone(self, pending: _Pending[Any]) -> None:
        try:
            [(value, tx)] = await self._database.run(
                lambda conn: _run_all(conn, [pending]), write=True
            )
        except Exception as error:  # noqa: BLE001 - the caller receives its own error
            if not pending.future.done():
                pending.future.set_exception(error)
            return
        tx._run_callbacks()
        if not pending.future.done():
            pending.future.set_result(value)
