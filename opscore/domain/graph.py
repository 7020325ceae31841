"""How a run's task graph moves: which tasks become ready, skipped or cancelled, and when the
run is finished. Pure functions of the graph and the current states, so the rules are tested
without a server or a database, and the store applies what they decide inside one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from opscore.domain.models import RunState, TaskState

Dependencies = Mapping[str, tuple[str, ...]]
"""Each task's name mapped to the names of the tasks it depends on."""


@dataclass(frozen=True, slots=True)
class Transition:
    """What one event changes in a run: the tasks whose state changes, and the run's new state."""

    tasks: dict[str, TaskState] = field(default_factory=dict)
    run_state: RunState | None = None

    def names_in(self, state: TaskState) -> list[str]:
        """The tasks this transition moves into `state`, in a stable order."""
        return [name for name, new in self.tasks.items() if new is state]


def initial_states(dependencies: Dependencies) -> dict[str, TaskState]:
    """A new run: tasks without dependencies are queued at once, the others wait."""
    return {
        name: TaskState.QUEUED if not deps else TaskState.PENDING
        for name, deps in dependencies.items()
    }


def succeed(dependencies: Dependencies, states: Mapping[str, TaskState], name: str) -> Transition:
    """`name` succeeded: queue each waiting task whose dependencies have all succeeded now, and
    finish the run when every task has succeeded.
    """
    after = dict(states)
    after[name] = TaskState.SUCCEEDED
    changes: dict[str, TaskState] = {name: TaskState.SUCCEEDED}
    for candidate, deps in dependencies.items():
        if after[candidate] is TaskState.PENDING and all(
            after[dep] is TaskState.SUCCEEDED for dep in deps
        ):
            changes[candidate] = after[candidate] = TaskState.QUEUED
    done = all(state is TaskState.SUCCEEDED for state in after.values())
    return Transition(changes, RunState.SUCCEEDED if done else None)


def fail(states: Mapping[str, TaskState], name: str) -> Transition:
    """`name` finally failed: the run fails, and every unfinished task of it is skipped."""
    changes = {other: TaskState.SKIPPED for other, state in states.items() if not state.finished}
    changes[name] = TaskState.FAILED
    return Transition(changes, RunState.FAILED)


def cancel(states: Mapping[str, TaskState]) -> Transition:
    """An operator cancelled the run: every unfinished task is cancelled."""
    changes = {name: TaskState.CANCELLED for name, state in states.items() if not state.finished}
    return Transition(changes, RunState.CANCELLED)
