"""Row changes of a write, collected and run set-based; and what a graph transition writes.

A set-based write (see `writer.Grouped`) moves many runs at once. Rather than one UPDATE per task
and per run, each change is added to `Changes` and the changes of one statement are run together
as one executemany when the write flushes. Order still holds where it matters: a row changed by a
second kind of statement flushes everything collected before it first, so the last change of a
row is always the last one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, update
from sqlalchemy.engine import Connection

from opscore.domain import graph
from opscore.domain.models import (
    Cancellation,
    Effects,
    Hold,
    ReadyTask,
    RunState,
    TaskRun,
    TaskState,
)
from opscore.store.prepared import SAMPLE_TIME, Prepared, Sample
from opscore.store.tables import RUNS, TASKS


def task_update(name: str, samples: Sequence[Sample], /, **values: Any) -> Prepared:
    """An UPDATE of one task by `b_task_id`, setting `values` (see `Prepared` for `name` and
    `samples`). Parameters are named `b_*` because SQLAlchemy reserves column names for the
    values of an UPDATE."""
    return Prepared(
        name,
        update(TASKS).where(TASKS.c.task_id == bindparam("b_task_id")).values(**values),
        samples=samples,
    )


SUCCEED_TASK = task_update(
    "changes.succeed_task",
    [{"b_task_id": "b", "b_output": {"done": True}, "b_now": SAMPLE_TIME}],
    state=TaskState.SUCCEEDED.value,
    output=bindparam("b_output"),
    not_before=None,
    finished_at=bindparam("b_now"),
)
QUEUE_TASK = task_update(
    "changes.queue_task",
    [[{"b_task_id": "c", "b_now": SAMPLE_TIME}, {"b_task_id": "d", "b_now": SAMPLE_TIME}]],
    state=TaskState.QUEUED.value,
    not_before=None,
    queued_at=bindparam("b_now"),
)
FINISH_TASK = task_update(
    "changes.finish_task",
    [{"b_task_id": "c", "b_state": "skipped", "b_now": SAMPLE_TIME}],
    state=bindparam("b_state"),
    not_before=None,
    finished_at=bindparam("b_now"),
)
FINISH_RUN = Prepared(
    "changes.finish_run",
    update(RUNS)
    .where(RUNS.c.run_id == bindparam("b_run_id"))
    .values(state=bindparam("b_state"), finished_at=bindparam("b_now")),
    samples=[{"b_run_id": "r2", "b_state": "cancelled", "b_now": SAMPLE_TIME}],
)


class GraphTask(Protocol):
    """What moving a run's graph needs of each of its tasks: a whole `TaskRun`, or the
    `rows.TaskNode` a batch of completions builds (the same, without inputs and outputs)."""

    @property
    def task_id(self) -> str:
        """The task's id."""

    @property
    def name(self) -> str:
        """Its name in the run's graph."""

    @property
    def state(self) -> TaskState:
        """Its state before the transition."""

    @property
    def agent_id(self) -> str:
        """Its holder, if any."""

    @property
    def attempt(self) -> int:
        """Its current attempt."""

    def ready(self, not_before: datetime | None = None) -> ReadyTask:
        """The dispatcher's view of the task."""
        ...


def graph_of(tasks: Sequence[TaskRun]) -> dict[str, graph.Node]:
    """The graph of a run, from its whole tasks."""
    return {task.name: graph.Node(task.depends_on, task.fallback) for task in tasks}


def states_of(tasks: Sequence[GraphTask]) -> dict[str, TaskState]:
    """Each task's state, by name."""
    return {task.name: task.state for task in tasks}


class Changes:
    """Row changes waiting to be run, grouped by statement (see the module docstring)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pending: dict[Prepared, list[dict[str, Any]]] = {}
        self._changed_by: dict[str, Prepared] = {}

    def add(self, statement: Prepared, row_key: str, params: dict[str, Any]) -> None:
        """Change the row `row_key` (a task or run id) with `statement` and `params`."""
        previous = self._changed_by.get(row_key)
        if previous is not None and previous is not statement:
            self.flush()
        self._changed_by[row_key] = statement
        self._pending.setdefault(statement, []).append(params)

    def flush(self) -> None:
        """Run every change collected, one executemany per statement."""
        for statement, params in self._pending.items():
            statement.execute(self._conn, params)
        self._pending.clear()
        self._changed_by.clear()


_CANCEL_REASONS = {RunState.CANCELLED: "run cancelled", RunState.FAILED: "run failed"}


def apply_transition(
    changes: Changes,
    run_id: str,
    tasks: Sequence[GraphTask],
    transition: graph.Transition,
    now: datetime,
) -> Effects:
    """Add the writes of a transition of the run's graph (`tasks` as they were before it) to
    `changes`, and say what it means for the dispatcher and the agents."""
    effects = Effects()
    before = {task.name: task for task in tasks}
    reason = _CANCEL_REASONS.get(transition.run_state or RunState.RUNNING, "")
    for name, state in transition.tasks.items():
        task = before[name]
        if state is TaskState.QUEUED:
            effects.queued.append(task.ready())
            changes.add(QUEUE_TASK, task.task_id, {"b_task_id": task.task_id, "b_now": now})
            continue
        changes.add(
            FINISH_TASK,
            task.task_id,
            {"b_task_id": task.task_id, "b_state": state.value, "b_now": now},
        )
        if task.state is TaskState.QUEUED:
            effects.unqueued.append(task.task_id)
        elif task.state is TaskState.ASSIGNED and state in (
            TaskState.SKIPPED,
            TaskState.CANCELLED,
        ):
            effects.released.append(Hold(task.agent_id, task.task_id, run_id, task.attempt))
            effects.cancelled.append(
                Cancellation(task.agent_id, task.task_id, run_id, task.attempt, reason)
            )
    if transition.run_state is not None:
        changes.add(
            FINISH_RUN,
            run_id,
            {"b_run_id": run_id, "b_state": transition.run_state.value, "b_now": now},
        )
        effects.finished_runs.append((run_id, transition.run_state))
    return effects
