"""What the engine needs of persistence, declared in the domain: the values it exchanges with the
store, and the repositories it calls, one Protocol an aggregate (agents, definitions, runs, tasks,
timers), gathered in `Persistence`; and what the store needs of the domain: the state machine
(`Rules`).

The engine depends on these alone, so the domain imports nothing of the store; the store's
`Store` satisfies `Persistence` structurally (mypy checks it where the server builds the engine),
with no registration and no check at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from opscore.domain import models
from opscore.domain.responses import Budget
from opscore.domain.state import Decision, QueuedTask, Reporting, RunNow, Siblings, TaskNow
from opscore.domain.waiting import Offer, Requirement

T = TypeVar("T")
OnCommit = Callable[[T], None]
"""Called with a write's outcome inside the commit order, once the write has committed."""

Place = Callable[
    [list[models.ReadyTask], list[tuple[str, str]]],
    tuple[list[tuple[models.ReadyTask, str]], Callable[[], None]],
]
"""Matches the tasks a write queues and the slots it frees, before it commits, and gives the
matches and an undo (see `Dispatcher.reserve_for_commit`)."""

Assigned = Callable[[list[tuple[models.ReadyTask, str]], list[models.Placed]], None]
"""Takes committed assignments: each (task, agent) pair and its assignment, or why it was not
written (`Unassigned`)."""


@dataclass(frozen=True, slots=True)
class Connected:
    """What the dispatcher learns when an agent's stream opens."""

    profile: models.AgentProfile
    held: list[models.Assignment]
    generation: int
    """The agent's count of streams opened, this one included: what its closing names."""


@dataclass(frozen=True, slots=True)
class Want:
    """Queued tasks a replica would claim for its free agents (see `TaskStore.claim`)."""

    capability: str
    labels: tuple[dict[str, str], ...]
    """The label sets of the free agents offering it: a task's labels must be within one."""
    agent_ids: tuple[str, ...]
    """The free agents offering it: tasks pinned to one of them qualify too."""
    limit: int
    """How many to lock, earliest queued first, of the tasks due now."""
    ahead: bool = False
    """Whether to lock as well, in the places the due tasks leave, tasks still waiting out a
    backoff (earliest queued first), for dispatch to keep until they are due: how a replica
    that starts, or sweeps, learns of retries that no live replica will announce."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a claim did."""

    found: dict[str, int]
    """How many tasks due now it locked, by capability."""
    assigned: int
    """How many of them, and of the tasks dispatch held, it assigned."""
    unassigned: list[models.ReadyTask]
    """The tasks it locked and did not assign: still queued, dispatch may keep them."""


@dataclass(frozen=True, slots=True)
class AgentRow:
    """What a replica rereads of an agent another replica's write changed."""

    profile: models.AgentProfile
    token_digest: str | None
    replica_id: str | None
    """The replica holding its stream, if connected."""
    generation: int
    """Its count of streams opened."""
    held: frozenset[str]
    """The tasks it holds."""


@dataclass(frozen=True, slots=True)
class Beat:
    """A replica's lease renewed (see `ReplicaStore.beat`)."""

    registered: bool
    """Whether its row was still there: False once another replica declared it dead."""
    peers: int
    """How many other replicas are alive."""
    lost_streams: int
    """How many agents were disconnected for want of a live replica holding their streams."""


@dataclass(frozen=True, slots=True)
class CreatedRun:
    """A triggered run, whether it was new (False for a repeated request_id), and its effects."""

    run: models.WorkflowRun
    created: bool
    effects: models.Effects


@dataclass(frozen=True, slots=True)
class NewRun:
    """A trigger, as the store writes it: exactly one source (a stored definition's id, a
    definition name for its latest version, or an inline definition)."""

    definition_id: str
    workflow_name: str
    inline: models.DefinitionDraft | None
    agent_id: str
    run_input: models.JsonObject
    request_id: str
    now: datetime
    on_commit: OnCommit[CreatedRun]
    fingerprint: str = ""
    """The trigger's digest (`idempotency.trigger_fingerprint`) when it has a request_id."""


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A task's output as its holder reported it."""

    task_id: str
    agent_id: str
    attempt: int
    output: models.JsonObject
    now: datetime
    on_commit: OnCommit[models.Effects]


