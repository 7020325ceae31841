"""Group commit: one writer task runs every write, many callers' writes to one transaction.

Committing each RPC on its own makes the server pay a transaction (and, on SQLite, a hand-over to
the database thread and an fsync) per write. Callers submit a write operation and wait; the
writer takes every operation waiting, runs them in one transaction, commits once, and only then
releases each caller with its result. Nothing is acknowledged before it is durable, and SQLite's
single-writer rule is met by construction: no `database is locked` can reach a client.

The hot writes (triggering a run, recording a result) are also *set-based across the batch*: a
`Grouped` operation is called once with every request of its kind that the batch holds, so the
batch pays a fixed number of statements for them, not a few statements per request. It answers
each request on its own, with a result or the domain error meant for that caller alone, and
writes nothing for a refused request. Groups and single operations run in the order their first
request arrived; as they were all concurrent, that is a valid order to commit them in.

Before the batch commits, a `before_commit` hook (given to `Writer.run`) may add to it. The
server gives it the placement: the tasks that the batch's requests made ready go to the agents
whose slots they freed, in the same transaction (see `Dispatcher.reserve_for_commit`); a task
then goes from ready to assigned in one commit, not two. What the hook changes in memory before
the commit is given back if the batch fails.

An operation may also fail outright (an exception escapes it). Since it may have written before
failing, the whole batch is rolled back and each request is run again in a transaction of its
own, so one caller's mistake never touches another caller's write. A write alone whose
transaction loses to a concurrent one (a deadlock or a serialization failure, which only another
server's writer on the same database causes) is run again, a few times, before its caller is
told to try again later (`StorageUnavailable`). Operations are therefore pure functions of the
database: they may be run twice, and whatever they change outside it goes in `Tx.after_commit`
callbacks, run in commit order once durable.

A batch that fails because storage cannot be used now (a `StorageFault`: the database is
unreachable, read-only or full) is nobody's mistake, and running its requests again one by one
against a database that refuses them all would only multiply the failures: every caller of the
batch gets the fault at once, what the `before_commit` hook reserved is given back, and the writer
goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from opscore.domain.errors import StorageFault, StorageUnavailable, Unavailable
from opscore.domain.idle import Pauses
from opscore.domain.models import Effects, JsonObject
from opscore.domain.state import QueuedTask
from opscore.store.faults import UNAVAILABLE_RETRY, is_conflict
from opscore.store.transactions import Database

T = TypeVar("T")
A = TypeVar("A")

GATHER_TURNS = 8
"""Most turns of the event loop a batch waits for more requests before it runs (see
`Writer._gather`)."""

QUIET_SPELL = 0.001
"""Seconds without a write after which a lone request counts as coming alone (see `Writer.run`)."""

CONFLICT_ATTEMPTS = 5
"""Times a write alone is run when its transaction keeps losing to concurrent ones (a deadlock,
a serialization failure: only other servers' writers cause them) before its caller is told."""

CONFLICT_BACKOFF = 0.01
"""Seconds, at most, before a write that lost to a concurrent one runs again, doubled after
each loss and drawn at random below it, so that two writers that collided do not collide
again in step."""


@dataclass(slots=True)
class Batch:
    """What the writes of one batch share inside its transaction, valid only there: what they
    will apply once it commits, which the placement before commit acts on, and what they learned
    that the assignments it writes may use instead of reading it again."""

    conn: Connection
    effects: list[Effects] = field(default_factory=list)
    """What the batch's writes will mean for the dispatcher once committed (tasks queued, slots
    freed), in order."""
    recorded: dict[tuple[str, str], JsonObject] = field(default_factory=dict)
    """Outputs the batch recorded, by run id and task name: a task made ready by its dependency's
    completion and placed in the same batch (every step of a chain) is sent that output. A
    succeeded task's output never changes, so this stays true."""
    inserted: dict[str, QueuedTask] = field(default_factory=dict)
    """Tasks the batch inserted queued (a new run's roots), by id: nothing else in the batch can
    have moved them, as nothing else knows their ids yet."""


class Tx:
    """One request's share of a batch: its transaction, and the effects to apply once it
    commits."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.conn = batch.conn
        self._callbacks: list[Callable[[], None]] = []

    def will_apply(self, effects: Effects) -> None:
        """Tell the batch what this request will apply after its commit (tasks queued, slots
        freed), so the placement before commit can act on it within the same transaction."""
        self.batch.effects.append(effects)

    def apply_after_commit(self, effects: Effects, apply: Callable[[Effects], None]) -> None:
        """The one way a write's effects travel: to the batch (`will_apply`), then to `apply`
        once committed."""
        self.will_apply(effects)
        self.after_commit(lambda: apply(effects))

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

Grouped = Callable[[Connection, Sequence[tuple[Tx, A]]], list[Any]]
"""A set-based write: every request of its kind in the batch at once, each with its own `Tx`.
Returns, in order, each request's result, or the exception to raise to that caller (an
exception instance as a value: refused requests must have written nothing)."""


@dataclass(slots=True)
class Followup:
    """What a `before_commit` hook added to a batch: its effects to apply after the batch's own,
    and how to give back what it reserved in memory if the batch does not commit."""

    tx: Tx
    undo: Callable[[], None]


BeforeCommit = Callable[[Batch, list[Followup]], None]
"""Called inside a batch's transaction, once its requests have run, when they will apply any
effects (`Batch.effects`). It adds its `Followup` to the list as soon as it has anything to give
back, before it writes: if the batch then fails, the writer calls the undo."""

Observe = Callable[[Connection], Callable[[], None] | None]
"""Called inside every batch's transaction, last: reads what it watches as the batch leaves it,
and returns what to do with that once the batch has committed (in commit order), if anything."""


def _run_single(conn: Connection, requests: Sequence[tuple[Tx, WriteOp[Any]]]) -> list[Any]:
    return [op(tx) for tx, op in requests]


@dataclass(slots=True)
class _Pending:
    run: Grouped[Any]
    request: Any
    grouped: bool
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(slots=True)
class _Done:
    pending: _Pending
    value: Any
    tx: Tx


def _run_all(
    conn: Connection,
    batch: list[_Pending],
    followups: list[Followup],
    before_commit: BeforeCommit | None = None,
    observe: Observe | None = None,
) -> list[_Done]:
    """Run a batch: each group of alike grouped requests in one call, at the place of its
    first request; single operations one by one; then the `before_commit` hook, whose followup
    goes to `followups`, and the observation. Returns the requests in the order they ran."""
    groups: dict[Any, list[_Pending]] = {}
    for index, pending in enumerate(batch):
        groups.setdefault(pending.run if pending.grouped else index, []).append(pending)
    done: list[_Done] = []
    shared = Batch(conn)
    for members in groups.values():
        txs = [Tx(shared) for _ in members]
        values = members[0].run(conn, [(tx, p.request) for tx, p in zip(txs, members, strict=True)])
        done.extend(_Done(p, v, tx) for p, v, tx in zip(members, values, txs, strict=True))
    if before_commit is not None and shared.effects:
        before_commit(shared, followups)
    if observe is not None and (seen := observe(conn)) is not None:
        tx = Tx(shared)
        tx.after_commit(seen)
        followups.append(Followup(tx, _nothing))
    return done


def _nothing() -> None:
    """An observation reserves nothing to give back."""


class Writer:
    """Serializes and batches every write of the process (see the module docstring)."""

    def __init__(self, database: Database, *, max_batch: int = 512) -> None:
        self._database = database
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._closed = False
        self._before_commit: BeforeCommit | None = None
        self._observe: Observe | None = None
        self.batches = 0
        self.operations = 0
        self._pauses = Pauses()

    @property
    def idle(self) -> bool:
        """Whether no write is queued or running (every one submitted so far is committed, and
        its callbacks have run)."""
        return self._pauses.paused and self._queue.empty()

    async def until_idle(self) -> None:
        """Return at a moment the writer is `idle`."""
        while not self.idle:
            await self._pauses.next_pause()

    async def submit(self, op: WriteOp[T]) -> T:
        """Run `op` in the next batch and return its result once the batch has committed."""
        value: T = await self._enqueue(_Pending(_run_single, op, grouped=False))
        return value

    async def submit_grouped(self, run: Grouped[A], request: A) -> Any:
        """Run `request` in the next batch together with the other requests for `run` (the
        same function object), and return its result once the batch has committed."""
        return await self._enqueue(_Pending(run, request, grouped=True))

    async def _enqueue(self, pending: _Pending) -> Any:
        if self._closed:
            raise Unavailable("the server is shutting down")
        self._queue.put_nowait(pending)
        # A caller that is cancelled (its client went away) cancels only its wait: the write is
        # already queued and is committed with its batch, whose release skips a done future.
        return await pending.future

    def close(self) -> None:
        """Refuse new writes; `run` returns once every write already submitted is committed."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    async def run(
        self, before_commit: BeforeCommit | None = None, observe: Observe | None = None
    ) -> None:
        """The writer loop: one batch at a time until closed and drained. `before_commit` runs
        at the end of each batch whose requests will apply effects (see the module docstring),
        and `observe` at the end of every batch."""
        self._before_commit = before_commit
        self._observe = observe
        draining = False
        loop = asyncio.get_running_loop()
        while not (draining and self._queue.empty()):
            waiting_since = loop.time()
            self._pauses.pause()
            first = await self._queue.get()
            self._pauses.resume()
            if first is None:
                draining = True
                continue
            # A request after a quiet spell that no other joins: the server is close to idle
            # (a trickle of runs), and the database may commit it without the hand-overs that
            # let the loop serve other requests meanwhile (see `SqliteDatabase.run`). Under
            # load the writer never waits that long, and batches commit on the thread.
            quiet = loop.time() - waiting_since >= QUIET_SPELL
            await self._gather()
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    draining = True
                else:
                    batch.append(item)
            await self._run_batch(batch, alone=quiet and len(batch) == 1)

    async def _gather(self) -> None:
        """Let the event loop run while each of its turns brings new requests (at most
        `GATHER_TURNS` turns). A request rarely arrives alone: RPCs that reached the server
        together are decoded in the same turns of the loop, and without this the first of them
        would commit on its own while the others wait a whole commit for the next batch. A turn
        that brings nothing ends the wait, so a lone request pays one idle turn (microseconds),
        while batches under load grow (the figures are in the performance log)."""
        for _ in range(GATHER_TURNS):
            waiting = self._queue.qsize()
            if waiting >= self._max_batch:
                return
            await asyncio.sleep(0)
            if self._queue.qsize() == waiting:
                return

    async def _run_batch(self, batch: list[_Pending], *, alone: bool) -> None:
        self.batches += 1
        self.operations += len(batch)
        followups: list[Followup] = []
        failed: list[BaseException] = []

        def committed(done: list[_Done]) -> None:
            # Run by the database as soon as it learns of the commit: on SQLite a turn of the
            # loop before this coroutine resumes, which is that much sooner for every push and
            # answer. What goes wrong here is raised below, not in the database.
            try:
                _release(done, followups)
            except BaseException as error:  # noqa: BLE001 - raised again once resumed
                failed.append(error)

        try:
            await self._database.run(
                lambda conn: _run_all(conn, batch, followups, self._before_commit, self._observe),
                write=True,
                alone=alone,
                committed=committed,
            )
        except Exception as error:  # noqa: BLE001 - see the module docstring
            for followup in followups:
                followup.undo()
            if isinstance(error, StorageFault):
                # Storage refuses the whole batch: no replay, every caller told at once.
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error.again())
                return
            # Isolate the failing operation.
            for pending in batch:
                await self._run_alone(pending)
            return
        if failed:
            raise failed[0]

    async def _run_alone(self, pending: _Pending) -> None:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            followups: list[Followup] = []
            try:
                [item] = await self._database.run(
                    functools.partial(
                        _run_all, batch=[pending], followups=followups, observe=self._observe
                    ),
                    write=True,
                )
            except Exception as error:  # noqa: BLE001 - the caller receives its own error
                conflict = is_conflict(error)
                if conflict and attempt < CONFLICT_ATTEMPTS:
                    await asyncio.sleep(random.uniform(0, CONFLICT_BACKOFF * 2**attempt))
                    continue
                if conflict:  # nobody's fault, and likely to pass later: never INTERNAL
                    error = StorageUnavailable(
                        f"the write lost to concurrent ones {attempt} times", UNAVAILABLE_RETRY
                    )
                if not pending.future.done():
                    pending.future.set_exception(error)
                return
            _release([item], followups)
            return


def _release(done: list[_Done], followups: list[Followup]) -> None:
    """A committed batch's effects, in commit order, then its callers' answers: the tasks it
    placed are on their streams before any caller's answer is composed and sent."""
    for item in done:
        item.tx._run_callbacks()
    for followup in followups:
        followup.tx._run_callbacks()
    for item in done:
        _answer(item)


def _answer(item: _Done) -> None:
    """Give a committed request's caller its result (or its error)."""
    future = item.pending.future
    if future.done():
        return
    if isinstance(item.value, Exception):
        future.set_exception(item.value)
    else:
        future.set_result(item.value)
