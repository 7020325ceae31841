"""Tasks on the move: the queue at start, assignments, completions (set-based), failures with
their retries, leases, lost agents and deregistered ones."""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, any_, bindparam, func, or_, select, update
from sqlalchemy.engine import Connection

from opscore.domain import graph, idempotency, waiting
from opscore.domain.errors import (
    FailedPrecondition,
    NotFound,
    OpsCoreError,
    Resource,
    ResultConflict,
)
from opscore.domain.models import (
    Assignment,
    Cancellation,
    Effects,
    Hold,
    JsonObject,
    ReadyTask,
    TaskState,
)
from opscore.domain.ports import Assigned, OnCommit, Place, TaskResult
from opscore.store import assignments, rows
from opscore.store.changes import SUCCEED_TASK, Changes, apply_transition, graph_of, states_of
from opscore.store.prepared import Prepared
from opscore.store.queries.agents import agent_of, delete_agent, quarantine, reset_expiries
from opscore.store.queries.base import (
    READY_TASK_COLUMNS,
    RUNS_OF_TASKS,
    RUNS_OF_TASKS_FOR_UPDATE,
    StoreBase,
)
from opscore.store.queries.runs import tasks_of
from opscore.store.rows import RunShape
from opscore.store.tables import AGENTS, TASK_IS_ASSIGNED, TASK_IS_QUEUED, TASKS
from opscore.store.writer import Followup, Tx

