"""An in-memory `Persistence` for engine tests: plain dicts, no SQL, no writer.

It keeps the contract the real store keeps (opscore/store/queries, opscore/store/assignments):
every write is checked whole before it changes anything, so a refused write changes nothing; its
`on_commit` runs once it has "committed", before its caller goes on; a write whose effects queue
tasks or free slots lets the dispatcher place tasks in the same commit (`placement`), whose
assignments are taken after the write's own callbacks; leases end, agents are lost after their
grace, expiries in a row quarantine an agent and a success resets the count. What each event
decides (a retry and its backoff, a fallback standing in, a run finished, a result refused) is
the state machine's (`ports.Rules`), as in the real store: this module only keeps what it
decides. Listings are cut by page size only, never by bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from opscore.domain import idempotency, waiting
from opscore.domain.errors import InvalidArgument, NotFound, Resource
from opscore.domain.ids import new_id
from opscore.domain.models import (
    Agent,
    AgentRegistration,
    AgentState,
    DefinitionDraft,
    Effects,
    JsonObject,
    Page,
    Placed,
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
    Unassigned,
    WorkflowDefinition,
    WorkflowRun,
)
from opscore.domain.ports import (
    Assigned,
    Beat,
    Connected,
    CreatedRun,
    NewRun,
    OnCommit,
    Place,
    Rules,
    TaskResult,
)
from opscore.domain.responses import Budget, count_states
from opscore.domain.state import (
    Decision,
    Move,
    QueuedTask,
    Reporting,
    RunNow,
    RunShape,
    Sibling,
    Siblings,
    TaskNow,
)
from opscore.domain.waiting import Offer, Requirement

T = TypeVar("T")

_MOVED_TO = {
    Move.SUCCEED: TaskState.SUCCEEDED,
    Move.QUEUE: TaskState.QUEUED,
    Move.RETRY: TaskState.QUEUED,
    Move.HAND_BACK: TaskState.QUEUED,
    Move.FAIL: TaskState.FAILED,
    Move.SKIP: TaskState.SKIPPED,
    Move.CANCEL: TaskState.CANCELLED,
}
"""The state each decided move leaves a task in."""


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
    generation: int = 0
    """How many streams it has opened."""


@dataclass(slots=True)
class _Task:
    row: TaskRun
    """The task as stored (replaced whole at each change)."""
    input: JsonObject
    timeout_ms: int | None
    retry_policy: RetryPolicy | None
    error_reported: bool = False
    """Whether `row.error` is a failure its holder reported (not one the server declared)."""

    def now(self) -> TaskNow:
        """What changes of the task, as the state machine reads it."""
        row = self.row
        return TaskNow(
            task_id=row.task_id,
            name=row.name,
            state=row.state,
            attempt=row.attempt,
            agent_id=row.agent_id,
            error=row.error,
            error_reported=self.error_reported,
        )


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


@dataclass(slots=True)
class _Commit:
    """A write's callbacks and the effects it will apply, run by `_commit`."""

    callbacks: list[Callable[[], None]] = field(default_factory=list)
    effects: list[Effects] = field(default_factory=list)


