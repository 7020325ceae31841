"""An in-memory `Persistence` for engine tests: plain dicts, no SQL, no writer.

It keeps the contract the real store keeps (opscore/store/queries, opscore/store/assignments):
every write is checked whole before it changes anything, so a refused write changes nothing; its
`on_commit` runs once it has "committed", before its caller goes on; a write whose effects queue
tasks or free slots lets the dispatcher place tasks in the same commit (`assign_before_commit`),
whose assignments are taken after the write's own callbacks; leases end, agents are lost after
their grace, expiries in a row quarantine an agent and a success resets the count, and a failed
attempt is retried under its task's policy with its backoff. What an outcome means for a run (a
task queued, a fallback standing in, a run finished) is decided by the domain's pure functions,
not here. Listings are cut by page size only, never by bytes.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from opscore.domain import graph, idempotency, waiting
from opscore.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Resource,
    ResultConflict,
)
from opscore.domain.ids import new_id
from opscore.domain.models import (
    Agent,
    AgentRegistration,
    AgentState,
    Assignment,
    Cancellation,
    DefinitionDraft,
    Effects,
    Hold,
    JsonObject,
    Page,
    ReadyTask,
    ReportedState,
    RetryPolicy,
    RunFilter,
    RunOrder,
    RunState,
    RunView,
    TaskRun,
    TaskSpec,
    TaskState,
    WorkflowDefinition,
    WorkflowRun,
)
from opscore.domain.ports import (
    Assigned,
    Connected,
    CreatedRun,
    NewRun,
    OnCommit,
    Place,
    TaskResult,
)
from opscore.domain.responses import Budget, count_states
from opscore.domain.retry import ResolvedRetryPolicy
from opscore.domain.waiting import Offer, Requirement

T = TypeVar("T")

TIMED_OUT = "timed out"
"""The error of an attempt whose lease ended."""
AGENT_LOST = "agent lost"
"""The error of an attempt whose agent stayed away past its grace."""
CANCEL_REASONS = {RunState.CANCELLED: "run cancelled", RunState.FAILED: "run failed"}
"""Why the holders of a run's tasks are told to stop, by how the run ended."""


@dataclass(slots=True)
class _Agent:
    agent_id: str
    name: str
    version: str
    capabilities: tuple[str, ...]
    labels: dict[str, str]
    max_concurrent_tasks: int
    registered_at: datetime
    last_seen_at: datetime
    reported_state: ReportedState = ReportedState.NONE
    state_detail: str = ""
    connected: bool = False
    disconnected_at: datetime | None = None
    """When its stream closed: its grace runs from then (None once lost, or while connected)."""
    lease_expiries: int = 0
    """Its leases that ended in a row, since its last success."""
    quarantined: bool = False


@dataclass(slots=True)
class _Task:
    row: TaskRun
    """The task as stored (replaced whole at each change)."""
    input: JsonObject
    timeout: timedelta | None
    retry_policy: RetryPolicy | None
    error_reported: bool = False
    """Whether `row.error` is a failure its holder reported (not one the server declared)."""


@dataclass(slots=True)
class _Run:
    run: WorkflowRun
    """The run as stored, without its tasks."""
    task_ids: list[str]
    """Its tasks, in definition order."""
    fingerprint: str | None


@dataclass(slots=True)
class _Placement:
    place: Place
    assigned: Assigned
    now: Callable[[], datetime]
    default_timeout: timedelta


@dataclass(slots=True)
class _Commit:
    """A write's callbacks and the effects it notes for placement, run by `_commit`."""

    callbacks: list[Callable[[], None]] = field(default_factory=list)
    noted: list[Effects] = field(default_factory=list)