_TIMED_OUT = "timed out"
_COUNT_EXPIRIES = (
    update(AGENTS)
    .where(AGENTS.c.agent_id == bindparam("b_agent_id"))
    .values(lease_expiries=AGENTS.c.lease_expiries + bindparam("b_count"))
)
_OUTPUTS = select(TASKS.c.task_id, TASKS.c.output).where(
    TASKS.c.task_id.in_(bindparam("b_task_ids", expanding=True))
)
_HELD_NOT_PINNED = (
    select(*READY_TASK_COLUMNS, TASKS.c.attempt)
    .where(
        TASKS.c.agent_id == bindparam("b_agent_id"),
        TASK_IS_ASSIGNED,
        or_(
            TASKS.c.pinned_agent_id.is_(None),
            TASKS.c.pinned_agent_id != bindparam("b_agent_id"),
        ),
    )
    .order_by(TASKS.c.assigned_at, TASKS.c.task_id)
    .with_for_update()
)
_WAITING_STATES = (TaskState.QUEUED.value, TaskState.ASSIGNED.value)
# Unfinished tasks pinned to an agent that could still run: those queued for it or held by it.
_WAITING_FOR_PINNED = (
    select(TASKS.c.task_id)
    .where(
        TASKS.c.pinned_agent_id == bindparam("b_agent_id"),
        TASKS.c.state.in_(_WAITING_STATES),
    )
    .order_by(TASKS.c.run_id, TASKS.c.position)
)
_HELD_BY_OR_PINNED_TO = select(TASKS.c.task_id).where(
    or_(
        and_(TASKS.c.agent_id == bindparam("b_agent_id"), TASK_IS_ASSIGNED),
        and_(
            TASKS.c.pinned_agent_id == bindparam("b_agent_id"),
            TASKS.c.state.in_(_WAITING_STATES),
        ),
    )
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
# (see `_lock_runs_of`). Where statements cost their planning as well (this machine's CI server
# planned each one at every execution), one statement instead of two took chains at 8 agents from
# 0.289 to 0.331 and from 0.248 to 0.318 of the ceiling (README).
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
# 100,000 rows in 0.62-0.67 s against 1.02-1.07 s through `Connection.execute` with every label
# decoded (the same rows, alternating).
QUEUE = Prepared(
    "tasks.queue",
    select(*READY_TASK_COLUMNS).where(TASK_IS_QUEUED).order_by(TASKS.c.queued_at, TASKS.c.task_id),
    samples=[{}],
)


class TaskQueries(StoreBase):
    """The store's methods for tasks."""

    async def load_queue(self) -> list[ReadyTask]:
        """Every queued task, in the order they became ready (each with its retry time): the
        dispatcher's index at start."""

        def op(conn: Connection) -> list[ReadyTask]:
            return [rows.ready_task(row) for row in QUEUE.rows(conn, {})]

        return await self._read(op)

    async def assign(
        self,
        pairs: Sequence[tuple[ReadyTask, str]],
        now: datetime,
        default_timeout: timedelta,
        on_commit: OnCommit[list[Assignment | None]],
    ) -> list[Assignment | None]:
        """Hand each queued task to its agent as a new attempt, under a lease that ends at its
        timeout. A task that is no longer queued (cancelled, skipped meanwhile) gives None in its
        place and is left alone."""
        return await self._write(
            lambda conn: assignments.assign(conn, pairs, now, default_timeout, self._run_shapes),
            on_commit,
        )

    def assign_before_commit(
        self,
        place: Place,
        on_commit: Assigned,
        now: Callable[[], datetime],
        default_timeout: timedelta,
    ) -> None:
        """Let every write batch place the tasks its requests made ready (and fill the slots
        they freed) in its own transaction: `place` matches them (see `Dispatcher.place`), the
        assignments are written as by `assign`, and `on_commit` gets them once committed."""

        def before_commit(
            conn: Connection,
            effects: list[Effects],
            followups: list[Followup],
            notes: dict[str, Any],
        ) -> None:
            queued = [task for noted in effects for task in noted.queued]
            released = [
                (hold.agent_id, hold.task_id) for noted in effects for hold in noted.released
            ]
            pairs, undo = place(queued, released)
            if not pairs:
                return
            tx = Tx(conn, notes)
            # Registered before writing: if anything below or the commit fails, the writer
            # gives the placements back (on the event loop).
            followups.append(Followup(tx, undo))
            written = assignments.assign(
                conn, pairs, now(), default_timeout, self._run_shapes, assignments.notes_of(tx)
            )
            tx.after_commit(lambda: on_commit(pairs, written))

        self._writer.before_commit = before_commit

    async def complete_task(self, result: TaskResult) -> Effects:
        """Record the output of the attempt the agent holds and queue the dependents that became
        ready. The same result again, once recorded, changes nothing and is not an error.
        Set-based: every completion of a batch is written by one `_complete_tasks`."""
        effects: Effects = await self._writer.submit_grouped(self._complete_tasks, result)
        return effects

    def _complete_tasks(
        self, conn: Connection, requests: Sequence[tuple[Tx, TaskResult]]
    ) -> list[Effects | OpsCoreError]:
        # One read for the whole batch: the tasks of the runs these results belong to that
        # have not succeeded (the runs locked first where writers are concurrent, in the order
        # every write locks them).
        wanted = {result.task_id for _, result in requests}
        task_ids = sorted(wanted)
        siblings = SIBLINGS_LOCKING_RUNS if self._lock_runs else _SIBLINGS
        found_rows: dict[str, dict[str, Any]] = {}
        held: dict[str, _Held] = {}
        for found in siblings.rows(conn, {"b_task_ids": task_ids}):
            found_rows.setdefault(found.run_id, {})[found.name] = found
            if found.task_id in wanted:
                held[found.task_id] = _Held.of(found)
        outcomes: list[Effects | OpsCoreError] = []
        accepted: list[tuple[int, _Held, TaskResult]] = []
        repeated: list[tuple[int, TaskResult]] = []
        batch_outputs: dict[str, JsonObject] = {}
        for _, result in requests:
            row = held.get(result.task_id)
            try:
                if row is None:
                    raise NotFound(Resource.TASK, result.task_id)
                holds = _check_held(row, result.agent_id, result.attempt, _succeeded)
            except OpsCoreError as error:
                outcomes.append(error)
                continue
            if holds:
                accepted.append((len(outcomes), row, result))
                # A second completion of this task in the batch sees it recorded.
                held[result.task_id] = dataclasses.replace(row, state=TaskState.SUCCEEDED.value)
                batch_outputs[result.task_id] = result.output
            else:
                repeated.append((len(outcomes), result))
            outcomes.append(Effects())
        if repeated:
            _check_repeated_outputs(conn, repeated, batch_outputs, outcomes)
        if accepted:
            shapes = self._run_shapes(conn, {row.run_id for _, row, _ in accepted})
            runs = {
                run_id: _RunNow.of(shape, found_rows[run_id]) for run_id, shape in shapes.items()
            }
            changes = Changes(conn)
            recorded = assignments.notes_of(requests[0][0]).recorded
            for index, row, result in accepted:
                outcomes[index] = _complete(
                    changes, shapes[row.run_id], runs[row.run_id], row, result
                )
                recorded[row.run_id, row.name] = result.output
            changes.flush()
            self._reset_expiries(conn, requests[0][0], [result for _, _, result in accepted])
        for (tx, result), outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, Effects):
                tx.note_effects(outcome)
                tx.after_commit(functools.partial(result.on_commit, outcome))
        return outcomes

    def _reset_expiries(self, conn: Connection, tx: Tx, succeeded: list[TaskResult]) -> None:
        """Agents that succeeded start their count of lease expiries in a row again; written
        only for those whose count may be above zero."""
        seen = {
            result.agent_id: self._expiring[result.agent_id]
            for result in succeeded
            if result.agent_id in self._expiring
        }
        if seen:
            reset_expiries(conn, sorted(seen))
            tx.after_commit(functools.partial(self._forget_expiring, seen))

    async def fail_task(
        self,
        task_id: str,
        agent_id: str,
        attempt: int,
        error: str,
        retryable: bool,
        now: datetime,
        on_commit: OnCommit[Effects],
    ) -> Effects:
        """Record the failure of the attempt the agent holds: retried under the task's policy
        when `retryable` and attempts remain, else final. The same failure again, once recorded,
        changes nothing."""

        def op(conn: Connection) -> Effects:
            self._lock_runs_of(conn, [task_id])
            row = _held_task(conn, task_id, agent_id, attempt, _failed_with(error))
            if row is None:
                return Effects()
            return self._fail_attempt(conn, row, error, retryable=retryable, reported=True, now=now)

        return await self._write(op, on_commit)

    async def extend_lease(
        self, task_id: str, agent_id: str, attempt: int, extend_by: timedelta, now: datetime
    ) -> datetime:
        """Move the lease of the attempt the agent holds to at least `now + extend_by` (never
        earlier). FAILED_PRECONDITION unless the agent holds that attempt."""

        def op(conn: Connection) -> datetime:
            row = _held_task(conn, task_id, agent_id, attempt, _never_recorded)
            deadline: datetime = max(row.deadline, now + extend_by)
            conn.execute(update(TASKS).where(TASKS.c.task_id == task_id).values(deadline=deadline))
            return deadline

        return await self._write(op)

    async def next_timers(self) -> tuple[datetime | None, datetime | None]:
        """The earliest lease deadline of an assigned task, and the earliest grace start of a
        disconnected agent: both one look-up in an index, never a scan."""

        def op(conn: Connection) -> tuple[datetime | None, datetime | None]:
            deadline = (
                conn.execute(select(func.min(TASKS.c.deadline)).where(TASK_IS_ASSIGNED))
            ).scalar_one_or_none()
            disconnected = (
                conn.execute(
                    select(func.min(AGENTS.c.disconnected_at)).where(AGENTS.c.connected.is_(False))
                )
            ).scalar_one_or_none()
            return _aware(deadline), _aware(disconnected)

        return await self._read(op)

    async def expire_leases(
        self, now: datetime, quarantine_after: int, on_commit: OnCommit[Effects], limit: int = 500
    ) -> Effects:
        """Every attempt whose lease has ended counts as failed with "timed out" (retryable);
        its agent is told to stop. Each expiry adds to its agent's count of expiries in a row,
        and an agent whose count reaches `quarantine_after` is quarantined: put in ERROR, with
        the reason in its state detail, until it reports IDLE or registers again."""

        def op(conn: Connection) -> Effects:
            due = (
                conn.execute(
                    select(TASKS.c.task_id)
                    .where(TASK_IS_ASSIGNED, TASKS.c.deadline <= now)
                    .order_by(TASKS.c.deadline)
                    .limit(limit)
                )
            ).scalars()
            effects = self._fail_held(conn, list(due), _TIMED_OUT, now)
            # (A run failing with a task also cancels its other tasks, for another reason.)
            expired = Counter(
                cancellation.agent_id
                for cancellation in effects.cancelled
                if cancellation.reason == _TIMED_OUT
            )
            if expired:
                self._note_expiring(expired)
                conn.execute(
                    _COUNT_EXPIRIES,
                    [{"b_agent_id": agent_id, "b_count": n} for agent_id, n in expired.items()],
                )
                effects.quarantined = quarantine(conn, list(expired), quarantine_after)
            return effects

        return await self._write(op, on_commit)

    async def lose_agents(
        self, cutoff: datetime, now: datetime, on_commit: OnCommit[Effects]
    ) -> Effects:
        """Agents disconnected since `cutoff` or earlier are lost: every attempt they hold
        counts as failed with "agent lost" (retryable)."""

        def op(conn: Connection) -> Effects:
            lost = (
                conn.execute(
                    select(AGENTS.c.agent_id).where(
                        AGENTS.c.connected.is_(False), AGENTS.c.disconnected_at <= cutoff
                    )
                )
            ).scalars()
            lost_ids = list(lost)
            if not lost_ids:
                return Effects()
            conn.execute(
                update(AGENTS).where(AGENTS.c.agent_id.in_(lost_ids)).values(disconnected_at=None)
            )
            held = (
                conn.execute(
                    select(TASKS.c.task_id)
                    .where(
                        TASKS.c.agent_id.in_(lost_ids),
                        TASK_IS_ASSIGNED,
                    )
                    .order_by(TASKS.c.assigned_at)
                )
            ).scalars()
            return self._fail_held(conn, list(held), "agent lost", now)

        return await self._write(op, on_commit)

    async def deregister_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Effects]
    ) -> Effects:
        """Remove the agent. Every task it held goes back to the queue for another attempt,
        except the tasks pinned to it: no other agent may take those, so each one held or
        queued fails finally (its run follows the usual rules: a fallback, pinned too, fails
        in turn; otherwise the run fails)."""

        def op(conn: Connection) -> Effects:
            agent_of(conn, agent_id)
            # The runs first, as every write that moves runs locks them (`_lock_runs_of`).
            moved = conn.execute(_HELD_BY_OR_PINNED_TO, {"b_agent_id": agent_id}).scalars()
            self._lock_runs_of(conn, list(moved))
            effects = Effects()
            held = conn.execute(_HELD_NOT_PINNED, {"b_agent_id": agent_id})
            for row in held:
                effects.released.append(Hold(agent_id, row.task_id, row.run_id, row.attempt))
                effects.queued.append(rows.ready_task(row))
            if effects.queued:
                conn.execute(
                    update(TASKS)
                    .where(TASKS.c.task_id.in_([task.task_id for task in effects.queued]))
                    .values(state=TaskState.QUEUED.value, queued_at=now, deadline=None)
                )
            effects.merge(self._fail_pinned(conn, agent_id, now))
            delete_agent(conn, agent_id)
            return effects

        return await self._write(op, on_commit)

    def _fail_pinned(self, conn: Connection, agent_id: str, now: datetime) -> Effects:
        """Fail finally every unfinished task pinned to `agent_id` that waits for it or that it
        holds, and the fallbacks that this queues, until none is left."""
        error = waiting.DEREGISTERED.format(agent_id=agent_id)
        effects = Effects()
        pinned = {"b_agent_id": agent_id}
        while task_ids := list(conn.execute(_WAITING_FOR_PINNED, pinned).scalars()):
            self._lock_runs_of(conn, task_ids)
            for task_id in task_ids:
                row = conn.execute(_TASK_FOR_UPDATE, {"b_task_id": task_id}).first()
                # Skipped meanwhile, as another of its run's tasks failed the run.
                if row is None or row.state not in _WAITING_STATES:
                    continue
                effects.merge(
                    self._fail_attempt(conn, row, error, retryable=False, reported=False, now=now)
                )
        # A fallback queued and failed in this same write never reached the dispatcher.
        gone = set(effects.unqueued) & {task.task_id for task in effects.queued}
        effects.queued = [task for task in effects.queued if task.task_id not in gone]
        effects.unqueued = [task_id for task_id in effects.unqueued if task_id not in gone]
        return effects

    def _fail_held(
        self, conn: Connection, task_ids: list[str], error: str, now: datetime
    ) -> Effects:
        """Fail the current attempt of each task (retryable), telling its agent to stop."""
        effects = Effects()
        self._lock_runs_of(conn, task_ids)
        for task_id in task_ids:
            row = (
                conn.execute(
                    select(TASKS)
                    .where(TASKS.c.task_id == task_id, TASKS.c.state == TaskState.ASSIGNED.value)
                    .with_for_update()
                )
            ).first()
            if row is None:
                continue
            effects.merge(
                self._fail_attempt(conn, row, error, retryable=True, reported=False, now=now)
            )
            effects.cancelled.append(
                Cancellation(row.agent_id, row.task_id, row.run_id, row.attempt, error)
            )
        return effects

    def _fail_attempt(
        self,
        conn: Connection,
        row: Any,
        error: str,
        *,
        retryable: bool,
        reported: bool,
        now: datetime,
    ) -> Effects:
        """A held attempt failed (`reported` by its agent, or declared by the server): queue
        the task again after its backoff while its policy allows, or fail it finally (its
        fallback takes over, or the run fails)."""
        policy = self._retry.resolve(rows.retry_from_json(row.retry_policy))
        # Callers lock the run first (`_lock_runs_of`), so its tasks cannot move meanwhile.
        tasks = tasks_of(conn, [row.run_id]).get(row.run_id, [])
        if retryable and policy.may_retry(row.attempt):
            not_before = now + policy.delay(row.attempt, self._rng)
            conn.execute(
                update(TASKS)
                .where(TASKS.c.task_id == row.task_id)
                .values(
                    state=TaskState.QUEUED.value,
                    error=error,
                    error_reported=reported,
                    queued_at=now,
                    not_before=not_before,
                )
            )
            task = next(task for task in tasks if task.task_id == row.task_id)
            effects = Effects(queued=[task.ready(not_before)])
        else:
            conn.execute(
                update(TASKS)
                .where(TASKS.c.task_id == row.task_id)
                .values(error=error, error_reported=reported)
            )
            changes = Changes(conn)
            transition = graph.fail(graph_of(tasks), states_of(tasks), row.name)
            effects = apply_transition(changes, row.run_id, tasks, transition, now)
            changes.flush()
        if row.state == TaskState.ASSIGNED.value:  # not a queued task failed by the server
            effects.released.append(Hold(row.agent_id, row.task_id, row.run_id, row.attempt))
        return effects


