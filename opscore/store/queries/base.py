"""What every aggregate's repository shares: the writer and the database, the state machine, the
caches of what never changes (run shapes) and of which agents' leases expired, run locking on
PostgreSQL, and the statements behind them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Text, bindparam, cast, or_, select, text, update
from sqlalchemy.engine import Connection

from opscore.domain.ids import new_id
from opscore.domain.models import Effects, TaskRun
from opscore.domain.ports import OnCommit, Rules
from opscore.domain.state import RunNow, RunShape, TaskShape
from opscore.store import rows
from opscore.store.prepared import Prepared
from opscore.store.tables import AGENTS, RUNS, TASKS
from opscore.store.transactions import Database
from opscore.store.writer import Tx, Writer

T = TypeVar("T")


RUN_SHAPE_CACHE_TASKS = 10_000
"""Tasks whose runs' shapes are kept, in all: more than a server moves at once (a miss costs one
read). No more: each task's shape is a few objects for every full garbage collection to walk.
Counted in runs (1,024 of them), so that a deep queue does not keep the garbage collector busy."""

RUNS_OF_TASKS = (
    select(TASKS.c.run_id)
    .where(TASKS.c.task_id.in_(bindparam("b_task_ids", expanding=True)))
    .scalar_subquery()
)
RUNS_OF_TASKS_FOR_UPDATE = (
    select(RUNS.c.run_id)
    .where(RUNS.c.run_id.in_(RUNS_OF_TASKS))
    .order_by(RUNS.c.run_id)
    .with_for_update()
)
"""The runs of some tasks, locked in run id order (see `Shared.lock_runs_of`)."""
LOCK_RUNS_OF_TASKS = Prepared(
    "base.lock_runs_of_tasks",
    RUNS_OF_TASKS_FOR_UPDATE,
    samples=[{"b_task_ids": ["a", "c", "z"]}],
)
READY_TASK_COLUMNS = (
    TASKS.c.task_id,
    TASKS.c.run_id,
    TASKS.c.capability,
    # As text, decoded through a cache (`rows.ready_task`): tasks of one definition share a few
    # values, and the server's start reads every queued task.
    cast(TASKS.c.labels, Text).label("labels"),
    TASKS.c.pinned_agent_id,
    TASKS.c.not_before,
)
"""What the dispatcher's view of a queued task is read from (`rows.ready_task`)."""
_RUN_SHAPES = Prepared(
    "base.run_shapes",
    select(
        TASKS.c.task_id,
        TASKS.c.run_id,
        TASKS.c.name,
        # As text, decoded through a cache: runs of one definition repeat the same few values.
        cast(TASKS.c.depends_on, Text).label("depends_on"),
        TASKS.c.fallback,
        TASKS.c.capability,
        cast(TASKS.c.labels, Text).label("labels"),
        TASKS.c.pinned_agent_id,
    )
    .where(TASKS.c.run_id.in_(bindparam("b_run_ids", expanding=True)))
    # In graph order, as the run was defined: tasks made ready together queue in that order.
    .order_by(TASKS.c.run_id, TASKS.c.position),
    samples=[{"b_run_ids": ["r1", "r9"]}],
)

_TASKS_OF_RUNS = (
    select(TASKS)
    .where(TASKS.c.run_id.in_(bindparam("b_run_ids", expanding=True)))
    .order_by(TASKS.c.position)
)


def tasks_of(conn: Connection, run_ids: list[str]) -> dict[str, list[TaskRun]]:
    """The tasks of these runs by run, each in its run's graph order."""
    if not run_ids:
        return {}
    grouped: dict[str, list[TaskRun]] = {}
    for row in conn.execute(_TASKS_OF_RUNS, {"b_run_ids": run_ids}):
        grouped.setdefault(row.run_id, []).append(rows.task_run(row))
    return grouped


def run_now(conn: Connection, run_id: str) -> RunNow:
    """A run read whole, as the state machine moves it (its row locked by the caller first,
    where writers run concurrently)."""
    return RunNow.of_runs(run_id, tasks_of(conn, [run_id])[run_id])


_PROBE_READ = text("SELECT version_num FROM alembic_version")
_PROBE_WRITE = text("UPDATE alembic_version SET version_num = version_num")
"""A write that changes nothing yet reaches the disk like any other (SQLite rewrites the row,
PostgreSQL writes a new version of it): whether storage takes writes again. On Alembic's table,
which always holds one row and which no request reads or writes."""


def _probe_write(tx: Tx) -> None:
    tx.conn.execute(_PROBE_WRITE)


def _probe_read(conn: Connection) -> None:
    conn.execute(_PROBE_READ).all()


class RunShapes:
    """The shapes of runs (they never change), kept in memory by run id, least recently used
    first out; what is not kept is read in one statement."""

    def __init__(self) -> None:
        self._shapes: OrderedDict[str, RunShape] = OrderedDict()
        self._tasks = 0
        """The tasks of the runs kept."""

    def of(self, conn: Connection, run_ids: Iterable[str]) -> dict[str, RunShape]:
        """The shapes of these runs, from memory when known, the rest read and kept."""
        shapes: dict[str, RunShape] = {}
        missing = []
        for run_id in run_ids:
            shape = self._shapes.get(run_id)
            if shape is None:
                missing.append(run_id)
            else:
                self._shapes.move_to_end(run_id)
                shapes[run_id] = shape
        if missing:
            tasks: dict[str, dict[str, TaskShape]] = {}
            for found in _RUN_SHAPES.rows(conn, {"b_run_ids": missing}):
                tasks.setdefault(found.run_id, {})[found.name] = rows.task_shape(found)
            for run_id, shaped in tasks.items():
                shapes[run_id] = self.remember(run_id, RunShape.of(shaped))
        return shapes

    def remember(self, run_id: str, shape: RunShape) -> RunShape:
        """Keep the shape of a run (known without a read: the trigger made it)."""
        previous = self._shapes.pop(run_id, None)
        if previous is not None:
            self._tasks -= len(previous.tasks)
        self._shapes[run_id] = shape
        self._tasks += len(shape.tasks)
        while self._tasks > RUN_SHAPE_CACHE_TASKS and len(self._shapes) > 1:
            _, dropped = self._shapes.popitem(last=False)
            self._tasks -= len(dropped.tasks)
        return shape


