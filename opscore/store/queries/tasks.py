"""Tasks on the move: the queue at start, assignments, and the results agents report
(completions set-based, failures with their retries, lease extensions)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, any_, bindparam, func, or_, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection

from opscore.domain import idempotency
from opscore.domain.errors import NotFound, OpsCoreError, Resource
from opscore.domain.models import Effects, JsonObject, Placed, ReadyTask, TaskState
from opscore.domain.ports import Assigned, Claimed, OnCommit, Place, TaskResult, Want
from opscore.domain.state import Reporting, RunNow, TaskNow
from opscore.store import assignments, rows
from opscore.store.changes import Changes, record, write_decision
from opscore.store.prepared import Prepared
from opscore.store.queries.agents import reset_expiries
from opscore.store.queries.base import (
    READY_TASK_COLUMNS,
    RUNS_OF_TASKS,
    RUNS_OF_TASKS_FOR_UPDATE,
    Shared,
    run_now,
)
from opscore.store.tables import TASK_IS_QUEUED, TASKS
from opscore.store.writer import Batch, BeforeCommit, Followup, Tx

_OUTPUTS = select(TASKS.c.task_id, TASKS.c.output).where(
    TASKS.c.task_id.in_(bindparam("b_task_ids", expanding=True))
)
_TASK_FOR_UPDATE = select(TASKS).where(TASKS.c.task_id == bindparam("b_task_id")).with_for_update()
# The current state of the tasks of the runs of some tasks: those tasks, and every other task of
# their runs that has not succeeded (one that has never changes again, so a run's completions
# read fewer rows as it goes). What never changes of them is read once per run (`base._RUN_SHAPES`)
# and kept (see `rows.RunShape`).
_SIBLING_COLUMNS = (
    TASKS.c.task_id,
    TASKS.c.run_id,
    TASKS.c.name,
    TASKS.c.state,
    TASKS.c.attempt,
    TASKS.c.agent_id,
    TASKS.c.error,
    TASKS.c.error_reported,
)
"""What a task's `TaskNow` is read from."""
_NOT_SUCCEEDED_OR_ASKED = or_(
    TASKS.c.state != TaskState.SUCCEEDED.value,
    TASKS.c.task_id.in_(bindparam("b_task_ids", expanding=True)),
)
# As SQLite reads them: its one writer has nothing to lock.
_SIBLINGS_SAMPLES = [{"b_task_ids": ["b"]}, {"b_task_ids": ["a", "z"]}, {"b_task_ids": ["z"]}]
_SIBLINGS = Prepared(
    "tasks.siblings",
    select(*_SIBLING_COLUMNS)
    .where(TASKS.c.run_id.in_(RUNS_OF_TASKS), _NOT_SUCCEEDED_OR_ASKED)
    .order_by(TASKS.c.run_id, TASKS.c.position),
    samples=_SIBLINGS_SAMPLES,
)
_LOCKED_RUNS = RUNS_OF_TASKS_FOR_UPDATE.cte("locked_runs")
# The same where writers run concurrently (PostgreSQL), the runs and their tasks locked in one
# round trip instead of two: the runs in run id order by an InitPlan, which PostgreSQL runs whole
# before the scan of the tasks begins, so every write still locks runs before any of their tasks
# (see `Shared.lock_runs_of`). A round trip saved on every completion batch is worth more than
# the subquery costs (see the performance log).
SIBLINGS_LOCKING_RUNS = Prepared(
    "tasks.siblings_locking_runs",
    select(*_SIBLING_COLUMNS)
    .where(
        # PostgreSQL's ARRAY(subquery): one value, worked out once before the scan.
        TASKS.c.run_id == any_(func.array(select(_LOCKED_RUNS.c.run_id).scalar_subquery())),
        _NOT_SUCCEEDED_OR_ASKED,
    )
    .order_by(TASKS.c.run_id, TASKS.c.position)
    .with_for_update(of=TASKS),
    samples=_SIBLINGS_SAMPLES,
    dialects=("postgresql",),
)