class Rules(Protocol):
    """The state machine as the store calls it inside a write's transaction: it reads the rows
    a rule needs, asks, and writes the decision (`machine.StateMachine` is the one
    implementation; see it for the rules themselves)."""

    def initial_states(self, specs: Sequence[models.TaskSpec]) -> dict[str, models.TaskState]:
        """Each task's state, by name, as its run is triggered."""

    def lease_ends(self, timeout_ms: int | None, now: datetime) -> datetime:
        """When an attempt assigned at `now` with this task timeout must be done."""

    def starts_run(self, task: QueuedTask) -> bool:
        """Whether assigning `task` may be its run's first assignment."""

    def assignment(
        self,
        context: Siblings,
        task: QueuedTask,
        agent_id: str,
        deadline: datetime,
        *,
        redelivered: bool,
    ) -> models.Assignment:
        """The message of an attempt of `task`."""

    def holds(
        self, task: TaskNow, agent_id: str, attempt: int, reporting: Reporting, error: str = ""
    ) -> bool:
        """Whether what the agent reports of the attempt is to be recorded (or raise)."""

    def succeed(self, run: RunNow, name: str, output: models.JsonObject) -> Decision:
        """The task `name` of `run` succeeded with `output`."""

    def fail(
        self,
        run: RunNow,
        name: str,
        error: str,
        policy: models.RetryPolicy | None,
        now: datetime,
        *,
        retryable: bool,
        reported: bool,
    ) -> Decision:
        """An attempt of `name` failed: retried, or final."""

    def expire(
        self, run: RunNow, name: str, policy: models.RetryPolicy | None, now: datetime
    ) -> Decision:
        """The lease of the current attempt of `name` ended without a result."""

    def lose(
        self, run: RunNow, name: str, policy: models.RetryPolicy | None, now: datetime
    ) -> Decision:
        """The agent holding the current attempt of `name` was lost."""

    def quarantined(self, expiries: Mapping[str, int], after: int) -> dict[str, str]:
        """The agents quarantined for these counts of expiries in a row, with their detail."""

    def cancel(self, run: RunNow, run_state: models.RunState) -> Decision:
        """An operator cancels the run."""

    def deregister(self, runs: Sequence[RunNow], agent_id: str, now: datetime) -> Decision:
        """`agent_id` is removed: what becomes of the tasks of `runs` it holds or is pinned to."""


class Admission(Protocol):
    """Whether new work (a run, a definition) may be accepted now: the store keeps a reserve of
    free space for finishing the work already accepted."""

    def admit_new_work(self) -> None:
        """Return if new work may be written; raise `StorageReserve` if not."""


class AgentStore(Protocol):
    """Agents: registration, reported state, streams opening and closing."""

    async def register_agent(
        self,
        registration: models.AgentRegistration,
        token_digest: str,
        now: datetime,
        on_commit: OnCommit[models.Agent],
    ) -> models.Agent:
        """Insert the agent, or update it keeping its history and tasks; its token's digest
        becomes `token_digest`."""

    async def token_digests(self) -> list[tuple[str, str]]:
        """Every agent's id and the digest of its current token."""

    async def deregister_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[models.Effects]
    ) -> None:
        """Remove the agent: its held tasks requeue, the tasks pinned to it fail."""

    async def touch_agent(self, agent_id: str, now: datetime) -> None:
        """Record that the agent was heard from (a heartbeat)."""

    async def report_state(
        self,
        agent_id: str,
        state: models.ReportedState,
        detail: str,
        now: datetime,
        on_commit: OnCommit[models.Agent],
    ) -> models.Agent:
        """Record the state the agent reports of itself."""

    async def get_agent(self, agent_id: str) -> models.Agent:
        """One agent, NOT_FOUND if unknown."""

    async def list_agents(
        self,
        page_size: int,
        page_token: str,
        state: models.AgentState | None,
        capability: str,
        budget: Budget,
    ) -> models.Page[models.Agent]:
        """A page of agents by id, filtered by state and capability, cut to fit `budget`."""

    async def connect_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Connected]
    ) -> Connected:
        """Mark the agent connected; its profile and the attempts it holds."""

    async def disconnect_agent(self, agent_id: str, generation: int, now: datetime) -> None:
        """Mark the agent's stream closed, if it is still the stream of `generation` opened on
        this replica: its grace period starts now."""

    async def reread(self, agent_ids: list[str], on_commit: OnCommit[dict[str, AgentRow]]) -> None:
        """These agents as they are (the removed ones missing), read in commit order with
        this replica's writes: `on_commit` gets them there."""

    async def waiting_candidates(
        self, tasks: Sequence[models.TaskRun]
    ) -> tuple[dict[str, models.Agent], dict[Requirement, Offer]]:
        """The agents queued tasks are pinned to, and who meets each unpinned requirement."""


class DefinitionStore(Protocol):
    """Workflow definitions."""

    async def create_definition(
        self, draft: models.DefinitionDraft, request_id: str, now: datetime
    ) -> models.WorkflowDefinition:
        """Store the next version of the draft's workflow (once per request_id)."""

    async def get_definition(self, definition_id: str) -> models.WorkflowDefinition:
        """One definition, NOT_FOUND if unknown."""

    async def list_definitions(
        self, page_size: int, page_token: str, name: str, budget: Budget
    ) -> models.Page[models.WorkflowDefinition]:
        """A page of definitions, oldest first, cut to fit `budget`."""