def _aware(value: datetime | None) -> datetime | None:
    """Aggregates bypass the column type on SQLite: give a bare MIN() its time zone back."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _succeeded(row: Any) -> bool:
    return bool(row.state == TaskState.SUCCEEDED.value)


def _failed_with(error: str) -> Callable[[Any], bool]:
    """Whether this very failure was recorded: the task failed, or waits for its retry, with
    this error as its holder reported it (an attempt the server failed never matches)."""

    def recorded(row: Any) -> bool:
        return _failed_as_reported(row) and row.error == error

    return recorded


def _failed_as_reported(row: Any) -> bool:
    """Whether the task failed, or waits for its retry, after its holder reported a failure."""
    waiting = (TaskState.FAILED.value, TaskState.QUEUED.value)
    return bool(row.state in waiting and row.error_reported)


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


def _never_recorded(_row: Any) -> bool:
    return False


def _held_task(
    conn: Connection,
    task_id: str,
    agent_id: str,
    attempt: int,
    recorded: Callable[[Any], bool],
) -> Any:
    """The task row, locked, if `agent_id` holds `attempt` of it; None if the result was
    already `recorded` for that attempt (a retried call); see `_check_held`."""
    row = conn.execute(_TASK_FOR_UPDATE, {"b_task_id": task_id}).first()
    if row is None:
        raise NotFound(Resource.TASK, task_id)
    return row if _check_held(row, agent_id, attempt, recorded) else None


def _check_held(row: Any, agent_id: str, attempt: int, recorded: Callable[[Any], bool]) -> bool:
    """True if `agent_id` holds `attempt` of the task in `row`; False if that holder's result
    was already `recorded` (a retried call: nothing to do); FAILED_PRECONDITION for any other
    holder, attempt or state."""
    holder = row.agent_id == agent_id and row.attempt == attempt
    if holder and row.state == TaskState.ASSIGNED.value:
        return True
    if holder and recorded(row):
        return False
    if holder and row.state == TaskState.SUCCEEDED.value:
        raise ResultConflict(row.task_id, "it succeeded")
    if holder and _failed_as_reported(row):
        raise ResultConflict(row.task_id, "it failed")
    if row.state == TaskState.ASSIGNED.value or not holder:
        raise FailedPrecondition(
            f"agent {agent_id!r} does not hold attempt {attempt} of task {row.task_id!r}"
        )
    raise FailedPrecondition(f"task {row.task_id!r} is {row.state}, not assigned")


@dataclass(frozen=True, slots=True)
class _Held:
    """What checking a result needs of its task's row; a set-based write updates it in memory
    as it records results, so a second result for the task in the same batch sees the first."""

    task_id: str
    run_id: str
    name: str
    agent_id: str | None
    attempt: int
    state: str
    error: str
    error_reported: bool

    @classmethod
    def of(cls, row: Any) -> _Held:
        return cls(
            row.task_id,
            row.run_id,
            row.name,
            row.agent_id,
            row.attempt,
            row.state,
            row.error,
            row.error_reported,
        )


@dataclass(frozen=True, slots=True)
class _RunNow:
    """The current state of a run's tasks, by name, as a batch of completions moves it."""

    rows: dict[str, Any]
    """The row read (`_SIBLINGS`, `SIBLINGS_LOCKING_RUNS`) of each task that had not succeeded,
    by name."""
    states: dict[str, TaskState]
    """Each task's state, following the batch's completions."""

    @classmethod
    def of(cls, shape: RunShape, found: dict[str, Any]) -> _RunNow:
        """The run of `shape` whose tasks not found among its rows have succeeded."""
        states = dict.fromkeys(shape.graph, TaskState.SUCCEEDED)
        for name, row in found.items():
            states[name] = rows.TASK_STATES[row.state]
        return cls(found, states)


def _complete(
    changes: Changes, shape: rows.RunShape, run: _RunNow, row: _Held, result: TaskResult
) -> Effects:
    """Record one accepted completion: the task's success with its output, and the rest of the
    transition of its run's graph. `run` follows the batch, so the next completion in the same
    run starts from this one's outcome."""
    transition = graph.succeed(shape.graph, run.states, row.name)
    changes.add(
        SUCCEED_TASK,
        row.task_id,
        {"b_task_id": row.task_id, "b_output": result.output, "b_now": result.now},
    )
    rest = graph.Transition(
        {name: state for name, state in transition.tasks.items() if name != row.name},
        transition.run_state,
    )
    moved = [shape.node(row.run_id, run.rows[name], run.states[name]) for name in rest.tasks]
    effects = apply_transition(changes, row.run_id, moved, rest, result.now)
    effects.released.append(Hold(result.agent_id, row.task_id, row.run_id, result.attempt))
    run.states.update(transition.tasks)
    return effects