# Every queued task in the order they became ready: the dispatcher's index at start, read before
# the server is SERVING. On the driver's cursor, labels as JSON text decoded through a cache:
# tasks of one definition share their labels, and a restart reads every queued task.
QUEUE = Prepared(
    "tasks.queue",
    select(*READY_TASK_COLUMNS).where(TASK_IS_QUEUED).order_by(TASKS.c.queued_at, TASKS.c.task_id),
    samples=[{}],
)


def _claimable(want: Want, now: datetime, locking: bool, *, due: bool, limit: int) -> Select[Any]:
    """The earliest queued tasks of `want`'s capability that its agents may take, at most
    `limit`: those due `now`, or (not `due`) those still waiting out a backoff; locked (where
    writers run concurrently) skipping rows another writer holds. Due and waiting tasks are
    claimed apart: ahead of due ones in ready order, waiting ones would take the claim's places.
    The labels are compared by PostgreSQL (JSONB containment) where it can, and by the caller
    in any case."""
    waited = TASKS.c.not_before
    query = select(*READY_TASK_COLUMNS).where(
        TASK_IS_QUEUED,
        TASKS.c.capability == want.capability,
        or_(waited.is_(None), waited <= now) if due else waited > now,
        or_(
            TASKS.c.pinned_agent_id.is_(None),
            TASKS.c.pinned_agent_id == "",
            TASKS.c.pinned_agent_id.in_(want.agent_ids),
        ),
    )
    if locking:
        labels = type_coerce(TASKS.c.labels, JSONB)
        query = query.where(
            or_(*(labels.contained_by(type_coerce(found, JSONB)) for found in want.labels))
        ).with_for_update(of=TASKS, skip_locked=True)
    return query.order_by(TASKS.c.queued_at, TASKS.c.task_id).limit(limit)