class Expiring:
    """Agents whose count of leases expired in a row may be above zero, each with how many
    expiry writes have added to it: only their successes write a reset, so the completions of
    healthy agents cost nothing more."""

    def __init__(self) -> None:
        self._writes: dict[str, int] = {}

    def noted(self, agent_ids: Iterable[str]) -> None:
        """Expiries of these agents' leases are being written (noted before their commit: an
        agent noted in vain costs one needless reset)."""
        for agent_id in agent_ids:
            self._writes[agent_id] = self._writes.get(agent_id, 0) + 1

    def among(self, agent_ids: Iterable[str]) -> dict[str, int]:
        """Those of these agents whose counts may be above zero, with their expiry writes."""
        return {
            agent_id: self._writes[agent_id] for agent_id in agent_ids if agent_id in self._writes
        }

    def reset(self, seen: dict[str, int]) -> None:
        """Resets of these agents' counts committed: forget those no expiry was written for
        since the reset read them (where writers run concurrently, one may have been)."""
        for agent_id, writes in seen.items():
            if self._writes.get(agent_id) == writes:
                del self._writes[agent_id]


class Shared:
    """What every repository of one store shares (see the module docstring): one writer and
    database for the transactions, the state machine, and the caches of what never changes."""

    def __init__(
        self, database: Database, writer: Writer, rules: Rules, replica_id: str | None = None
    ) -> None:
        self.database = database
        self.writer = writer
        self.rules = rules
        """The state machine: every outcome a write records is its decision."""
        self.replica_id = new_id() if replica_id is None else replica_id
        """The replica this store writes for: the holder of the streams it opens, and the only
        one that may assign tasks to their agents (set again by `Replicas.join`)."""
        self.shapes = RunShapes()
        self.expiring = Expiring()
        # SQLite has one writer, so nothing can change a run between the reads and writes of an
        # operation; where writers run concurrently (PostgreSQL) the run's row is locked first.
        self.lock_runs = database.dialect != "sqlite"

    def lock_runs_of(self, conn: Connection, task_ids: list[str]) -> None:
        """Where writers run concurrently (PostgreSQL), lock the runs of these tasks before any
        of their tasks: every write that moves a run locks the run first, in run id order, so
        two writes never wait for each other's locks in opposite orders."""
        if self.lock_runs and task_ids:
            # On the driver's cursor, as the hot statements are: through `Connection.execute`
            # it costs the server's CPU more than twice as much (asyncpg). The
            # completions of a batch, the hottest of these writes, lock their runs in the
            # statement that reads their tasks (`tasks.SIBLINGS_LOCKING_RUNS`).
            LOCK_RUNS_OF_TASKS.rows(conn, {"b_task_ids": sorted(task_ids)})

    def reset_connections(self, conn: Connection, now: datetime) -> None:
        """No stream is open anywhere (one server starts on its database, or the first replica
        of a deployment): every agent is disconnected, and every agent that was connected, or
        still within its grace, starts a fresh grace period now (the outage was the server's,
        not the agent's)."""
        conn.execute(
            update(AGENTS)
            .where(or_(AGENTS.c.connected.is_(True), AGENTS.c.disconnected_at.is_not(None)))
            .values(connected=False, replica_id=None, disconnected_at=now)
        )
        expiring = select(AGENTS.c.agent_id).where(AGENTS.c.lease_expiries > 0)
        self.expiring.noted(conn.execute(expiring).scalars())

    async def probe(self) -> None:
        """A read, then a write through the writer, that change nothing: whether storage answers
        and takes writes (see `StorageHealth.watch`). Raises the `StorageFault` of a failure."""
        await self.read(_probe_read)
        await self.writer.submit(_probe_write)

    async def write(self, op: Callable[[Connection], T], on_commit: OnCommit[T] | None = None) -> T:
        """Run `op` in the next write batch; its result once committed, after `on_commit` had
        it in commit order."""

        def run(tx: Tx) -> T:
            value = op(tx.conn)
            if on_commit is not None:
                tx.after_commit(lambda: on_commit(value))
            return value

        return await self.writer.submit(run)

    async def write_moving(
        self, op: Callable[[Connection], tuple[T, Effects]], on_commit: OnCommit[Effects]
    ) -> T:
        """Run `op`, a write that moves tasks, in the next batch: its effects go to the batch
        (for the placement before its commit) and to `on_commit` once committed; its caller
        gets the rest of its result."""

        def run(tx: Tx) -> T:
            answer, effects = op(tx.conn)
            tx.apply_after_commit(effects, on_commit)
            return answer

        return await self.writer.submit(run)

    async def read(self, op: Callable[[Connection], T]) -> T:
        """Run `op` in a read transaction of its own (a consistent snapshot)."""
        return await self.database.run(op, write=False)