class MemoryStore:
    """The engine's `Persistence` in plain dicts (see the module docstring)."""

    def __init__(self, retry: ResolvedRetryPolicy, rng: random.Random | None = None) -> None:
        self._retry = retry
        self._rng = rng or random.Random(0)
        self._agents: dict[str, _Agent] = {}
        self._definitions: dict[str, WorkflowDefinition] = {}
        self._definition_requests: dict[str, str] = {}
        self._runs: dict[str, _Run] = {}
        self._run_requests: dict[str, str] = {}
        self._tasks: dict[str, _Task] = {}
        self._placement: _Placement | None = None

    # What tests look at ------------------------------------------------------------------

    def lease_expiries(self, agent_id: str) -> int:
        """The agent's count of leases that ended in a row."""
        return self._agents[agent_id].lease_expiries

    # Commits -----------------------------------------------------------------------------

    def _commit(self, commit: _Commit) -> None:
        """Commit a write that has changed the dicts: let the dispatcher place what it noted
        (as the writer's `before_commit` does, in the same commit), then run the write's
        callbacks and the placement's, in that order."""
        callbacks = list(commit.callbacks)
        placement = self._placement
        if placement is not None and commit.noted:
            queued = [task for noted in commit.noted for task in noted.queued]
            released = [
                (hold.agent_id, hold.task_id) for noted in commit.noted for hold in noted.released
            ]
            pairs, _undo = placement.place(queued, released)  # nothing here fails to commit
            if pairs:
                written = self._assign(pairs, placement.now(), placement.default_timeout)
                callbacks.append(lambda: placement.assigned(pairs, written))
        for callback in callbacks:
            callback()

    def _write(self, value: T, on_commit: OnCommit[T] | None = None) -> T:
        """Commit a write whose outcome is `value`: Effects are noted for placement, as the
        real store notes them."""
        commit = _Commit()
        if isinstance(value, Effects):
            commit.noted.append(value)
        if on_commit is not None:
            commit.callbacks.append(lambda: on_commit(value))
        self._commit(commit)
        return value

    # Agents ------------------------------------------------------------------------------

    async def register_agent(
        self, registration: AgentRegistration, now: datetime, on_commit: OnCommit[Agent]
    ) -> Agent:
        agent_id = registration.agent_id or new_id()
        capabilities = tuple(sorted(set(registration.capabilities)))
        found = self._agents.get(agent_id)
        if found is None:
            self._agents[agent_id] = _Agent(
                agent_id,
                registration.name,
                registration.version,
                capabilities,
                dict(registration.labels),
                registration.max_concurrent_tasks,
                registered_at=now,
                last_seen_at=now,
            )
        else:
            found.name, found.version = registration.name, registration.version
            found.capabilities, found.labels = capabilities, dict(registration.labels)
            found.max_concurrent_tasks = registration.max_concurrent_tasks
            found.last_seen_at = now
            if found.quarantined:  # registering again lifts a quarantine
                found.reported_state, found.state_detail = ReportedState.NONE, ""
            found.quarantined, found.lease_expiries = False, 0
        return self._write(self._agent(agent_id), on_commit)

    async def deregister_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Effects]
    ) -> Effects:
        self._agent_of(agent_id)
        effects = Effects()
        for task in self._held_by([agent_id]):
            row = task.row
            if row.pinned_agent_id == agent_id:
                continue
            effects.released.append(Hold(agent_id, row.task_id, row.run_id, row.attempt))
            effects.queued.append(row.ready(row.not_before))
            task.row = dataclasses.replace(
                row, state=TaskState.QUEUED, queued_at=now, deadline=None
            )
        effects.merge(self._fail_pinned(agent_id, now))
        del self._agents[agent_id]
        return self._write(effects, on_commit)

    def _fail_pinned(self, agent_id: str, now: datetime) -> Effects:
        """Fail finally every task pinned to the agent that waits for it or that it holds, and
        the fallbacks that this queues, until none is left."""
        error = waiting.DEREGISTERED.format(agent_id=agent_id)
        effects = Effects()
        while pinned := self._waiting_for(agent_id):
            for task in pinned:
                if task.row.state in (TaskState.QUEUED, TaskState.ASSIGNED):
                    effects.merge(
                        self._fail_attempt(task, error, retryable=False, reported=False, now=now)
                    )
        # A fallback queued and failed in this same write never reached the dispatcher.
        gone = set(effects.unqueued) & {task.task_id for task in effects.queued}
        effects.queued = [task for task in effects.queued if task.task_id not in gone]
        effects.unqueued = [task_id for task_id in effects.unqueued if task_id not in gone]
        return effects

    def _waiting_for(self, agent_id: str) -> list[_Task]:
        """The unfinished tasks pinned to the agent that could still run, in run and graph
        order."""
        found = [
            task
            for task in self._tasks.values()
            if task.row.pinned_agent_id == agent_id
            and task.row.state in (TaskState.QUEUED, TaskState.ASSIGNED)
        ]
        return sorted(found, key=lambda task: (task.row.run_id, task.row.position))

    async def touch_agent(self, agent_id: str, now: datetime) -> None:
        self._agent_of(agent_id).last_seen_at = now
        self._write(None)

    async def report_state(
        self,
        agent_id: str,
        state: ReportedState,
        detail: str,
        now: datetime,
        on_commit: OnCommit[Agent],
    ) -> Agent:
        found = self._agent_of(agent_id)
        found.reported_state, found.state_detail, found.last_seen_at = state, detail, now
        if state is ReportedState.IDLE:
            found.quarantined, found.lease_expiries = False, 0
        return self._write(self._agent(agent_id), on_commit)

    async def get_agent(self, agent_id: str) -> Agent:
        self._agent_of(agent_id)
        return self._agent(agent_id)

    async def list_agents(
        self,
        page_size: int,
        page_token: str,
        state: AgentState | None,
        capability: str,
        budget: Budget,
    ) -> Page[Agent]:
        agents = [self._agent(agent_id) for agent_id in sorted(self._agents)]
        chosen = [
            agent
            for agent in agents
            if (state is None or agent.state is state)
            and (not capability or capability in agent.capabilities)
        ]
        return _page(chosen, page_size, page_token)

    async def connect_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Connected]
    ) -> Connected:
        found = self._agent_of(agent_id)
        found.connected, found.last_seen_at, found.disconnected_at = True, now, None
        held = [
            self._assignment(task, task.row.attempt, agent_id, _deadline(task), redelivered=True)
            for task in self._held_by([agent_id])
        ]
        return self._write(Connected(self._agent(agent_id).profile(), held), on_commit)

    async def disconnect_agent(
        self, agent_id: str, now: datetime, still_current: Callable[[], bool]
    ) -> None:
        found = self._agents.get(agent_id)
        if still_current() and found is not None:
            found.connected, found.last_seen_at, found.disconnected_at = False, now, now
        self._write(None)

    async def reset_connections(self, now: datetime) -> None:
        for found in self._agents.values():
            if found.connected or found.disconnected_at is not None:
                found.connected, found.disconnected_at = False, now
        self._write(None)

    async def waiting_candidates(
        self, tasks: Sequence[TaskRun]
    ) -> tuple[dict[str, Agent], dict[Requirement, Offer]]:
        pinned = {
            task.pinned_agent_id: self._agent(task.pinned_agent_id)
            for task in tasks
            if task.pinned_agent_id in self._agents
        }
        offers: dict[Requirement, Offer] = {}
        for needs in {waiting.requirement(task) for task in tasks if not task.pinned_agent_id}:
            capability, labels = needs
            fit = [
                agent
                for agent in self._agents.values()
                if (not capability or capability in agent.capabilities)
                and all(agent.labels.get(key) == value for key, value in labels)
            ]
            offers[needs] = Offer(bool(fit), any(agent.connected for agent in fit))
        return pinned, offers

    def _agent_of(self, agent_id: str) -> _Agent:
        found = self._agents.get(agent_id)
        if found is None:
            raise NotFound(Resource.AGENT, agent_id)
        return found

    def _agent(self, agent_id: str) -> Agent:
        found = self._agents[agent_id]
        return Agent(
            agent_id=agent_id,
            name=found.name,
            version=found.version,
            capabilities=found.capabilities,
            labels=dict(found.labels),
            max_concurrent_tasks=found.max_concurrent_tasks,
            reported_state=found.reported_state,
            state_detail=found.state_detail,
            connected=found.connected,
            running_tasks=len(self._held_by([agent_id])),
            registered_at=found.registered_at,
            last_seen_at=found.last_seen_at,
        )

    def _held_by(self, agent_ids: Iterable[str]) -> list[_Task]:
        """The tasks these agents hold, oldest assignment first."""
        holders = set(agent_ids)
        held = [
            task
            for task in self._tasks.values()
            if task.row.state is TaskState.ASSIGNED and task.row.agent_id in holders
        ]
        return sorted(held, key=lambda task: (_assigned_at(task), task.row.task_id))

    # Definitions -------------------------------------------------------------------------

    async def create_definition(
        self, draft: DefinitionDraft, request_id: str, now: datetime
    ) -> WorkflowDefinition:
        if request_id in self._definition_requests:
            stored = self._definitions[self._definition_requests[request_id]]
            idempotency.check_repeated_definition(request_id, draft, stored)
            return stored
        versions = [
            definition.version
            for definition in self._definitions.values()
            if definition.workflow_name == draft.workflow_name
        ]
        definition = WorkflowDefinition(
            definition_id=new_id(),
            workflow_name=draft.workflow_name,
            version=max(versions, default=0) + 1,
            description=draft.description,
            tasks=draft.tasks,
            created_at=now,
        )
        self._definitions[definition.definition_id] = definition
        if request_id:
            self._definition_requests[request_id] = definition.definition_id
        return self._write(definition)

    async def get_definition(self, definition_id: str) -> WorkflowDefinition:
        found = self._definitions.get(definition_id)
        if found is None:
            raise NotFound(Resource.DEFINITION, definition_id)
        return found

    async def list_definitions(
        self, page_size: int, page_token: str, name: str, budget: Budget
    ) -> Page[WorkflowDefinition]:
        chosen = [
            self._definitions[definition_id]
            for definition_id in sorted(self._definitions)
            if not name or self._definitions[definition_id].workflow_name == name
        ]
        return _page(chosen, page_size, page_token)

    # Runs --------------------------------------------------------------------------------

    async def create_run(self, request: NewRun) -> CreatedRun:
        earlier = self._run_requests.get(request.request_id) if request.request_id else None
        if earlier is not None:
            stored = self._runs[earlier]
            idempotency.check_repeated_trigger(
                request.request_id, request.fingerprint, earlier, stored.fingerprint
            )
            # A repeated trigger queues nothing, and notes nothing for placement.
            repeated = CreatedRun(self._whole_run(earlier), False, Effects())
            return self._write(repeated, request.on_commit)
        pinned = None
        if request.agent_id:
            self._agent_of(request.agent_id)
            pinned = self._agent(request.agent_id)
        name, definition_id, specs = self._source(request)
        if pinned is not None:
            waiting.check_pinned_agent(pinned, specs)
        run_id = new_id()
        states = graph.initial_states(
            {spec.name: graph.Node(spec.depends_on, spec.fallback) for spec in specs}
        )
        tasks: list[TaskRun] = []
        for position, spec in enumerate(specs):
            root = states[spec.name] is TaskState.QUEUED
            task = TaskRun(
                task_id=new_id(),
                run_id=run_id,
                name=spec.name,
                position=position,
                state=states[spec.name],
                attempt=0,
                agent_id="",
                output=None,
                error="",
                queued_at=request.now if root else None,
                assigned_at=None,
                finished_at=None,
                deadline=None,
                capability=spec.capability,
                labels=dict(spec.labels),
                depends_on=spec.depends_on,
                fallback=spec.fallback,
                pinned_agent_id=request.agent_id,
            )
            task_input = {**spec.input, **request.run_input}
            self._tasks[task.task_id] = _Task(task, task_input, spec.timeout, spec.retry_policy)
            tasks.append(task)
        run = WorkflowRun(
            run_id=run_id,
            definition_id=definition_id,
            workflow_name=name,
            agent_id=request.agent_id,
            state=RunState.PENDING,
            input=dict(request.run_input),
            tasks=(),
            created_at=request.now,
            started_at=None,
            finished_at=None,
        )
        self._runs[run_id] = _Run(
            run, [task.task_id for task in tasks], request.fingerprint or None
        )
        if request.request_id:
            self._run_requests[request.request_id] = run_id
        queued = [task.ready() for task in tasks if task.state is TaskState.QUEUED]
        created = CreatedRun(
            dataclasses.replace(run, tasks=tuple(tasks), task_counts=count_states(tasks)),
            True,
            Effects(queued=queued),
        )
        return self._created(created, request)

    def _created(self, created: CreatedRun, request: NewRun) -> CreatedRun:
        """Commit a new run: the roots it queues are noted for placement."""
        commit = _Commit([lambda: request.on_commit(created)], [created.effects])
        self._commit(commit)
        return created

    def _source(self, request: NewRun) -> tuple[str, str, Sequence[TaskSpec]]:
        """The workflow's name, its stored definition's id ("" for an inline one) and its
        tasks."""
        if request.inline is not None:
            return request.inline.workflow_name, "", request.inline.tasks
        if request.definition_id:
            definition = self._definitions.get(request.definition_id)
            if definition is None:
                raise NotFound(Resource.DEFINITION, request.definition_id)
        else:
            named = [
                found
                for found in self._definitions.values()
                if found.workflow_name == request.workflow_name
            ]
            if not named:
                raise NotFound(Resource.DEFINITION, request.workflow_name, named=True)
            definition = max(named, key=lambda found: found.version)
        return definition.workflow_name, definition.definition_id, definition.tasks

    async def read_run(self, run_id: str, view: RunView, budget: Budget) -> WorkflowRun:
        return self._view(self._run_of(run_id), view)

    async def list_runs(
        self,
        page_size: int,
        page_token: str,
        where: RunFilter,
        order: RunOrder,
        view: RunView,
        budget: Budget,
    ) -> Page[WorkflowRun]:
        chosen = [stored for stored in self._runs.values() if _matches(stored.run, where)]
        chosen.sort(
            key=lambda stored: (stored.run.created_at, stored.run.run_id),
            reverse=order is RunOrder.NEWEST_FIRST,
        )
        return _page([self._view(stored, view) for stored in chosen], page_size, page_token)

    async def list_run_tasks(
        self, run_id: str, page_size: int, page_token: str, budget: Budget
    ) -> Page[TaskRun]:
        return _page(self._tasks_of(self._run_of(run_id)), page_size, page_token)

    async def cancel_run(
        self,
        run_id: str,
        now: datetime,
        on_commit: OnCommit[tuple[WorkflowRun, Effects]],
    ) -> tuple[WorkflowRun, Effects]:
        stored = self._run_of(run_id)
        if stored.run.state.finished:
            raise FailedPrecondition(f"run {run_id!r} is already {stored.run.state.value}")
        states = {task.name: task.state for task in self._tasks_of(stored)}
        effects = self._transition(stored, graph.cancel(states), now)
        # As in the real store, a cancellation's effects are not noted for placement: the
        # dispatcher's loop fills the slots it frees.
        return self._write((self._whole_run(run_id), effects), on_commit)

    def fit_run(self, run: WorkflowRun, budget: Budget) -> WorkflowRun:
        return run

    def _run_of(self, run_id: str) -> _Run:
        found = self._runs.get(run_id)
        if found is None:
            raise NotFound(Resource.RUN, run_id)
        return found

    def _tasks_of(self, stored: _Run) -> list[TaskRun]:
        return [self._tasks[task_id].row for task_id in stored.task_ids]

    def _whole_run(self, run_id: str) -> WorkflowRun:
        return self._view(self._runs[run_id], RunView.FULL)

    def _view(self, stored: _Run, view: RunView) -> WorkflowRun:
        tasks = self._tasks_of(stored)
        return dataclasses.replace(
            stored.run,
            tasks=tuple(tasks) if view is RunView.FULL else (),
            task_counts=count_states(tasks),
        )

    # Tasks -------------------------------------------------------------------------------

    async def load_queue(self) -> list[ReadyTask]:
        queued = [task.row for task in self._tasks.values() if task.row.state is TaskState.QUEUED]
        queued.sort(key=lambda row: (row.queued_at, row.task_id))
        return [row.ready(row.not_before) for row in queued]

    async def assign(
        self,
        pairs: Sequence[tuple[ReadyTask, str]],
        now: datetime,
        default_timeout: timedelta,
        on_commit: OnCommit[list[Assignment | None]],
    ) -> list[Assignment | None]:
        return self._write(self._assign(pairs, now, default_timeout), on_commit)

    def assign_before_commit(
        self,
        place: Place,
        on_commit: Assigned,
        now: Callable[[], datetime],
        default_timeout: timedelta,
    ) -> None:
        self._placement = _Placement(place, on_commit, now, default_timeout)

    def _assign(
        self, pairs: Sequence[tuple[ReadyTask, str]], now: datetime, default_timeout: timedelta
    ) -> list[Assignment | None]:
        """Each queued task as a new attempt of its agent, if that agent still takes work
        (connected, not reporting BUSY or ERROR); None in the place of the others."""
        taking = {
            agent_id
            for _, agent_id in pairs
            if (found := self._agents.get(agent_id)) is not None
            and found.connected
            and found.reported_state not in (ReportedState.BUSY, ReportedState.ERROR)
        }
        leases: dict[str, str] = {}
        for ready, agent_id in pairs:
            task = self._tasks.get(ready.task_id)
            if (
                task is not None
                and task.row.state is TaskState.QUEUED
                and ready.task_id not in leases
                and agent_id in taking
            ):
                leases[ready.task_id] = agent_id
                row = task.row
                task.row = dataclasses.replace(
                    row,
                    state=TaskState.ASSIGNED,
                    attempt=row.attempt + 1,
                    agent_id=agent_id,
                    assigned_at=now,
                    deadline=now + (task.timeout or default_timeout),
                    not_before=None,
                )
                stored = self._runs[row.run_id]
                if stored.run.state is RunState.PENDING:
                    stored.run = dataclasses.replace(
                        stored.run, state=RunState.RUNNING, started_at=now
                    )
        return [
            self._assignment(
                self._tasks[ready.task_id],
                self._tasks[ready.task_id].row.attempt,
                agent_id,
                _deadline(self._tasks[ready.task_id]),
                redelivered=False,
            )
            if leases.get(ready.task_id) == agent_id
            else None
            for ready, agent_id in pairs
        ]

    def _assignment(
        self, task: _Task, attempt: int, agent_id: str, deadline: datetime, *, redelivered: bool
    ) -> Assignment:
        """The message for an attempt: the task's input, its dependencies' outputs (a failed
        dependency's fallback's under the dependency's name), and for a fallback the task it
        stands in for and that task's last error."""
        row = task.row
        siblings = {sibling.name: sibling for sibling in self._tasks_of(self._runs[row.run_id])}
        outputs: dict[str, JsonObject] = {}
        for name in row.depends_on:
            dependency = siblings[name]
            if dependency.state is TaskState.FAILED and dependency.fallback:
                dependency = siblings[dependency.fallback]
            outputs[name] = dependency.output or {}
        primary = next((found for found in siblings.values() if found.fallback == row.name), None)
        return Assignment(
            task_id=row.task_id,
            run_id=row.run_id,
            task_name=row.name,
            capability=row.capability,
            attempt=attempt,
            agent_id=agent_id,
            input=dict(task.input),
            dependency_outputs=outputs,
            deadline=deadline,
            redelivered=redelivered,
            fallback_for=primary.name if primary is not None else "",
            fallback_error=primary.error if primary is not None else "",
        )

    async def complete_task(self, result: TaskResult) -> Effects:
        task = self._task_of(result.task_id)
        if not _check_held(task, result.agent_id, result.attempt, _succeeded):
            idempotency.check_repeated_output(result.task_id, task.row.output, result.output)
            return self._write(Effects(), result.on_commit)
        row = task.row
        stored = self._runs[row.run_id]
        transition = graph.succeed(
            _graph(self._tasks_of(stored)), _states(self._tasks_of(stored)), row.name
        )
        task.row = dataclasses.replace(
            row,
            state=TaskState.SUCCEEDED,
            output=result.output,
            not_before=None,
            finished_at=result.now,
        )
        rest = graph.Transition(
            {name: state for name, state in transition.tasks.items() if name != row.name},
            transition.run_state,
        )
        effects = self._transition(stored, rest, result.now)
        effects.released.append(Hold(result.agent_id, row.task_id, row.run_id, result.attempt))
        if result.agent_id in self._agents:
            self._agents[result.agent_id].lease_expiries = 0
        return self._write(effects, result.on_commit)

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
        task = self._task_of(task_id)
        if not _check_held(task, agent_id, attempt, _failed_with(error)):
            return self._write(Effects(), on_commit)
        effects = self._fail_attempt(task, error, retryable=retryable, reported=True, now=now)
        return self._write(effects, on_commit)

    async def extend_lease(
        self, task_id: str, agent_id: str, attempt: int, extend_by: timedelta, now: datetime
    ) -> datetime:
        task = self._task_of(task_id)
        _check_held(task, agent_id, attempt, _never_recorded)
        deadline = max(_deadline(task), now + extend_by)
        task.row = dataclasses.replace(task.row, deadline=deadline)
        return self._write(deadline)

    def _task_of(self, task_id: str) -> _Task:
        found = self._tasks.get(task_id)
        if found is None:
            raise NotFound(Resource.TASK, task_id)
        return found

    def _fail_attempt(
        self, task: _Task, error: str, *, retryable: bool, reported: bool, now: datetime
    ) -> Effects:
        """An attempt failed (`reported` by its holder, or declared by the server): the task
        is queued again after its backoff while its policy allows, else it fails finally."""
        row = task.row
        policy = self._retry.resolve(task.retry_policy)
        task.error_reported = reported
        if retryable and policy.may_retry(row.attempt):
            not_before = now + policy.delay(row.attempt, self._rng)
            task.row = dataclasses.replace(
                row, state=TaskState.QUEUED, error=error, queued_at=now, not_before=not_before
            )
            effects = Effects(queued=[row.ready(not_before)])
        else:
            task.row = dataclasses.replace(row, error=error)
            stored = self._runs[row.run_id]
            tasks = self._tasks_of(stored)
            effects = self._transition(
                stored, graph.fail(_graph(tasks), _states(tasks), row.name), now
            )
        if row.state is TaskState.ASSIGNED:  # not a queued task the server failed
            effects.released.append(Hold(row.agent_id, row.task_id, row.run_id, row.attempt))
        return effects

    def _transition(self, stored: _Run, transition: graph.Transition, now: datetime) -> Effects:
        """Write a transition of the run's graph, and say what it means for the dispatcher and
        the agents (as `store.changes.apply_transition` does)."""
        effects = Effects()
        by_name = {
            self._tasks[task_id].row.name: self._tasks[task_id] for task_id in stored.task_ids
        }
        reason = CANCEL_REASONS.get(transition.run_state or RunState.RUNNING, "")
        for name, state in transition.tasks.items():
            task = by_name[name]
            before = task.row
            if state is TaskState.QUEUED:
                effects.queued.append(before.ready())
                task.row = dataclasses.replace(before, state=state, not_before=None, queued_at=now)
                continue
            task.row = dataclasses.replace(before, state=state, not_before=None, finished_at=now)
            if before.state is TaskState.QUEUED:
                effects.unqueued.append(before.task_id)
            elif before.state is TaskState.ASSIGNED and state in (
                TaskState.SKIPPED,
                TaskState.CANCELLED,
            ):
                hold = Hold(before.agent_id, before.task_id, before.run_id, before.attempt)
                effects.released.append(hold)
                effects.cancelled.append(
                    Cancellation(hold.agent_id, hold.task_id, hold.run_id, hold.attempt, reason)
                )
        if transition.run_state is not None:
            stored.run = dataclasses.replace(
                stored.run, state=transition.run_state, finished_at=now
            )
            effects.finished_runs.append((stored.run.run_id, transition.run_state))
        return effects

    # Timers ------------------------------------------------------------------------------

    async def next_timers(self) -> tuple[datetime | None, datetime | None]:
        deadlines = [
            _deadline(task) for task in self._tasks.values() if task.row.state is TaskState.ASSIGNED
        ]
        disconnected = [
            agent.disconnected_at
            for agent in self._agents.values()
            if not agent.connected and agent.disconnected_at is not None
        ]
        return min(deadlines, default=None), min(disconnected, default=None)

    async def expire_leases(
        self, now: datetime, quarantine_after: int, on_commit: OnCommit[Effects], limit: int = 500
    ) -> Effects:
        due = [
            task
            for task in self._tasks.values()
            if task.row.state is TaskState.ASSIGNED and _deadline(task) <= now
        ]
        due.sort(key=_deadline)
        effects = self._fail_held(due[:limit], TIMED_OUT, now)
        expired: dict[str, int] = {}
        for cancellation in effects.cancelled:
            if cancellation.reason == TIMED_OUT:
                expired[cancellation.agent_id] = expired.get(cancellation.agent_id, 0) + 1
        for agent_id, count in expired.items():
            found = self._agents[agent_id]
            found.lease_expiries += count
            if found.lease_expiries >= quarantine_after and not found.quarantined:
                found.quarantined = True
                found.reported_state = ReportedState.ERROR
                found.state_detail = (
                    f"quarantined: {found.lease_expiries} task leases expired in a row; report "
                    "IDLE or register again to take work"
                )
                effects.quarantined.append((self._agent(agent_id).profile(), found.lease_expiries))
        return self._write(effects, on_commit)

    async def lose_agents(
        self, cutoff: datetime, now: datetime, on_commit: OnCommit[Effects]
    ) -> Effects:
        lost = [
            agent
            for agent in self._agents.values()
            if not agent.connected
            and agent.disconnected_at is not None
            and agent.disconnected_at <= cutoff
        ]
        for agent in lost:
            agent.disconnected_at = None
        held = self._held_by(agent.agent_id for agent in lost)
        return self._write(self._fail_held(held, AGENT_LOST, now), on_commit)

    def _fail_held(self, tasks: list[_Task], error: str, now: datetime) -> Effects:
        """Fail the current attempt of each task still held (retryable), telling its holder to
        stop."""
        effects = Effects()
        for task in tasks:
            row = task.row
            if row.state is not TaskState.ASSIGNED:  # its run failed earlier in this write
                continue
            effects.merge(self._fail_attempt(task, error, retryable=True, reported=False, now=now))
            effects.cancelled.append(
                Cancellation(row.agent_id, row.task_id, row.run_id, row.attempt, error)
            )
        return effects


