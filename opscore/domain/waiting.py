"""Why work cannot run, or waits: what a pinned agent lacks for a run's tasks (refused at
trigger time), what a task pinned to a deregistered agent fails with, and why a queued task
waits, worked out when the task is read (never stored at each write: the hot path pays
nothing for it)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from opscore.domain.errors import PinnedAgentUnfit
from opscore.domain.models import (
    Agent,
    AgentState,
    Assignment,
    JsonObject,
    TaskRun,
    TaskSpec,
    TaskState,
    WorkflowDefinition,
    WorkflowRun,
)
from opscore.domain.responses import WireSizes

Requirement = tuple[str, tuple[tuple[str, str], ...]]
"""What an unpinned task needs of an agent: a capability ("" for any) and labels, sorted."""


def requirement(task: TaskRun) -> Requirement:
    """What `task` needs of an agent: the registered agents that meet it are looked up once
    for all the tasks that share it."""
    return task.capability, tuple(sorted(task.labels.items()))


DEREGISTERED = "pinned agent {agent_id!r} was deregistered"
"""The error of a task pinned to an agent that was deregistered before it could run it."""


def lacks(capabilities: Iterable[str], labels: Mapping[str, str], task: TaskSpec) -> list[str]:
    """What an agent with these capabilities and labels lacks for `task`, as people say it
    ("capability 'gpu'", "label zone=eu"); empty if it may take it."""
    missing = []
    if task.capability and task.capability not in set(capabilities):
        missing.append(f"capability {task.capability!r}")
    missing.extend(
        f"label {key}={value}"
        for key, value in sorted(task.labels.items())
        if labels.get(key) != value
    )
    return missing


def check_pinned_agent(agent: Agent, tasks: Iterable[TaskSpec]) -> None:
    """Refuse a run pinned to `agent` if the agent lacks what any of its tasks needs: no
    other agent may take them, so the run would wait forever."""
    lacking = [
        (task.name, missing)
        for task in tasks
        if (missing := lacks(agent.capabilities, agent.labels, task))
    ]
    if lacking:
        raise PinnedAgentUnfit(agent.agent_id, lacking)


class Offer(NamedTuple):
    """Whether some registered agent meets what an unpinned task needs, and a connected one."""

    registered: bool
    connected: bool
    idle_elsewhere: bool = False
    """Whether one of those streams from another replica and is idle with a free slot (a
    replica's dispatch knows only its own agents)."""


@dataclass(frozen=True, slots=True)
class Candidates:
    """The agents that could take a queued task (its capability, labels and pin), as known
    when the task is read."""

    offer: Offer
    """For an unpinned task: whether any registered agent could take it, and a connected one."""
    free: bool
    """For an unpinned task: whether one of those is idle with a free slot."""
    pinned: Agent | None = None
    """The agent the task is pinned to, if it is and that agent is registered."""


def waiting_reason(task: TaskRun, now: datetime, candidates: Candidates) -> str:
    """Why `task`, queued, has not reached an agent yet (empty for a task not queued)."""
    if task.state is not TaskState.QUEUED:
        return ""
    if task.not_before is not None and task.not_before > now:
        return f"backoff until {task.not_before.astimezone(UTC):%H:%M:%S} UTC"
    if task.pinned_agent_id:
        return _pinned_reason(task, candidates.pinned)
    return _unpinned_reason(task, candidates)


def _unpinned_reason(task: TaskRun, candidates: Candidates) -> str:
    if not candidates.offer.registered:
        needs = _needs(task)
        return f"no registered agent offers {needs}" if needs else "no agent is registered"
    if not candidates.offer.connected:
        return "every capable agent is offline"
    if not candidates.free:
        return "every capable agent is busy"
    return "being assigned to a free capable agent"


def _pinned_reason(task: TaskRun, agent: Agent | None) -> str:
    name = repr(task.pinned_agent_id)
    if agent is None:
        return f"pinned agent {name} is not registered"
    spec = TaskSpec(task.name, capability=task.capability, labels=task.labels)
    missing = lacks(agent.capabilities, agent.labels, spec)
    if missing:
        return f"pinned agent {name} lacks {' and '.join(missing)}"
    state = agent.state
    if state is AgentState.OFFLINE:
        return f"pinned agent {name} is offline"
    if state is AgentState.ERROR:
        return f"pinned agent {name} reports an error"
    if state is AgentState.BUSY:
        return f"pinned agent {name} is busy"
    return f"being assigned to pinned agent {name}"


def _needs(task: TaskRun) -> str:
    """What a task needs of an agent, as people say it."""
    parts = [f"capability {task.capability!r}"] if task.capability else []
    parts.extend(f"label {key}={value}" for key, value in sorted(task.labels.items()))
    return " and ".join(parts)


_REASON_TEXT_BYTES = 64
"""More than the fixed words of any reason, "backoff until 12:00:03 UTC" included."""
_FIELD_BYTES = 6
"""The tag and length of the reason's field on the wire."""


def reason_room(task: TaskRun) -> int:
    """The most bytes a waiting reason adds to `task` on the wire: the longest reason names
    the pinned agent and what the task needs. Zero for a task that is not queued."""
    if task.state is not TaskState.QUEUED:
        return 0
    named = len(repr(task.pinned_agent_id).encode()) + len(_needs(task).encode())
    return _REASON_TEXT_BYTES + named + _FIELD_BYTES


class WithReasons:
    """Sizes of items as read, when each queued task will carry its waiting reason: the reason
    is worked out after the response is cut, so the cut makes room for it."""

    def __init__(self, sizes: WireSizes) -> None:
        self._sizes = sizes

    def run(self, run: WorkflowRun) -> int:
        """Bytes of a run, with room for the reasons of the tasks it holds."""
        return self._sizes.run(run) + sum(map(reason_room, run.tasks))

    def task(self, task: TaskRun) -> int:
        """Bytes of one task, with room for its reason."""
        return self._sizes.task(task) + reason_room(task)

    def definition(self, definition: WorkflowDefinition) -> int:
        """Bytes of one workflow definition."""
        return self._sizes.definition(definition)

    def agent(self, agent: Agent) -> int:
        """Bytes of one agent."""
        return self._sizes.agent(agent)

    def assignment(self, assignment: Assignment) -> int:
        """Bytes of an assignment (which carries no waiting reason)."""
        return self._sizes.assignment(assignment)

    def dependency_output(self, name: str, output: JsonObject) -> int:
        """Bytes one dependency's output adds to an assignment."""
        return self._sizes.dependency_output(name, output)
