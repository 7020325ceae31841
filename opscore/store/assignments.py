"""Assignments: a queued task handed to an agent as a new attempt, and the message it is sent as.

`assign` writes a batch of them set-based (a fixed number of statements per batch); the store
calls it for the dispatcher's own batches and for the placements a write makes before it commits.
`context_of` reads what the message refers to (its dependencies, and for a fallback the task it
stands in for); the state machine composes the message (`Rules.assignment`). Reads take only the
columns the message needs: every column read costs its decoding on every row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from opscore.domain.models import (
    JsonObject,
    Placed,
    ReadyTask,
    ReportedState,
    RunState,
    TaskState,
    Unassigned,
)
from opscore.domain.ports import Rules
from opscore.domain.state import QueuedTask, RunShape, Sibling, Siblings
from opscore.store.changes import task_update
from opscore.store.prepared import SAMPLE_TIME, Prepared
from opscore.store.rows import TASK_STATES
from opscore.store.tables import AGENTS, RUNS, TASKS
from opscore.store.writer import Batch

# What an assignment needs of its task and of the tasks around it, and no more: every column
# read costs its decoding (JSON, times) on every row.
_QUEUED_TASKS_FOR_UPDATE = Prepared(
    "assignments.queued_tasks_for_update",
    # The rest of what an assignment needs of the task (its capability, dependencies, whether it
    # stands in for another) never changes: it comes from the run's shape.
    select(
        TASKS.c.task_id,
        TASKS.c.run_id,
        TASKS.c.name,
        TASKS.c.input,
        TASKS.c.attempt,
        TASKS.c.timeout_ms,
    )
    .where(
        TASKS.c.task_id.in_(bindparam("b_task_ids", expanding=True)),
        TASKS.c.state == TaskState.QUEUED.value,
    )
    # Replicas: a task another replica's write holds is not waited for (two writes locking
    # tasks in different orders would deadlock): it comes back as gone, and is claimed again
    # if that write leaves it queued (`Dispatch.gone`).
    .with_for_update(of=TASKS, skip_locked=True),
    samples=[{"b_task_ids": ["a", "b", "z"]}, {"b_task_ids": []}],
)
_ASSIGN = task_update(
    "assignments.assign",
    [
        {
            "b_task_id": "b",
            "b_attempt": 1,
            "b_agent_id": "g0",
            "b_now": SAMPLE_TIME,
            "b_deadline": SAMPLE_TIME,
        }
    ],
    state=TaskState.ASSIGNED.value,
    attempt=bindparam("b_attempt"),
    agent_id=bindparam("b_agent_id"),
    assigned_at=bindparam("b_now"),
    deadline=bindparam("b_deadline"),
    not_before=None,
)
_START_RUN = Prepared(
    "assignments.start_run",
    update(RUNS)
    .where(RUNS.c.run_id == bindparam("b_run_id"), RUNS.c.state == RunState.PENDING.value)
    .values(state=RunState.RUNNING.value, started_at=bindparam("b_now")),
    samples=[[{"b_run_id": run_id, "b_now": SAMPLE_TIME} for run_id in ("r1", "r2")]],
)
_SIBLING_COLUMNS = (
    TASKS.c.run_id,
    TASKS.c.name,
    TASKS.c.state,
    TASKS.c.fallback,
    TASKS.c.output,
    TASKS.c.error,
)
_ASSIGNMENT_CONTEXT = Prepared(
    "assignments.assignment_context",
    select(*_SIBLING_COLUMNS).where(TASKS.c.task_id.in_(bindparam("b_task_ids", expanding=True))),
    samples=[{"b_task_ids": ["a", "c", "z"]}, {"b_task_ids": []}],
)
_TAKING_AGENTS = Prepared(
    "assignments.taking_agents",
    select(AGENTS.c.agent_id).where(
        AGENTS.c.agent_id.in_(bindparam("b_agent_ids", expanding=True)),
        # Its stream open on this replica: another replica's agents are that replica's to
        # assign, and an agent whose replica was declared dead takes nothing more from it.
        AGENTS.c.replica_id == bindparam("b_replica_id"),
        AGENTS.c.reported_state.not_in([ReportedState.BUSY.value, ReportedState.ERROR.value]),
    ),
    samples=[{"b_agent_ids": ["g0", "g1", "g2", "g9"], "b_replica_id": "p1"}],
)


Shapes = Callable[[Connection, Iterable[str]], dict[str, RunShape]]
"""The shapes of some runs (see `RunShapes.of`)."""


def assign(
    conn: Connection,
    pairs: Sequence[tuple[ReadyTask, str]],
    now: datetime,
    rules: Rules,
    shapes: Shapes,
    replica_id: str,
    batch: Batch | None = None,
) -> list[Placed]:
    """Write the assignments of `pairs` (see `Store.assign`) for the replica `replica_id`. The
    agents are checked too, as of this transaction: one removed, disconnected, streaming from
    another replica, or reporting BUSY or ERROR earlier in the same batch takes nothing, and its
    task still waits (`Unassigned.AGENT_UNFIT`). What the `batch`
    learned (`Batch.recorded`, `Batch.inserted`) is not read again.

    Unlike the writes that move a run, this locks its tasks before their runs, and only the
    runs still PENDING (which it starts): a run that no task of has reached an agent yet, so
    only a cancellation can hold it. Locking every run first would cost a round trip per batch
    on PostgreSQL (a fifth of the throughput, measured) to avoid a deadlock that PostgreSQL
    detects and the writer resolves by running the batch's writes again one by one."""
    # Set-based: at most five statements for the whole batch, whatever its size (and one for
    # the shapes of runs not in memory). Only a run whose first task this may be is started;
    # the outputs of dependencies are read only when the batch did not record them itself.
    taking = {
        row.agent_id
        for row in _TAKING_AGENTS.rows(
            conn,
            {
                "b_agent_ids": sorted({agent_id for _, agent_id in pairs}),
                "b_replica_id": replica_id,
            },
        )
    }
    inserted = {} if batch is None else batch.inserted
    queued: dict[str, QueuedTask] = {
        task.task_id: inserted[task.task_id] for task, _ in pairs if task.task_id in inserted
    }
    # A root the batch inserted has no dependencies and stands in for nothing: only the tasks
    # read need their runs' shapes (for themselves and for their context).
    reading = [task for task, _ in pairs if task.task_id not in queued]
    shaped: dict[str, RunShape] = {}
    if reading:
        shaped = shapes(conn, {task.run_id for task in reading})
        task_ids = [task.task_id for task in reading]
        for row in _QUEUED_TASKS_FOR_UPDATE.rows(conn, {"b_task_ids": task_ids}):
            shape = shaped[row.run_id]
            fixed = shape.tasks[row.name]
            queued[row.task_id] = QueuedTask(
                row.task_id,
                row.run_id,
                row.name,
                fixed.capability,
                row.input,
                fixed.depends_on,
                row.attempt,
                row.timeout_ms,
                row.name in shape.fallbacks,
            )
    leases: dict[str, tuple[QueuedTask, str, datetime]] = {}
    for task, agent_id in pairs:
        row = queued.get(task.task_id)
        if row is not None and task.task_id not in leases and agent_id in taking:
            leases[task.task_id] = (row, agent_id, rules.lease_ends(row.timeout_ms, now))
    if not leases:
        return [_unassigned(task, agent_id, queued, taking, leases) for task, agent_id in pairs]
    _ASSIGN.execute(
        conn,
        [
            {
                "b_task_id": task_id,
                "b_attempt": row.attempt + 1,
                "b_agent_id": agent_id,
                "b_now": now,
                "b_deadline": deadline,
            }
            for task_id, (row, agent_id, deadline) in leases.items()
        ],
    )
    run_ids = sorted({row.run_id for row, _, _ in leases.values() if rules.starts_run(row)})
    _START_RUN.execute(conn, [{"b_run_id": run_id, "b_now": now} for run_id in run_ids])
    context = context_of(
        conn,
        [row for row, _, _ in leases.values() if row.depends_on or row.is_fallback],
        {} if batch is None else batch.recorded,
        shaped,
    )
    return [
        rules.assignment(
            context,
            leases[task.task_id][0],
            agent_id,
            leases[task.task_id][2],
            redelivered=False,
        )
        if task.task_id in leases and leases[task.task_id][1] == agent_id
        else _unassigned(task, agent_id, queued, taking, leases)
        for task, agent_id in pairs
    ]