class RunStore(Protocol):
    """Workflow runs: triggering, reading, cancelling."""

    async def create_run(self, request: NewRun) -> models.WorkflowRun:
        """Start a run, its root tasks queued; a repeated request_id returns the first run."""

    async def read_run(
        self, run_id: str, view: models.RunView, budget: Budget
    ) -> models.WorkflowRun:
        """One run in `view`, cut to fit `budget`; NOT_FOUND if unknown."""

    async def list_runs(
        self,
        page_size: int,
        page_token: str,
        where: models.RunFilter,
        order: models.RunOrder,
        view: models.RunView,
        budget: Budget,
    ) -> models.Page[models.WorkflowRun]:
        """A page of the runs `where` matches in `order`, in `view`, cut to fit `budget`."""

    async def list_run_tasks(
        self, run_id: str, page_size: int, page_token: str, budget: Budget
    ) -> models.Page[models.TaskRun]:
        """A page of a run's tasks in definition order, cut to fit `budget`."""

    async def cancel_run(
        self,
        run_id: str,
        now: datetime,
        on_commit: OnCommit[models.Effects],
    ) -> models.WorkflowRun:
        """Cancel an unfinished run; FAILED_PRECONDITION for a finished one."""

    async def observe_watched(self) -> None:
        """Run a write batch now, for its observation of the watched runs (see
        `domain.watch`)."""

    def fit_run(self, run: models.WorkflowRun, budget: Budget) -> models.WorkflowRun:
        """A run read whole cut to fit `budget`, with a token for the rest of its tasks."""


class TaskStore(Protocol):
    """Tasks: the queue, assignments and the results agents report."""

    async def load_queue(self) -> list[models.ReadyTask]:
        """Every queued task, in the order they became ready."""

    async def assign(
        self,
        pairs: Sequence[tuple[models.ReadyTask, str]],
        now: datetime,
        on_commit: OnCommit[list[models.Placed]],
    ) -> list[models.Placed]:
        """Hand each queued task to its agent as a new attempt (`Unassigned` where the task is
        no longer queued, or the agent no longer takes work)."""

    async def claim(
        self, wants: list[Want], now: datetime, place: Place, on_commit: Assigned
    ) -> Claimed:
        """Lock the earliest queued tasks each of `wants` asks for, skipping those another
        writer has locked; match them (with `place`, as a write's own tasks) and assign the
        matches in the same transaction, which `on_commit` gets once committed."""

    async def complete_task(self, result: TaskResult) -> None:
        """Record an attempt's output and queue the dependents that became ready."""

    async def fail_task(
        self,
        task_id: str,
        agent_id: str,
        attempt: int,
        error: str,
        retryable: bool,
        now: datetime,
        on_commit: OnCommit[models.Effects],
    ) -> None:
        """Record an attempt's failure: retried under the task's policy, or final."""

    async def extend_lease(
        self, task_id: str, agent_id: str, attempt: int, extend_by: timedelta, now: datetime
    ) -> datetime:
        """Move the attempt's lease to at least `now + extend_by`."""


class TimerStore(Protocol):
    """What ends with time: leases and agents' grace periods."""

    async def next_timers(self) -> tuple[datetime | None, datetime | None]:
        """The earliest lease deadline, and the earliest grace start of a disconnected agent."""

    async def expire_leases(
        self, now: datetime, quarantine_after: int, on_commit: OnCommit[models.Effects]
    ) -> None:
        """Fail every attempt whose lease has ended; quarantine agents that expire too often."""

    async def lose_agents(
        self, cutoff: datetime, now: datetime, on_commit: OnCommit[models.Effects]
    ) -> None:
        """Agents disconnected since `cutoff` or earlier are lost, with the attempts they hold."""


class ReplicaStore(Protocol):
    """The replicas sharing the database, each under a lease."""

    async def join(
        self, replica_id: str, address: str, now: datetime, lease: timedelta, *, alone: bool
    ) -> Beat:
        """Record this replica as `replica_id`, under a lease ending `lease` from now; with
        `alone`, no other server shares the database and every agent is disconnected."""

    async def beat(self, now: datetime, lease: timedelta) -> Beat:
        """Renew this replica's lease; declare the lapsed ones dead, disconnecting their
        agents (each handled once, by whichever replica comes first)."""

    async def leave(self, now: datetime) -> None:
        """Leave: this replica stops, its row goes and its agents are disconnected."""


class Persistence(Protocol):
    """Every repository the engine calls, one an aggregate (the store's `Store` is one)."""

    @property
    def agents(self) -> AgentStore:
        """Agents."""

    @property
    def definitions(self) -> DefinitionStore:
        """Workflow definitions."""

    @property
    def runs(self) -> RunStore:
        """Workflow runs."""

    @property
    def tasks(self) -> TaskStore:
        """Tasks."""

    @property
    def timers(self) -> TimerStore:
        """What ends with time."""

    @property
    def replicas(self) -> ReplicaStore:
        """The replicas sharing the database."""
