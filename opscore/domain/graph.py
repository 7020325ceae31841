"""How a run's task graph moves: which tasks become ready, skipped or cancelled, which fallback
stands in for a failed task, and when the run is finished. Pure functions of the graph and the
current states, so the rules are tested without a server or a database, and the store applies
what they decide inside one transaction.

A task is *satisfied* when it succeeded, or when it finally failed and its fallback succeeded in
its place. A waiting task is queued once every task it depends on is satisfied. A fallback is not
a root: it waits until its task finally fails (then it is queued), or is skipped when its task
succeeds. The run succeeds when every task that is not a fallback is satisfied, and fails when a
task finally fails with no fallback to stand in for it (or when a fallback itself fails)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from opscore.domain.models import RunState, TaskState


class Edges(Protocol):
    """What the graph needs of a task: what it depends on and which task stands in for it
    (a definition's `TaskSpec` is one, and so is a run's `state.TaskShape`)."""

    @property
    def depends_on(self) -> tuple[str, ...]:
        """The tasks it waits for, by name."""

    @property
    def fallback(self) -> str:
        """The task that stands in for it if it finally fails ("" for none)."""


Graph = Mapping[str, Edges]
"""The tasks of a run, by name."""


@dataclass(frozen=True, slots=True)
class Transition:
    """What one event changes in a run: the tasks whose state changes, and the run's new state."""

    tasks: dict[str, TaskState] = field(default_factory=dict)
    run_state: RunState | None = None


def fallbacks(graph: Graph) -> dict[str, str]:
    """Each fallback task's name mapped to the name of the task it stands in for."""
    return {node.fallback: name for name, node in graph.items() if node.fallback}


def initial_states(graph: Graph) -> dict[str, TaskState]:
    """A new run: tasks without dependencies are queued at once (fallbacks excepted)."""
    standby = fallbacks(graph)
    return {
        name: TaskState.QUEUED if not node.depends_on and name not in standby else TaskState.PENDING
        for name, node in graph.items()
    }


def satisfied(graph: Graph, states: Mapping[str, TaskState], name: str) -> bool:
    """Whether `name` succeeded, or finally failed and its fallback succeeded in its place."""
    if states[name] is TaskState.SUCCEEDED:
        return True
    stand_in = graph[name].fallback
    return (
        states[name] is TaskState.FAILED
        and bool(stand_in)
        and states[stand_in] is TaskState.SUCCEEDED
    )


def succeed(graph: Graph, states: Mapping[str, TaskState], name: str) -> Transition:
    """`name` succeeded: its fallback is no longer needed, waiting tasks whose dependencies are
    all satisfied now are queued, and the run succeeds once every task is accounted for."""
    after = dict(states)
    changes = {name: TaskState.SUCCEEDED}
    stand_in = graph[name].fallback
    if stand_in and after[stand_in] is TaskState.PENDING:
        changes[stand_in] = TaskState.SKIPPED
    after.update(changes)
    standby = fallbacks(graph)
    for candidate, node in graph.items():
        if (
            after[candidate] is TaskState.PENDING
            and candidate not in standby
            and all(satisfied(graph, after, dep) for dep in node.depends_on)
        ):
            changes[candidate] = after[candidate] = TaskState.QUEUED
    done = all(satisfied(graph, after, task) for task in graph if task not in standby)
    return Transition(changes, RunState.SUCCEEDED if done else None)


def fail(graph: Graph, states: Mapping[str, TaskState], name: str) -> Transition:
    """`name` finally failed: its fallback is queued in its place if it has one; otherwise the run
    fails, and every unfinished task of it is skipped."""
    stand_in = graph[name].fallback
    if stand_in and states[stand_in] is TaskState.PENDING:
        return Transition({name: TaskState.FAILED, stand_in: TaskState.QUEUED})
    changes = {other: TaskState.SKIPPED for other, state in states.items() if not state.finished}
    changes[name] = TaskState.FAILED
    return Transition(changes, RunState.FAILED)


def cancel(states: Mapping[str, TaskState]) -> Transition:
    """An operator cancelled the run: every unfinished task is cancelled."""
    changes = {name: TaskState.CANCELLED for name, state in states.items() if not state.finished}
    return Transition(changes, RunState.CANCELLED)