def _unassigned(
    task: ReadyTask,
    agent_id: str,
    queued: Mapping[str, QueuedTask],
    taking: set[str],
    leases: Mapping[str, object],
) -> Unassigned:
    """Why the match of `task` and `agent_id` was not written."""
    if task.task_id in queued and task.task_id not in leases and agent_id not in taking:
        return Unassigned.AGENT_UNFIT
    return Unassigned.TASK_GONE


def context_of(
    conn: Connection,
    rows_: Sequence[QueuedTask],
    recorded: Mapping[tuple[str, str], JsonObject],
    shapes: Mapping[str, RunShape],
) -> Siblings:
    """The tasks of these rows' runs that their assignments refer to, each read by its id (the
    runs' `shapes` know them all): the tasks a row depends on, with the fallback of each that has
    one (it stands in when its task failed), and for a row that is a fallback the task it stands
    in for. A dependency whose output is in `recorded` (it succeeded in this transaction) is not
    read, so a row that is no fallback and whose dependencies all are needs no statement."""
    context: Siblings = {}
    wanted: set[str] = set()
    for row in rows_:
        shape = shapes[row.run_id]
        known = context.setdefault(row.run_id, {})
        for name in row.depends_on:
            output = recorded.get((row.run_id, name))
            if output is not None:
                # Succeeded: no fallback of its stands in for it.
                known[name] = Sibling(name, TaskState.SUCCEEDED, "", output, "")
                continue
            dependency = shape.tasks[name]
            wanted.add(dependency.task_id)
            if dependency.fallback:
                wanted.add(shape.tasks[dependency.fallback].task_id)
        primary = shape.fallbacks.get(row.name)
        if primary is not None:
            wanted.add(shape.tasks[primary].task_id)
    if wanted:
        for found in _ASSIGNMENT_CONTEXT.rows(conn, {"b_task_ids": sorted(wanted)}):
            context[found.run_id][found.name] = Sibling(
                found.name, TASK_STATES[found.state], found.fallback, found.output, found.error
            )
    return context