# Results -----------------------------------------------------------------------------------


def _succeeded(task: _Task) -> bool:
    return task.row.state is TaskState.SUCCEEDED


def _failed_as_reported(task: _Task) -> bool:
    """Whether the task failed, or waits for its retry, after its holder reported a failure."""
    return task.row.state in (TaskState.FAILED, TaskState.QUEUED) and task.error_reported


def _failed_with(error: str) -> Callable[[_Task], bool]:
    """Whether this very failure was recorded, as its holder reported it."""
    return lambda task: _failed_as_reported(task) and task.row.error == error


def _never_recorded(_task: _Task) -> bool:
    return False


def _check_held(
    task: _Task, agent_id: str, attempt: int, recorded: Callable[[_Task], bool]
) -> bool:
    """True if `agent_id` holds `attempt` of the task; False if that holder's result was
    already `recorded` (a retried call); FAILED_PRECONDITION for any other holder, attempt or
    state (ResultConflict for another result of a finished attempt)."""
    row = task.row
    holder = row.agent_id == agent_id and row.attempt == attempt
    if holder and row.state is TaskState.ASSIGNED:
        return True
    if holder and recorded(task):
        return False
    if holder and row.state is TaskState.SUCCEEDED:
        raise ResultConflict(row.task_id, "it succeeded")
    if holder and _failed_as_reported(task):
        raise ResultConflict(row.task_id, "it failed")
    if row.state is TaskState.ASSIGNED or not holder:
        raise FailedPrecondition(
            f"agent {agent_id!r} does not hold attempt {attempt} of task {row.task_id!r}"
        )
    raise FailedPrecondition(f"task {row.task_id!r} is {row.state.value}, not assigned")


