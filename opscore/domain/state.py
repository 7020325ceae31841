"""Runs and tasks as the state machine reads and decides them: plain values, no rules.

The store reads rows into these, hands them to the state machine (`machine.StateMachine`), and
writes the `Decision` it returns. What never changes of a run (its graph, each task's
requirements) is its `RunShape`, read once and kept; what changes is a `TaskNow` per task.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from opscore.domain import graph
from opscore.domain.models import Effects, JsonObject, ReadyTask, RunState, TaskRun, TaskState


@dataclass(frozen=True, slots=True)
class TaskShape:
    """What never changes of a task: its place in the graph and what an agent needs to take it
    (a `graph.Edges`)."""

    task_id: str
    depends_on: tuple[str, ...]
    fallback: str
    capability: str
    labels: tuple[tuple[str, str], ...]
    """Sorted by key, as the dispatcher takes them."""
    pinned_agent_id: str

    def ready(self, run_id: str, not_before: datetime | None = None) -> ReadyTask:
        """The dispatcher's view of this task, dispatchable from `not_before` on."""
        return ReadyTask(
            self.task_id, run_id, self.capability, self.labels, self.pinned_agent_id, not_before
        )


@dataclass(frozen=True, slots=True)
class RunShape:
    """What never changes of a run: the shape of each task, by name (its graph). A run's graph
    is fixed when it is triggered, so a shape read once (or known from the trigger) is right
    forever, on every replica: a completion then reads only its run's task states."""

    tasks: dict[str, TaskShape]
    fallbacks: dict[str, str]
    """The tasks that stand in for another, by name, each mapped to the task it stands in for."""

    @classmethod
    def of(cls, tasks: dict[str, TaskShape]) -> RunShape:
        """The run whose tasks, by name, have these shapes."""
        return cls(tasks, graph.fallbacks(tasks))

    @classmethod
    def of_runs(cls, tasks: Iterable[TaskRun]) -> RunShape:
        """The shape of the run these whole tasks make up."""
        return cls.of(
            {
                task.name: TaskShape(
                    task.task_id,
                    task.depends_on,
                    task.fallback,
                    task.capability,
                    tuple(sorted(task.labels.items())),
                    task.pinned_agent_id,
                )
                for task in tasks
            }
        )


class TaskNow(NamedTuple):
    """What changes of a task: its state, its current attempt and holder, and its last error."""

    task_id: str
    name: str
    state: TaskState
    attempt: int
    agent_id: str
    error: str = ""
    error_reported: bool = False
    """Whether its holder reported the error (an error the server declared is not)."""

    @classmethod
    def of(cls, task: TaskRun) -> TaskNow:
        """The changing part of a whole task."""
        return cls(task.task_id, task.name, task.state, task.attempt, task.agent_id, task.error)


@dataclass(slots=True)
class RunNow:
    """A run as one write moves it: its shape and its tasks' current states. A write that moves
    it several times (a batch of completions) sees each move's outcome in the next."""

    run_id: str
    shape: RunShape
    tasks: dict[str, TaskNow]
    """The tasks read, by name; a task of the shape that is not here has succeeded (a read
    skips those: a succeeded task never changes again)."""
    states: dict[str, TaskState] = field(default_factory=dict)
    """Every task's state, by name."""

    @classmethod
    def of(cls, run_id: str, shape: RunShape, tasks: Iterable[TaskNow]) -> RunNow:
        """The run of `shape` whose tasks not among `tasks` have succeeded."""
        read = {task.name: task for task in tasks}
        states = dict.fromkeys(shape.tasks, TaskState.SUCCEEDED)
        for name, task in read.items():
            states[name] = task.state
        return cls(run_id, shape, read, states)

    @classmethod
    def of_runs(cls, run_id: str, tasks: Sequence[TaskRun]) -> RunNow:
        """The run these whole tasks make up."""
        return cls.of(run_id, RunShape.of_runs(tasks), map(TaskNow.of, tasks))

    def set(self, name: str, state: TaskState) -> None:
        """Record that the task `name` is now in `state`."""
        self.states[name] = state
        task = self.tasks.get(name)
        if task is not None:
            self.tasks[name] = task._replace(state=state)


class Reporting(enum.Enum):
    """What an agent reports of an attempt it holds."""

    OUTPUT = enum.auto()
    FAILURE = enum.auto()
    NOTHING = enum.auto()
    """Only that it still works on it (a lease extension)."""


class Move(enum.Enum):
    """How a task's row changes."""

    SUCCEED = enum.auto()
    """Succeeded, with its output."""
    QUEUE = enum.auto()
    """Queued: its dependencies are satisfied, or it stands in for a task that failed."""
    RETRY = enum.auto()
    """Queued again after a failed attempt, with its error, from `not_before` on."""
    HAND_BACK = enum.auto()
    """Queued again at once, its attempt not counted as failed (its agent left)."""
    FAIL = enum.auto()
    """Failed finally, with its error."""
    SKIP = enum.auto()
    """Skipped: its run failed, or it is a fallback its task did not need."""
    CANCEL = enum.auto()
    """Cancelled with its run."""


class TaskMove(NamedTuple):
    """One task row's change, as decided."""

    move: Move
    task_id: str
    output: JsonObject | None = None
    error: str = ""
    reported: bool = False
    """Whether the holder reported `error` (RETRY, FAIL)."""
    not_before: datetime | None = None
    """When a RETRY may be dispatched."""


@dataclass(slots=True)
class Decision:
    """What the state machine decided for one or more events: the rows to change, in order, and
    what their commit means for the dispatcher and the agents' streams."""

    tasks: list[TaskMove] = field(default_factory=list)
    effects: Effects = field(default_factory=Effects)

    @property
    def runs(self) -> list[tuple[str, RunState]]:
        """Runs that reached a final state, and which: the rows to write are the effects'."""
        return self.effects.finished_runs

    def merge(self, other: Decision) -> None:
        """Append another decision to this one, keeping order."""
        self.tasks.extend(other.tasks)
        self.effects.merge(other.effects)


class QueuedTask(NamedTuple):
    """What an assignment needs of a queued task: what changes of it, read from its row, and
    what its run's shape says of it."""

    task_id: str
    run_id: str
    name: str
    capability: str
    input: JsonObject
    depends_on: Sequence[str]
    attempt: int
    timeout_ms: int | None
    is_fallback: bool


@dataclass(frozen=True, slots=True)
class Sibling:
    """What an assignment needs of another task of its run."""

    name: str
    state: TaskState
    fallback: str
    output: JsonObject | None
    error: str


Siblings = dict[str, dict[str, Sibling]]
"""For each run, the tasks an assignment may need to know about, by name."""
