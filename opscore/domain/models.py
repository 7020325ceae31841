"""The domain's vocabulary: plain dataclasses and enums, free of gRPC and SQL.

Servicers convert wire messages into these and back; the store converts rows into these.
The engine, the dispatcher and the validation rules work on nothing else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, NamedTuple, TypeVar

JsonObject = dict[str, Any]
"""A JSON object: what a protobuf Struct carries (task inputs, outputs, run inputs)."""


class AgentState(enum.Enum):
    """What an operator sees of an agent. Values are stable: they are stored."""

    IDLE = "idle"
    BUSY = "busy"
    ERROR = "error"
    OFFLINE = "offline"


class ReportedState(enum.Enum):
    """What an agent last said of itself. NONE until its first report, which counts as idle."""

    NONE = "none"
    IDLE = "idle"
    BUSY = "busy"
    ERROR = "error"


class RunState(enum.Enum):
    """The life of a workflow run. Values are stable: they are stored."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the run has reached a final state."""
        return self in _FINAL_RUN_STATES


_FINAL_RUN_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})


class TaskState(enum.Enum):
    """The life of one task of a run. Values are stable: they are stored."""

    PENDING = "pending"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def finished(self) -> bool:
        """Whether the task has reached a final state."""
        return self in _FINAL_TASK_STATES


_FINAL_TASK_STATES = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.SKIPPED}
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failed task is tried again. Fields left as None take the server's defaults."""

    max_attempts: int | None = None
    initial_backoff: timedelta | None = None
    backoff_multiplier: float | None = None
    max_backoff: timedelta | None = None


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task of a workflow definition, as the user wrote it."""

    name: str
    capability: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    input: JsonObject = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    timeout: timedelta | None = None
    retry_policy: RetryPolicy | None = None
    fallback: str = ""


@dataclass(frozen=True, slots=True)
class DefinitionDraft:
    """A workflow definition before the server has given it an id and a version."""

    workflow_name: str
    description: str = ""
    tasks: tuple[TaskSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkflowDefinition:
    """An immutable, stored version of a workflow."""

    definition_id: str
    workflow_name: str
    version: int
    description: str
    tasks: tuple[TaskSpec, ...]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AgentRegistration:
    """What an agent says of itself when it registers."""

    agent_id: str
    name: str = ""
    version: str = ""
    capabilities: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    max_concurrent_tasks: int = 1


@dataclass(frozen=True, slots=True)
class Agent:
    """A registered agent as stored, with the figures the server derives for it."""

    agent_id: str
    name: str
    version: str
    capabilities: tuple[str, ...]
    labels: dict[str, str]
    max_concurrent_tasks: int
    reported_state: ReportedState
    state_detail: str
    connected: bool
    running_tasks: int
    registered_at: datetime
    last_seen_at: datetime

    def profile(self) -> AgentProfile:
        """The dispatcher's view of this agent."""
        return AgentProfile(
            agent_id=self.agent_id,
            capabilities=frozenset(self.capabilities),
            labels=self.labels,
            max_concurrent_tasks=self.max_concurrent_tasks,
            reported_state=self.reported_state,
        )

    @property
    def state(self) -> AgentState:
        """The state an operator sees, derived as the contract defines it."""
        return derive_agent_state(
            connected=self.connected,
            reported=self.reported_state,
            running_tasks=self.running_tasks,
            max_concurrent_tasks=self.max_concurrent_tasks,
        )


def derive_agent_state(
    *, connected: bool, reported: ReportedState, running_tasks: int, max_concurrent_tasks: int
) -> AgentState:
    """OFFLINE without a stream; else ERROR/BUSY as reported; else BUSY when full; else IDLE."""
    if not connected:
        return AgentState.OFFLINE
    if reported is ReportedState.ERROR:
        return AgentState.ERROR
    if reported is ReportedState.BUSY or running_tasks >= max_concurrent_tasks:
        return AgentState.BUSY
    return AgentState.IDLE


@dataclass(frozen=True, slots=True)
class TaskRun:
    """One task of a run, as stored."""

    task_id: str
    run_id: str
    name: str
    position: int
    state: TaskState
    attempt: int
    agent_id: str
    output: JsonObject | None
    error: str
    queued_at: datetime | None
    assigned_at: datetime | None
    finished_at: datetime | None
    deadline: datetime | None
    capability: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    fallback: str = ""
    pinned_agent_id: str = ""
    not_before: datetime | None = None
    waiting_reason: str = ""
    """Why a queued task waits, worked out when read (`domain.waiting`); never stored."""

    def ready(self, not_before: datetime | None = None) -> ReadyTask:
        """The dispatcher's view of this task, dispatchable from `not_before` on."""
        return ReadyTask(
            task_id=self.task_id,
            run_id=self.run_id,
            capability=self.capability,
            labels=tuple(sorted(self.labels.items())),
            pinned_agent_id=self.pinned_agent_id,
            not_before=not_before,
        )


@dataclass(frozen=True, slots=True)
class WorkflowRun:
    """One execution of a workflow, with its tasks in definition order."""

    run_id: str
    definition_id: str
    workflow_name: str
    agent_id: str
    state: RunState
    input: JsonObject
    tasks: tuple[TaskRun, ...]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    task_counts: tuple[tuple[TaskState, int], ...] = ()
    """How many of its tasks are in each state: the states with any, in TaskState's order."""
    next_task_page_token: str = ""
    """Set when `tasks` holds only the first of the run's tasks (the rest did not fit in one
    response): the page token of the listing of its tasks that continues with the next."""