class MemoryStore:
    """The engine's `Persistence` in plain dicts (see the module docstring)."""

    def __init__(self, rules: Rules) -> None:
        self._rules = rules
        self._agents: dict[str, _Agent] = {}
        self._token_digests: dict[str, str] = {}
        self._definitions: dict[str, WorkflowDefinition] = {}
        self._definition_requests: dict[str, str] = {}
        self._runs: dict[str, _Run] = {}
        self._run_requests: dict[str, str] = {}
        self._tasks: dict[str, _Task] = {}
        self._placement: _Placement | None = None

    # One object serves as every repository: the aggregates share its dicts.

    @property
    def agents(self) -> MemoryStore:
        return self

    @property
    def definitions(self) -> MemoryStore:
        return self

    @property
    def runs(self) -> MemoryStore:
        return self

    @property
    def tasks(self) -> MemoryStore:
        return self

    @property
    def timers(self) -> MemoryStore:
        return self

    @property
    def replicas(self) -> MemoryStore:
        return self

    def placement(self, place: Place, on_commit: Assigned, now: Callable[[], datetime]) -> None:
        """Place, before each write commits, what it queues and the slots it frees (as the
        real store's `placement` does for its writer)."""
        self._placement = _Placement(place, on_commit, now)

    def lease_expiries(self, agent_id: str) -> int:
        """The agent's count of leases that ended in a row."""
        return self._agents[agent_id].lease_expiries

    # Commits -----------------------------------------------------------------------------

    def _commit(self, commit: _Commit) -> None:
        """Commit a write that has changed the dicts: let the dispatcher place what it will
        apply (in the same commit, as the writer's before-commit hook does), then run the
        write's callbacks and the placement's, in that order."""
        callbacks = list(commit.callbacks)
        placement = self._placement
        if placement is not None and commit.effects:
            queued = [task for effects in commit.effects for task in effects.queued]
            released = [
                (hold.agent_id, hold.task_id)
                for effects in commit.effects
                for hold in effects.released
            ]
            pairs, _undo = placement.place(queued, released)  # nothing here fails to commit
            if pairs:
                written = self._assign(pairs, placement.now())
                callbacks.append(lambda: placement.assigned(pairs, written))
        for callback in callbacks:
            callback()

    def _write(self, value: T, on_commit: OnCommit[T] | None = None) -> T:
        """Commit a write whose outcome is `value` (Effects are applied after the commit, and
        so are placed before it, as in the real store)."""
        commit = _Commit()
        if isinstance(value, Effects):
            commit.effects.append(value)
        if on_commit is not None:
            commit.callbacks.append(lambda: on_commit(value))
        self._commit(commit)
        return value

    def _record(self, decision: Decision, now: datetime) -> Effects:
        """Keep what the state machine decided (as `changes.write_decision` writes it); what
        its commit will mean for memory."""
        for move in decision.tasks:
            task = self._tasks[move.task_id]
            state = _MOVED_TO[move.move]
            changes: dict[str, Any] = {"state": state}
            changes["finished_at" if state.finished else "queued_at"] = now
            if move.move is Move.SUCCEED:
                changes["output"] = move.output
            if move.move in (Move.RETRY, Move.FAIL):
                changes["error"] = move.error
                task.error_reported = move.reported
            if move.move is Move.HAND_BACK:  # back as it was queued, its lease gone
                changes["deadline"] = None
            else:  # every other move sets the retry time (None but for a retry)
                changes["not_before"] = move.not_before
            task.row = dataclasses.replace(task.row, **changes)
        for run_id, run_state in decision.runs:
            stored = self._runs[run_id]
            stored.run = dataclasses.replace(stored.run, state=run_state, finished_at=now)
        return decision.effects

    def _run_now(self, run_id: str) -> RunNow:
        """The run as the state machine moves it."""
        tasks = [self._tasks[task_id] for task_id in self._runs[run_id].task_ids]
        shape = RunShape.of_runs(task.row for task in tasks)
        return RunNow.of(run_id, shape, (task.now() for task in tasks))

    # Agents ------------------------------------------------------------------------------

    async def register_agent(
        self,
        registration: AgentRegistration,
        token_digest: str,
        now: datetime,
        on_commit: OnCommit[Agent],
    ) -> Agent:
        agent_id = registration.agent_id or new_id()
        self._token_digests[agent_id] = token_digest
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

    async def token_digests(self) -> list[tuple[str, str]]:
        return list(self._token_digests.items())

    async def deregister_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Effects]
    ) -> None:
        self._agent_of(agent_id)
        self._token_digests.pop(agent_id, None)
        moved = sorted(
            {
                task.row.run_id
                for task in self._tasks.values()
                if (task.row.state is TaskState.ASSIGNED and task.row.agent_id == agent_id)
                or (
                    task.row.pinned_agent_id == agent_id
                    and task.row.state in (TaskState.QUEUED, TaskState.ASSIGNED)
                )
            }
        )
        runs = [self._run_now(run_id) for run_id in moved]
        effects = self._record(self._rules.deregister(runs, agent_id, now), now)
        del self._agents[agent_id]
        self._write(effects, on_commit)

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
        found.generation += 1
        held = [
            self._rules.assignment(
                self._siblings(task),
                self._queued(task),
                agent_id,
                _deadline(task),
                redelivered=True,
            )
            for task in self._held_by([agent_id])
        ]
        connected = Connected(self._agent(agent_id).profile(), held, found.generation)
        return self._write(connected, on_commit)

    async def disconnect_agent(self, agent_id: str, generation: int, now: datetime) -> None:
        found = self._agents.get(agent_id)
        if found is not None and found.connected and found.generation == generation:
            found.connected, found.last_seen_at, found.disconnected_at = False, now, now
        self._write(None)

    # Replicas: one, alone on its memory ----------------------------------------------------

    async def join(
        self, replica_id: str, address: str, now: datetime, lease: timedelta, *, alone: bool
    ) -> Beat:
        for found in self._agents.values():
            if found.connected or found.disconnected_at is not None:
                found.connected, found.disconnected_at = False, now
        return self._write(Beat(registered=True, peers=0, lost_streams=0))

    async def beat(self, now: datetime, lease: timedelta) -> Beat:
        return self._write(Beat(registered=True, peers=0, lost_streams=0))

    async def leave(self, now: datetime) -> None:
        for found in self._agents.values():
            if found.connected:
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

    async def create_run(self, request: NewRun) -> WorkflowRun:
        earlier = self._run_requests.get(request.request_id) if request.request_id else None
        if earlier is not None:
            stored = self._runs[earlier]
            idempotency.check_repeated_trigger(
                request.request_id, request.fingerprint, earlier, stored.fingerprint
            )
            # A repeated trigger queues nothing, and the real store places nothing for it.
            repeated = CreatedRun(self._whole_run(earlier), False, Effects())
            return self._write(repeated, request.on_commit).run
        pinned = None
        if request.agent_id:
            self._agent_of(request.agent_id)
            pinned = self._agent(request.agent_id)
        name, definition_id, specs = self._source(request)
        if pinned is not None:
            waiting.check_pinned_agent(pinned, specs)
        run_id = new_id()
        states = self._rules.initial_states(specs)
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
            self._tasks[task.task_id] = _Task(
                task, {**spec.input, **request.run_input}, _millis(spec.timeout), spec.retry_policy
            )
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
        self._commit(_Commit([lambda: request.on_commit(created)], [created.effects]))
        return created.run

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
        on_commit: OnCommit[Effects],
    ) -> WorkflowRun:
        stored = self._run_of(run_id)
        effects = self._record(self._rules.cancel(self._run_now(run_id), stored.run.state), now)
        self._write(effects, on_commit)
        return self._whole_run(run_id)

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
        on_commit: OnCommit[list[Placed]],
    ) -> list[Placed]:
        return self._write(self._assign(pairs, now), on_commit)

    def _assign(self, pairs: Sequence[tuple[ReadyTask, str]], now: datetime) -> list[Placed]:
        """Each queued task as a new attempt of its agent, if that agent still takes work
        (connected, not reporting BUSY or ERROR); why not in the place of the others."""
        taking = {
            agent_id
            for _, agent_id in pairs
            if (found := self._agents.get(agent_id)) is not None
            and found.connected
            and found.reported_state not in (ReportedState.BUSY, ReportedState.ERROR)
        }
        leases: dict[str, tuple[str, QueuedTask, datetime]] = {}
        for ready, agent_id in pairs:
            task = self._tasks.get(ready.task_id)
            if (
                task is not None
                and task.row.state is TaskState.QUEUED
                and ready.task_id not in leases
                and agent_id in taking
            ):
                queued = self._queued(task)
                leases[ready.task_id] = (
                    agent_id,
                    queued,
                    self._rules.lease_ends(queued.timeout_ms, now),
                )
        for task_id, (agent_id, queued, deadline) in leases.items():
            task = self._tasks[task_id]
            task.row = dataclasses.replace(
                task.row,
                state=TaskState.ASSIGNED,
                attempt=queued.attempt + 1,
                agent_id=agent_id,
                assigned_at=now,
                deadline=deadline,
                not_before=None,
            )
            stored = self._runs[queued.run_id]
            if self._rules.starts_run(queued) and stored.run.state is RunState.PENDING:
                stored.run = dataclasses.replace(stored.run, state=RunState.RUNNING, started_at=now)
        assignments: list[Placed] = []
        for ready, agent_id in pairs:
            lease = leases.get(ready.task_id)
            if lease is None or lease[0] != agent_id:
                task = self._tasks.get(ready.task_id)
                waits = task is not None and task.row.state is TaskState.QUEUED and lease is None
                unfit = waits and agent_id not in taking
                assignments.append(Unassigned.AGENT_UNFIT if unfit else Unassigned.TASK_GONE)
                continue
            _, queued, deadline = lease
            context = self._siblings(self._tasks[ready.task_id])
            assignments.append(
                self._rules.assignment(context, queued, agent_id, deadline, redelivered=False)
            )
        return assignments

    def _queued(self, task: _Task) -> QueuedTask:
        """What an assignment of the task needs of it."""
        row = task.row
        siblings = self._tasks_of(self._runs[row.run_id])
        return QueuedTask(
            row.task_id,
            row.run_id,
            row.name,
            row.capability,
            task.input,
            row.depends_on,
            row.attempt,
            task.timeout_ms,
            any(sibling.fallback == row.name for sibling in siblings),
        )

    def _siblings(self, task: _Task) -> Siblings:
        """Every task of the task's run, as its assignment may refer to them."""
        return {
            task.row.run_id: {
                sibling.name: Sibling(
                    sibling.name, sibling.state, sibling.fallback, sibling.output, sibling.error
                )
                for sibling in self._tasks_of(self._runs[task.row.run_id])
            }
        }

    async def complete_task(self, result: TaskResult) -> None:
        task = self._task_of(result.task_id)
        if not self._rules.holds(task.now(), result.agent_id, result.attempt, Reporting.OUTPUT):
            idempotency.check_repeated_output(result.task_id, task.row.output, result.output)
            self._write(Effects(), result.on_commit)
            return
        decision = self._rules.succeed(self._run_now(task.row.run_id), task.row.name, result.output)
        effects = self._record(decision, result.now)
        if result.agent_id in self._agents:
            self._agents[result.agent_id].lease_expiries = 0
        self._write(effects, result.on_commit)

    async def fail_task(
        self,
        task_id: str,
        agent_id: str,
        attempt: int,
        error: str,
        retryable: bool,
        now: datetime,
        on_commit: OnCommit[Effects],
    ) -> None:
        task = self._task_of(task_id)
        if not self._rules.holds(task.now(), agent_id, attempt, Reporting.FAILURE, error):
            self._write(Effects(), on_commit)
            return
        decision = self._rules.fail(
            self._run_now(task.row.run_id),
            task.row.name,
            error,
            task.retry_policy,
            now,
            retryable=retryable,
            reported=True,
        )
        self._write(self._record(decision, now), on_commit)

    async def extend_lease(
        self, task_id: str, agent_id: str, attempt: int, extend_by: timedelta, now: datetime
    ) -> datetime:
        task = self._task_of(task_id)
        self._rules.holds(task.now(), agent_id, attempt, Reporting.NOTHING)
        deadline = max(_deadline(task), now + extend_by)
        task.row = dataclasses.replace(task.row, deadline=deadline)
        return self._write(deadline)

    def _task_of(self, task_id: str) -> _Task:
        found = self._tasks.get(task_id)
        if found is None:
            raise NotFound(Resource.TASK, task_id)
        return found

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
        self, now: datetime, quarantine_after: int, on_commit: OnCommit[Effects]
    ) -> None:
        due = [
            task
            for task in self._tasks.values()
            if task.row.state is TaskState.ASSIGNED and _deadline(task) <= now
        ]
        due.sort(key=_deadline)
        effects, expired = self._abandon(due, self._rules.expire, now)
        for agent_id, count in expired.items():
            self._agents[agent_id].lease_expiries += count
        counts = {
            agent_id: self._agents[agent_id].lease_expiries
            for agent_id in expired
            if not self._agents[agent_id].quarantined
        }
        for agent_id, detail in self._rules.quarantined(counts, quarantine_after).items():
            found = self._agents[agent_id]
            found.quarantined, found.reported_state = True, ReportedState.ERROR
            found.state_detail = detail
            effects.quarantined.append((self._agent(agent_id).profile(), counts[agent_id]))
        self._write(effects, on_commit)

    async def lose_agents(
        self, cutoff: datetime, now: datetime, on_commit: OnCommit[Effects]
    ) -> None:
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
        self._write(self._abandon(held, self._rules.lose, now)[0], on_commit)

    def _abandon(
        self,
        tasks: list[_Task],
        why: Callable[[RunNow, str, RetryPolicy | None, datetime], Decision],
        now: datetime,
    ) -> tuple[Effects, dict[str, int]]:
        """End the current attempt of each of these tasks still assigned without a result, as
        `why` decides (an expired lease, a lost agent); and how many each agent had."""
        effects = Effects()
        agents: dict[str, int] = {}
        for task in tasks:
            row = task.row
            if row.state is not TaskState.ASSIGNED:  # its run failed earlier in this write
                continue
            decision = why(self._run_now(row.run_id), row.name, task.retry_policy, now)
            effects.merge(self._record(decision, now))
            agents[row.agent_id] = agents.get(row.agent_id, 0) + 1
        return effects, agents


# Plain helpers -----------------------------------------------------------------------------


def _millis(value: timedelta | None) -> int | None:
    """A task's timeout as stored: whole milliseconds."""
    return None if value is None else round(value / timedelta(milliseconds=1))


def _deadline(task: _Task) -> datetime:
    deadline = task.row.deadline
    assert deadline is not None, f"task {task.row.task_id} was never assigned"
    return deadline


def _assigned_at(task: _Task) -> datetime:
    assigned_at = task.row.assigned_at
    assert assigned_at is not None, f"task {task.row.task_id} was never assigned"
    return assigned_at


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