class Tasks:
    """The store's repository of tasks: the queue, assignments and the results agents
    report."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._rules = shared.rules

    async def load_queue(self) -> list[ReadyTask]:
        """Every queued task, in the order they became ready (each with its retry time): the
        dispatcher's index at start."""

        def op(conn: Connection) -> list[ReadyTask]:
            return [rows.ready_task(row) for row in QUEUE.rows(conn, {})]

        return await self._shared.read(op)

    async def assign(
        self,
        pairs: Sequence[tuple[ReadyTask, str]],
        now: datetime,
        on_commit: OnCommit[list[Placed]],
    ) -> list[Placed]:
        """Hand each queued task to its agent as a new attempt, under a lease that ends at its
        timeout. A task that is no longer queued (cancelled, skipped meanwhile), or whose agent
        no longer takes work, gives the reason in its place (`Unassigned`) and is left alone."""
        shared = self._shared
        return await shared.write(
            lambda conn: assignments.assign(
                conn, pairs, now, self._rules, shared.shapes.of, shared.replica_id
            ),
            on_commit,
        )

    def placement(
        self, place: Place, on_commit: Assigned, now: Callable[[], datetime]
    ) -> BeforeCommit:
        """What every write batch does before it commits (see `Writer.run`): place the tasks
        its requests made ready, and fill the slots they freed, in its own transaction. `place`
        matches them as if the batch had committed and reserves the matches; the assignments
        are written as by `assign`, and `on_commit` gets them once committed."""

        def before_commit(batch: Batch, followups: list[Followup]) -> None:
            queued = [task for noted in batch.effects for task in noted.queued]
            released = [
                (hold.agent_id, hold.task_id) for noted in batch.effects for hold in noted.released
            ]
            pairs, undo = place(queued, released)
            if not pairs:
                return
            tx = Tx(batch)
            # Registered before writing: if anything below or the commit fails, the writer
            # gives the placements back (on the event loop).
            followups.append(Followup(tx, undo))
            shared = self._shared
            written = assignments.assign(
                batch.conn, pairs, now(), self._rules, shared.shapes.of, shared.replica_id, batch
            )
            tx.after_commit(lambda: on_commit(pairs, written))

        return before_commit

    async def claim(
        self, wants: list[Want], now: datetime, place: Place, on_commit: Assigned
    ) -> Claimed:
        """Lock the earliest queued tasks each want asks for, skipping rows other writers hold
        (`FOR UPDATE SKIP LOCKED`: replicas claiming at once take different tasks), match them
        with `place` as a write's own tasks are matched, and assign the matches in the same
        transaction. A want `ahead` also locks, in the places left, tasks not yet due, which
        `place` keeps until they are. If the write fails, or runs again on its own, what `place`
        reserved is given back first."""
        shared = self._shared
        reserved: list[Callable[[], None]] = []

        def give_back() -> None:
            while reserved:
                reserved.pop()()

        def op(tx: Tx) -> Claimed:
            give_back()
            found: dict[str, int] = {}
            locked: list[ReadyTask] = []
            for want in wants:
                claimable = functools.partial(_claimable, want, now, shared.lock_runs)
                rows_ = list(tx.conn.execute(claimable(due=True, limit=want.limit)).all())
                found[want.capability] = len(rows_)
                if want.ahead and len(rows_) < want.limit:
                    waiting = claimable(due=False, limit=want.limit - len(rows_))
                    rows_.extend(tx.conn.execute(waiting).all())
                locked.extend(
                    task
                    for task in map(rows.ready_task, rows_)
                    if any(task.fits(labels) for labels in want.labels)
                )
            pairs, undo = place(locked, [])
            reserved.append(undo)
            placed = (
                assignments.assign(
                    tx.conn, pairs, now, self._rules, shared.shapes.of, shared.replica_id
                )
                if pairs
                else []
            )

            def committed() -> None:
                reserved.clear()
                on_commit(pairs, placed)

            tx.after_commit(committed)
            taken = {task.task_id for task, _ in pairs}
            unassigned = [task for task in locked if task.task_id not in taken]
            return Claimed(found, len(pairs), unassigned)

        try:
            return await shared.writer.submit(op)
        except BaseException:
            give_back()
            raise

    async def complete_task(self, result: TaskResult) -> None:
        """Record the output of the attempt the agent holds and queue the dependents that became
        ready. The same result again, once recorded, changes nothing and is not an error.
        Set-based: every completion of a batch is written by one `_complete_tasks`."""
        await self._shared.writer.submit_grouped(self._complete_tasks, result)

    def _complete_tasks(
        self, conn: Connection, requests: Sequence[tuple[Tx, TaskResult]]
    ) -> list[OpsCoreError | None]:
        # One read for the whole batch: the tasks of the runs these results belong to that
        # have not succeeded (the runs locked first where writers are concurrent, in the order
        # every write locks them).
        wanted = {result.task_id for _, result in requests}
        siblings = SIBLINGS_LOCKING_RUNS if self._shared.lock_runs else _SIBLINGS
        found: dict[str, list[TaskNow]] = {}
        held: dict[str, tuple[str, TaskNow]] = {}
        for row in siblings.rows(conn, {"b_task_ids": sorted(wanted)}):
            task = rows.task_now(row)
            found.setdefault(row.run_id, []).append(task)
            if task.task_id in wanted:
                held[task.task_id] = (row.run_id, task)
        outcomes: list[Effects | OpsCoreError] = []
        accepted: list[tuple[int, str, str, TaskResult]] = []
        repeated: list[tuple[int, TaskResult]] = []
        batch_outputs: dict[str, JsonObject] = {}
        for _, result in requests:
            try:
                if result.task_id not in held:
                    raise NotFound(Resource.TASK, result.task_id)
                run_id, task = held[result.task_id]
                holds = self._rules.holds(task, result.agent_id, result.attempt, Reporting.OUTPUT)
            except OpsCoreError as error:
                outcomes.append(error)
                continue
            if holds:
                accepted.append((len(outcomes), run_id, task.name, result))
                # A second completion of this task in the batch sees it recorded.
                held[result.task_id] = (run_id, task._replace(state=TaskState.SUCCEEDED))
                batch_outputs[result.task_id] = result.output
            else:
                repeated.append((len(outcomes), result))
            outcomes.append(Effects())
        if repeated:
            _check_repeated_outputs(conn, repeated, batch_outputs, outcomes)
        if accepted:
            shapes = self._shared.shapes.of(conn, {run_id for _, run_id, _, _ in accepted})
            runs = {
                run_id: RunNow.of(run_id, shape, found[run_id]) for run_id, shape in shapes.items()
            }
            changes = Changes(conn)
            recorded = requests[0][0].batch.recorded
            for index, run_id, name, result in accepted:
                decision = self._rules.succeed(runs[run_id], name, result.output)
                write_decision(changes, decision, result.now)
                outcomes[index] = decision.effects
                recorded[run_id, name] = result.output
            changes.flush()
            self._reset_expiries(conn, requests[0][0], [result for *_, result in accepted])
        for (tx, result), outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, Effects):
                tx.apply_after_commit(outcome, result.on_commit)
        return [outcome if isinstance(outcome, OpsCoreError) else None for outcome in outcomes]

    def _reset_expiries(self, conn: Connection, tx: Tx, succeeded: list[TaskResult]) -> None:
        """Agents that succeeded start their count of lease expiries in a row again; written
        only for those whose count may be above zero."""
        expiring = self._shared.expiring
        seen = expiring.among(result.agent_id for result in succeeded)
        if seen:
            reset_expiries(conn, sorted(seen))
            tx.after_commit(functools.partial(expiring.reset, seen))

    async def fail_task(
        self,
        task_id: str,
        agent_id: str,
        attempt: int,
        error: str,
        retryable: bool,
        now: datetime,
        on_commit: OnCommit[Effects],
    ) -> None:
        """Record the failure of the attempt the agent holds: retried under the task's policy
        when `retryable` and attempts remain, else final. The same failure again, once recorded,
        changes nothing."""

        def op(conn: Connection) -> tuple[None, Effects]:
            self._shared.lock_runs_of(conn, [task_id])
            row = self._held_task(conn, task_id, agent_id, attempt, Reporting.FAILURE, error)
            if row is None:
                return None, Effects()
            decision = self._rules.fail(
                run_now(conn, row.run_id),
                row.name,
                error,
                rows.retry_from_json(row.retry_policy),
                now,
                retryable=retryable,
                reported=True,
            )
            return None, record(conn, decision, now)

        await self._shared.write_moving(op, on_commit)

    async def extend_lease(
        self, task_id: str, agent_id: str, attempt: int, extend_by: timedelta, now: datetime
    ) -> datetime:
        """Move the lease of the attempt the agent holds to at least `now + extend_by` (never
        earlier). FAILED_PRECONDITION unless the agent holds that attempt."""

        def op(conn: Connection) -> datetime:
            row = self._held_task(conn, task_id, agent_id, attempt, Reporting.NOTHING)
            deadline: datetime = max(row.deadline, now + extend_by)
            conn.execute(update(TASKS).where(TASKS.c.task_id == task_id).values(deadline=deadline))
            return deadline

        return await self._shared.write(op)

    def _held_task(
        self,
        conn: Connection,
        task_id: str,
        agent_id: str,
        attempt: int,
        reporting: Reporting,
        error: str = "",
    ) -> Any:
        """The task row, locked, if `agent_id` holds `attempt` of it; None if what it reports
        was recorded already (a retried call); see `Rules.holds`."""
        row = conn.execute(_TASK_FOR_UPDATE, {"b_task_id": task_id}).first()
        if row is None:
            raise NotFound(Resource.TASK, task_id)
        holds = self._rules.holds(rows.task_now(row), agent_id, attempt, reporting, error)
        return row if holds else None


def _check_repeated_outputs(
    conn: Connection,
    repeated: list[tuple[int, TaskResult]],
    batch_outputs: dict[str, JsonObject],
    outcomes: list[Effects | OpsCoreError],
) -> None:
    """Refuse each completion repeated for a recorded one with another output (in its place
    in `outcomes`): recorded in this batch, or read (only repeats pay for reading outputs)."""
    stored_ids = sorted({r.task_id for _, r in repeated if r.task_id not in batch_outputs})
    stored = {row.task_id: row.output for row in conn.execute(_OUTPUTS, {"b_task_ids": stored_ids})}
    for index, result in repeated:
        recorded = batch_outputs.get(result.task_id, stored.get(result.task_id))
        try:
            idempotency.check_repeated_output(result.task_id, recorded, result.output)
        except OpsCoreError as error:
            outcomes[index] = error