# Plain helpers -----------------------------------------------------------------------------


def _deadline(task: _Task) -> datetime:
    deadline = task.row.deadline
    assert deadline is not None, f"task {task.row.task_id} was never assigned"
    return deadline


def _assigned_at(task: _Task) -> datetime:
    assigned_at = task.row.assigned_at
    assert assigned_at is not None, f"task {task.row.task_id} was never assigned"
    return assigned_at


def _graph(tasks: Sequence[TaskRun]) -> graph.Graph:
    return {task.name: graph.Node(task.depends_on, task.fallback) for task in tasks}


def _states(tasks: Sequence[TaskRun]) -> dict[str, TaskState]:
    return {task.name: task.state for task in tasks}


def _matches(run: WorkflowRun, where: RunFilter) -> bool:
    return (
        (where.state is None or run.state is where.state)
        and (not where.definition_id or run.definition_id == where.definition_id)
        and (not where.agent_id or run.agent_id == where.agent_id)
        and (not where.workflow_name or run.workflow_name == where.workflow_name)
        and (where.created_after is None or run.created_at >= where.created_after)
        and (where.created_before is None or run.created_at < where.created_before)
    )


def _page(items: Sequence[T], page_size: int, page_token: str) -> Page[T]:
    """A page of `items` from the position its token names, by count alone."""
    if page_token and not page_token.isdigit():
        raise InvalidArgument.single("page_token", "is not a token this store issued")
    start = int(page_token or 0)
    end = start + page_size
    return Page(tuple(items[start:end]), str(end) if end < len(items) else "")