class RunView(enum.Enum):
    """How much of a run a read returns."""

    BASIC = "basic"
    """The run's own fields, its input and its task counts, without its tasks."""
    FULL = "full"
    """BASIC and the run's tasks, as many as fit in one response."""


class RunOrder(enum.Enum):
    """The order of a listing of runs: by creation time, then by id, in one direction."""

    NEWEST_FIRST = "created_at desc"
    OLDEST_FIRST = "created_at"


@dataclass(frozen=True, slots=True)
class TriggerRequest:
    """A request to start a run: exactly one of the three sources is set."""

    definition_id: str = ""
    workflow_name: str = ""
    definition: DefinitionDraft | None = None
    agent_id: str = ""
    input: JsonObject = field(default_factory=dict)
    request_id: str = ""


class ReadyTask(NamedTuple):
    """What the dispatcher needs to know of a queued task to match it with an agent.

    A named tuple: the dispatcher keeps a deep queue of them as plain tuples (see
    `Dispatcher._ready`), and makes them again from those."""

    task_id: str
    run_id: str
    capability: str
    labels: tuple[tuple[str, str], ...]
    pinned_agent_id: str
    not_before: datetime | None = None
    """Not to be dispatched before this time (a retry's backoff); None: at once."""

    def accepts(self, agent: AgentProfile) -> bool:
        """Whether the agent may take this task (the connection and the slots aside)."""
        if self.pinned_agent_id and self.pinned_agent_id != agent.agent_id:
            return False
        if self.capability and self.capability not in agent.capabilities:
            return False
        return self.fits(agent.labels)

    def fits(self, labels: Mapping[str, str]) -> bool:
        """Whether an agent carrying `labels` carries every label this task needs."""
        return all(labels.get(key) == value for key, value in self.labels)


@dataclass(frozen=True, slots=True)
class AgentProfile:
    """What the dispatcher needs to know of an agent to match it with tasks."""

    agent_id: str
    capabilities: frozenset[str]
    labels: dict[str, str]
    max_concurrent_tasks: int
    reported_state: ReportedState


@dataclass(frozen=True, slots=True)
class Assignment:
    """A task attempt handed to an agent: what its stream carries."""

    task_id: str
    run_id: str
    task_name: str
    capability: str
    attempt: int
    agent_id: str
    input: JsonObject
    dependency_outputs: dict[str, JsonObject]
    deadline: datetime
    redelivered: bool = False
    fallback_for: str = ""
    fallback_error: str = ""
    omitted_outputs: tuple[str, ...] = ()
    """Dependencies whose outputs are left out of `dependency_outputs` so that the assignment
    fits one message (see `responses.fit_assignment`), in dependency order."""


class Unassigned(enum.Enum):
    """Why a match of a task and an agent was not written as an assignment."""

    TASK_GONE = "task gone"
    """The task was no longer queued (cancelled, skipped, or taken by another match), or, among
    replicas, another replica's write held it: this match is void."""
    AGENT_UNFIT = "agent unfit"
    """The agent could no longer take it (removed, disconnected, BUSY or ERROR earlier in the
    same transaction): the task still waits, for another agent."""


Placed = Assignment | Unassigned
"""What became of one match when its assignment was written."""


@dataclass(frozen=True, slots=True)
class Cancellation:
    """A task attempt an agent must stop: what its stream carries."""

    agent_id: str
    task_id: str
    run_id: str
    attempt: int
    reason: str


StreamEvent = Assignment | Cancellation
"""Anything pushed on an agent's task stream."""


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing and the token of the next (empty on the last page)."""

    items: tuple[T, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Which runs a listing shows: every field that is set must match."""

    state: RunState | None = None
    definition_id: str = ""
    agent_id: str = ""
    workflow_name: str = ""
    created_after: datetime | None = None
    """Runs created at or after this time."""
    created_before: datetime | None = None
    """Runs created before this time."""


@dataclass(frozen=True, slots=True)
class Hold:
    """An agent holding one attempt of a task: what a slot of the agent is taken by."""

    agent_id: str
    task_id: str
    run_id: str
    attempt: int


@dataclass(slots=True)
class Effects:
    """What a committed write changes for the dispatcher and the agents' streams.

    The store returns these from every write that moves tasks; the engine applies them after the
    commit, so in-memory state always follows what is durable.
    """

    queued: list[ReadyTask] = field(default_factory=list)
    """Tasks that became ready, in the order they became ready."""
    unqueued: list[str] = field(default_factory=list)
    """Ids of queued tasks that are no longer to be dispatched (skipped, cancelled)."""
    released: list[Hold] = field(default_factory=list)
    """Attempts whose agents no longer hold them; each frees a slot of its agent."""
    cancelled: list[Cancellation] = field(default_factory=list)
    """Attempts whose agents must be told to stop (their work is no longer wanted)."""
    finished_runs: list[tuple[str, RunState]] = field(default_factory=list)
    """Runs that reached a final state."""
    quarantined: list[tuple[AgentProfile, int]] = field(default_factory=list)
    """Agents put in ERROR for their leases expiring in a row, with how many did."""

    def merge(self, other: Effects) -> None:
        """Append another write's effects to these, keeping their order."""
        self.queued.extend(other.queued)
        self.unqueued.extend(other.unqueued)
        self.released.extend(other.released)
        self.cancelled.extend(other.cancelled)
        self.finished_runs.extend(other.finished_runs)
        self.quarantined.extend(other.quarantined)
