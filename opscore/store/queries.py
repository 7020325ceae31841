"""The persistence of Ops-Core, behind intention-named methods of `Store`.

Every statement is here, except two kinds kept in modules of their own: writing assignments and
composing their messages (`assignments.py`), and the row changes of a graph's transitions, run
set-based (`changes.py`).

Statements are plain synchronous SQLAlchemy Core over a `Connection`: each operation runs whole
inside one transaction that `Database` runs for it (see `database.py` for how each backend runs
it). Writes go through the group-commit `Writer`; reads run in a transaction of their own
(a consistent snapshot). Methods that move tasks return `Effects` and hand them to an
`on_commit` callback inside the commit order, which is how the dispatcher's memory follows the
database without ever running ahead of it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Text,
    and_,
    bindparam,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection

from opscore.domain import graph
from opscore.domain.errors import FailedPrecondition, InvalidArgument, NotFound, OpsCoreError
from opscore.domain.ids import is_valid_id, new_id, new_ids
from opscore.domain.models import (
    Agent,
    AgentProfile,
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
    RunState,
    TaskRun,
    TaskState,
    WorkflowDefinition,
    WorkflowRun,
)
from opscore.domain.retry import ResolvedRetryPolicy
from opscore.store import assignments, rows, templates
from opscore.store.changes import SUCCEED_TASK, Changes, GraphTask, apply_transition
from opscore.store.database import Database
from opscore.store.prepared import Prepared
from opscore.store.rows import RunShape
from opscore.store.tables import (
    TASK_IS_ASSIGNED,
    TASK_IS_QUEUED,
    AgentCapabilityRow,
    AgentRow,
    DefinitionRow,
    RunRow,
    TaskRow,
    metadata,
)
from opscore.store.templates import NewTasks, RunTemplate
from opscore.store.writer import Followup, Tx, Writer

T = TypeVar("T")
OnCommit = Callable[[T], None]

_agents = metadata.tables[AgentRow.__tablename__]
_capabilities = metadata.tables[AgentCapabilityRow.__tablename__]
_definitions = metadata.tables[DefinitionRow.__tablename__]
_runs = metadata.tables[RunRow.__tablename__]
_tasks = metadata.tables[TaskRow.__tablename__]

DEFINITION_CACHE_SIZE = 1024
"""Stored definitions whose run templates are kept in memory by id (the oldest seen is dropped
first)."""
RUN_SHAPE_CACHE_TASKS = 10_000
"""Tasks whose runs' shapes are kept, in all: more than a server moves at once (a miss costs one
read). No more: each task's shape is a few objects for every full garbage collection to walk.
Counted in runs (1,024 of them), the shapes of a hundred runs of 1,000 queued tasks made full
collections of 18-60 ms while they were queued (measured)."""

_running_count = (
    select(func.count())
    .where(
        metadata.tables["tasks"].c.agent_id == metadata.tables["agents"].c.agent_id,
        TASK_IS_ASSIGNED,
    )
    .correlate(metadata.tables["agents"])
    .scalar_subquery()
)


# Statements on the hot path, built once: building a Core statement costs about three times
# as much as running it on SQLite (measured: 170-225 us built, 50 us prebuilt). Parameters are
# named `b_*` because SQLAlchemy reserves column names for the values of an UPDATE.
_TASK_FOR_UPDATE = (
    select(_tasks).where(_tasks.c.task_id == bindparam("b_task_id")).with_for_update()
)
_RUN = select(_runs).where(_runs.c.run_id == bindparam("b_run_id"))
_RUN_FOR_UPDATE = _RUN.with_for_update()
_TASKS_OF_RUNS = (
    select(_tasks)
    .where(_tasks.c.run_id.in_(bindparam("b_run_ids", expanding=True)))
    .order_by(_tasks.c.position)
)
_RUNS_OF_TASKS = (
    select(_tasks.c.run_id)
    .where(_tasks.c.task_id.in_(bindparam("b_task_ids", expanding=True)))
    .scalar_subquery()
)
_LOCK_RUNS_OF_TASKS = (
    select(_runs.c.run_id)
    .where(_runs.c.run_id.in_(_RUNS_OF_TASKS))
    .order_by(_runs.c.run_id)
    .with_for_update()
)
# The current state of the tasks of the runs of some tasks: those tasks, and every other task of
# their runs that has not succeeded (one that has never changes again, so a run's completions
# read fewer rows as it goes). What never changes of them is read once per run (`_RUN_SHAPES`)
# and kept (see `rows.RunShape`).
_SIBLINGS_FOR_UPDATE = Prepared(
    select(
        _tasks.c.task_id,
        _tasks.c.run_id,
        _tasks.c.name,
        _tasks.c.state,
        _tasks.c.attempt,
        _tasks.c.agent_id,
        _tasks.c.error,
        _tasks.c.error_reported,
    )
    .where(
        _tasks.c.run_id.in_(_RUNS_OF_TASKS),
        or_(
            _tasks.c.state != TaskState.SUCCEEDED.value,
            _tasks.c.task_id.in_(bindparam("b_task_ids", expanding=True)),
        ),
    )
    .order_by(_tasks.c.run_id, _tasks.c.position)
    .with_for_update()
)
_RUN_SHAPES = Prepared(
    select(
        _tasks.c.task_id,
        _tasks.c.run_id,
        _tasks.c.name,
        # As text, decoded through a cache: runs of one definition repeat the same few values.
        cast(_tasks.c.depends_on, Text).label("depends_on"),
        _tasks.c.fallback,
        _tasks.c.capability,
        cast(_tasks.c.labels, Text).label("labels"),
        _tasks.c.pinned_agent_id,
    )
    .where(_tasks.c.run_id.in_(bindparam("b_run_ids", expanding=True)))
    # In graph order, as the run was defined: tasks made ready together queue in that order.
    .order_by(_tasks.c.run_id, _tasks.c.position)
)
_RUNS_BY_REQUEST = select(_runs).where(
    _runs.c.request_id.in_(bindparam("b_request_ids", expanding=True))
)
_KNOWN_AGENTS = Prepared(
    select(_agents.c.agent_id).where(
        _agents.c.agent_id.in_(bindparam("b_agent_ids", expanding=True))
    )
)
_LATEST_DEFINITION = Prepared(
    select(_definitions.c.definition_id)
    .where(_definitions.c.name == bindparam("b_name"))
    .order_by(_definitions.c.version.desc())
    .limit(1)
)
_INSERT_RUN = Prepared(insert(_runs))
_TOUCH_AGENT = (
    update(_agents)
    .where(_agents.c.agent_id == bindparam("b_agent_id"))
    .values(last_seen_at=bindparam("b_now"))
)
# An agent's registration and connection: every agent of a fleet runs them, ten thousand at a
# time when a server restarts, so they are built once too.
_UPDATE_REGISTRATION = (
    update(_agents)
    .where(_agents.c.agent_id == bindparam("b_agent_id"))
    .values(
        name=bindparam("b_name"),
        version=bindparam("b_version"),
        labels=bindparam("b_labels", type_=_agents.c.labels.type),
        max_concurrent_tasks=bindparam("b_max_concurrent_tasks"),
        last_seen_at=bindparam("b_now", type_=_agents.c.last_seen_at.type),
    )
)
_INSERT_AGENT = insert(_agents)
_DELETE_CAPABILITIES = delete(_capabilities).where(
    _capabilities.c.agent_id.in_(bindparam("b_agent_ids", expanding=True))
)
_INSERT_CAPABILITIES = insert(_capabilities)
_CONNECT_AGENT = (
    update(_agents)
    .where(_agents.c.agent_id == bindparam("b_agent_id"))
    .values(
        connected=True,
        last_seen_at=bindparam("b_now", type_=_agents.c.last_seen_at.type),
        disconnected_at=None,
    )
)
_AGENTS = select(_agents, _running_count.label("running")).where(
    _agents.c.agent_id.in_(bindparam("b_agent_ids", expanding=True))
)
_CAPABILITIES_OF = (
    select(_capabilities.c.agent_id, _capabilities.c.capability)
    .where(_capabilities.c.agent_id.in_(bindparam("b_agent_ids", expanding=True)))
    .order_by(_capabilities.c.agent_id, _capabilities.c.capability)
)
_HELD_TASKS = (
    select(_tasks)
    .where(_tasks.c.agent_id.in_(bindparam("b_agent_ids", expanding=True)), TASK_IS_ASSIGNED)
    .order_by(_tasks.c.agent_id, _tasks.c.assigned_at, _tasks.c.task_id)
)


@dataclass(frozen=True, slots=True)
class Connected:
    """What the dispatcher learns when an agent's stream opens."""

    profile: AgentProfile
    held: list[Assignment]


@dataclass(frozen=True, slots=True)
class NewRegistration:
    """An agent's registration, as the store writes it."""

    registration: AgentRegistration
    now: datetime
    on_commit: OnCommit[Agent]


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """An agent's task stream opening, as the store records it."""

    agent_id: str
    now: datetime
    on_commit: OnCommit[Connected]


@dataclass(frozen=True, slots=True)
class CreatedRun:
    """A triggered run, whether it was new (False for a repeated request_id), and its effects."""

    run: WorkflowRun
    created: bool
    effects: Effects


@dataclass(frozen=True, slots=True)
class NewRun:
    """A trigger, as the store writes it: exactly one source (a stored definition's id, a
    definition name for its latest version, or an inline definition)."""

    definition_id: str
    definition_name: str
    inline: DefinitionDraft | None
    agent_id: str
    run_input: JsonObject
    request_id: str
    now: datetime
    on_commit: OnCommit[CreatedRun]


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A task's output as its holder reported it."""

    task_id: str
    agent_id: str
    attempt: int
    output: JsonObject
    now: datetime
    on_commit: OnCommit[Effects]


def encode_page_token(last_key: str) -> str:
    """Page tokens are opaque to clients: the key of the last item, URL-safe base64."""
    return base64.urlsafe_b64encode(last_key.encode()).decode()


def decode_page_token(token: str) -> str | None:
    """The key a page token carries, None for the first page; INVALID_ARGUMENT if it is forged."""
    if not token:
        return None
    try:
        key = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeError, ValueError):
        key = ""
    if not is_valid_id(key):
        raise InvalidArgument.single("page_token", "is not a token this server issued")
    return key


class Store:
    """The persistence of Ops-Core (see the module docstring)."""

    def __init__(
        self,
        database: Database,
        writer: Writer,
        retry: ResolvedRetryPolicy,
        rng: random.Random | None = None,
    ) -> None:
        self.database = database
        self._writer = writer
        self._retry = retry
        self._rng = rng or random.Random()
        self._templates: dict[str, tuple[str, RunTemplate]] = {}
        """Stored definitions by id: the workflow's name and the template of its runs."""
        self._shapes: OrderedDict[str, rows.RunShape] = OrderedDict()
        self._shaped_tasks = 0
        """The tasks of the runs in `_shapes`."""
        # SQLite has one writer, so nothing can change a run between the reads and writes of an
        # operation; where writers run concurrently (PostgreSQL) the run's row is locked first.
        self._lock_runs = database.dialect != "sqlite"

    def _lock_runs_of(self, conn: Connection, task_ids: list[str]) -> None:
        """Where writers run concurrently (PostgreSQL), lock the runs of these tasks before any
        of their tasks: every write that moves a run locks the run first, in run id order, so
        two writes never wait for each other's locks in opposite orders."""
        if self._lock_runs and task_ids:
            conn.execute(_LOCK_RUNS_OF_TASKS, {"b_task_ids": sorted(task_ids)})

    def _template(self, conn: Connection, definition_id: str) -> tuple[str, RunTemplate]:
        """A stored definition's name and run template, from memory when seen before:
        definitions never change, so a cache by id is right on every replica, and triggering by
        id reads no definition row."""
        found = self._templates.get(definition_id)
        if found is None:
            definition = _get_definition(conn, definition_id)
            found = (definition.name, RunTemplate.of(definition.tasks, conn.dialect))
            if len(self._templates) >= DEFINITION_CACHE_SIZE:
                self._templates.pop(next(iter(self._templates)))
            self._templates[definition_id] = found
        return found

    def _run_shapes(self, conn: Connection, run_ids: Iterable[str]) -> dict[str, rows.RunShape]:
        """The shapes of these runs, from memory when known (they never change), the rest read
        in one statement and kept, least recently used first out."""
        shapes: dict[str, rows.RunShape] = {}
        missing = []
        for run_id in run_ids:
            shape = self._shapes.get(run_id)
            if shape is None:
                missing.append(run_id)
            else:
                self._shapes.move_to_end(run_id)
                shapes[run_id] = shape
        if missing:
            tasks: dict[str, dict[str, rows.TaskShape]] = {}
            for found in _RUN_SHAPES.rows(conn, {"b_run_ids": missing}):
                tasks.setdefault(found.run_id, {})[found.name] = rows.task_shape(found)
            for run_id, shaped in tasks.items():
                shapes[run_id] = self._remember_shape(run_id, rows.RunShape.of(shaped))
        return shapes

    def _remember_shape(self, run_id: str, shape: rows.RunShape) -> rows.RunShape:
        previous = self._shapes.pop(run_id, None)
        if previous is not None:
            self._shaped_tasks -= len(previous.tasks)
        self._shapes[run_id] = shape
        self._shaped_tasks += len(shape.tasks)
        while self._shaped_tasks > RUN_SHAPE_CACHE_TASKS and len(self._shapes) > 1:
            _, dropped = self._shapes.popitem(last=False)
            self._shaped_tasks -= len(dropped.tasks)
        return shape

    async def _write(
        self, op: Callable[[Connection], T], on_commit: OnCommit[T] | None = None
    ) -> T:
        def run(tx: Tx) -> T:
            value = op(tx.conn)
            if isinstance(value, Effects):
                tx.note_effects(value)
            if on_commit is not None:
                tx.after_commit(lambda: on_commit(value))
            return value

        return await self._writer.submit(run)

    async def _read(self, op: Callable[[Connection], T]) -> T:
        return await self.database.run(op, write=False)

    # Agents ------------------------------------------------------------------------------

    async def register_agent(
        self, registration: AgentRegistration, now: datetime, on_commit: OnCommit[Agent]
    ) -> Agent:
        """Insert the agent, or update its information keeping its history and tasks.
        Set-based: every registration of a batch is written by one `_register_agents` (a fleet
        registers all at once when a server restarts)."""
        request = NewRegistration(registration, now, on_commit)
        agent: Agent = await self._writer.submit_grouped(self._register_agents, request)
        return agent

    def _register_agents(
        self, conn: Connection, requests: Sequence[tuple[Tx, NewRegistration]]
    ) -> list[Agent]:
        agent_ids = [request.registration.agent_id or new_id() for _, request in requests]
        outcomes: dict[int, Agent] = {}
        # An agent registering twice in one batch: its later registration is written after the
        # earlier one, as if they had come one after the other.
        waiting = list(range(len(requests)))
        while waiting:
            taken: dict[str, int] = {}
            for index in waiting:
                taken.setdefault(agent_ids[index], index)
            _write_registrations(
                conn, [(agent_id, requests[index][1]) for agent_id, index in taken.items()]
            )
            agents = _agents_by_id(conn, list(taken))
            for agent_id, index in taken.items():
                outcomes[index] = agents[agent_id]
            waiting = [index for index in waiting if index not in outcomes]
        for index, (tx, request) in enumerate(requests):
            tx.after_commit(functools.partial(request.on_commit, outcomes[index]))
        return [outcomes[index] for index in range(len(requests))]

    async def deregister_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Effects]
    ) -> Effects:
        """Remove the agent; every task it held goes back to the queue for another attempt."""

        def op(conn: Connection) -> Effects:
            _get_agent(conn, agent_id)
            effects = Effects()
            held = conn.execute(
                select(_tasks)
                .where(_tasks.c.agent_id == agent_id, TASK_IS_ASSIGNED)
                .order_by(_tasks.c.assigned_at, _tasks.c.task_id)
                .with_for_update()
            )
            for row in held:
                effects.released.append(Hold(agent_id, row.task_id, row.run_id, row.attempt))
                effects.queued.append(rows.ready_task(row))
            if effects.queued:
                conn.execute(
                    update(_tasks)
                    .where(_tasks.c.task_id.in_([task.task_id for task in effects.queued]))
                    .values(state=TaskState.QUEUED.value, queued_at=now, deadline=None)
                )
            conn.execute(_DELETE_CAPABILITIES, {"b_agent_ids": [agent_id]})
            conn.execute(delete(_agents).where(_agents.c.agent_id == agent_id))
            return effects

        return await self._write(op, on_commit)

    async def touch_agent(self, agent_id: str, now: datetime) -> None:
        """Record that the agent was heard from (a heartbeat)."""

        def op(conn: Connection) -> None:
            result = conn.execute(_TOUCH_AGENT, {"b_agent_id": agent_id, "b_now": now})
            if result.rowcount == 0:
                raise NotFound("agent", agent_id)

        await self._write(op)

    async def report_state(
        self,
        agent_id: str,
        state: ReportedState,
        detail: str,
        now: datetime,
        on_commit: OnCommit[Agent],
    ) -> Agent:
        """Record the state the agent reports of itself."""

        def op(conn: Connection) -> Agent:
            result = conn.execute(
                update(_agents)
                .where(_agents.c.agent_id == agent_id)
                .values(reported_state=state.value, state_detail=detail, last_seen_at=now)
            )
            if result.rowcount == 0:
                raise NotFound("agent", agent_id)
            return _get_agent(conn, agent_id)

        return await self._write(op, on_commit)

    async def connect_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Connected]
    ) -> Connected:
        """Mark the agent connected and read what the dispatcher needs: its profile and the
        attempts it holds (to send again). Runs through the writer so the snapshot sits at an
        exact point of the commit order. Set-based: every stream a batch opens is recorded by
        one `_connect_agents`.
        """
        request = StreamOpened(agent_id, now, on_commit)
        connected: Connected = await self._writer.submit_grouped(self._connect_agents, request)
        return connected

    def _connect_agents(
        self, conn: Connection, requests: Sequence[tuple[Tx, StreamOpened]]
    ) -> list[Connected | OpsCoreError]:
        wanted = sorted({request.agent_id for _, request in requests})
        known = {row.agent_id for row in _KNOWN_AGENTS.rows(conn, {"b_agent_ids": wanted})}
        if known:
            conn.execute(
                _CONNECT_AGENT,
                [
                    {"b_agent_id": request.agent_id, "b_now": request.now}
                    for _, request in requests
                    if request.agent_id in known
                ],
            )
        agent_ids = sorted(known)
        agents = _agents_by_id(conn, agent_ids)
        held_rows = conn.execute(_HELD_TASKS, {"b_agent_ids": agent_ids}).all() if known else []
        context = assignments.context_of(
            conn, held_rows, {}, self._run_shapes(conn, {row.run_id for row in held_rows})
        )
        held: dict[str, list[Assignment]] = {}
        for row in held_rows:
            held.setdefault(row.agent_id, []).append(
                assignments.assignment(
                    context, row, row.attempt, row.agent_id, row.deadline, redelivered=True
                )
            )
        outcomes: list[Connected | OpsCoreError] = []
        for tx, request in requests:
            agent = agents.get(request.agent_id)
            if agent is None:
                outcomes.append(NotFound("agent", request.agent_id))
                continue
            connected = Connected(agent.profile(), held.get(request.agent_id, []))
            tx.after_commit(functools.partial(request.on_commit, connected))
            outcomes.append(connected)
        return outcomes

    async def disconnect_agent(
        self, agent_id: str, now: datetime, still_current: Callable[[], bool]
    ) -> None:
        """Mark the agent's stream closed: its grace period starts now. Skipped if, when the
        write runs, `still_current()` says a newer stream of the agent has begun to open (its
        connection must not be undone); nothing to mark if the agent was deregistered."""

        def op(conn: Connection) -> None:
            if not still_current():
                return
            conn.execute(
                update(_agents)
                .where(_agents.c.agent_id == agent_id)
                .values(connected=False, last_seen_at=now, disconnected_at=now)
            )

        await self._write(op)

    async def reset_connections(self, now: datetime) -> None:
        """At start-up no stream is open to this server: every agent is disconnected, and every
        agent that was connected, or still within its grace, starts a fresh grace period now
        (the outage was the server's, not the agent's).

        This holds while one server owns the database; replicas sharing one will track the
        stream owner per agent instead.
        """

        def op(conn: Connection) -> None:
            conn.execute(
                update(_agents)
                .where(or_(_agents.c.connected.is_(True), _agents.c.disconnected_at.is_not(None)))
                .values(connected=False, disconnected_at=now)
            )

        await self._write(op)

    async def get_agent(self, agent_id: str) -> Agent:
        """One agent, NOT_FOUND if unknown."""
        return await self._read(lambda conn: _get_agent(conn, agent_id))

    async def list_agents(
        self, page_size: int, page_token: str, state: AgentState | None, capability: str
    ) -> Page[Agent]:
        """A page of agents by id, filtered by derived state and capability."""
        after = decode_page_token(page_token)

        def op(conn: Connection) -> Page[Agent]:
            query = select(_agents, _running_count.label("running")).order_by(_agents.c.agent_id)
            if after is not None:
                query = query.where(_agents.c.agent_id > after)
            if capability:
                query = query.where(
                    select(_capabilities.c.agent_id)
                    .where(
                        _capabilities.c.agent_id == _agents.c.agent_id,
                        _capabilities.c.capability == capability,
                    )
                    .exists()
                )
            if state is not None:
                query = query.where(_state_condition(state))
            found = (conn.execute(query.limit(page_size + 1))).all()
            page = found[:page_size]
            capabilities = _capabilities_of(conn, [row.agent_id for row in page])
            agents = tuple(
                rows.agent(row, capabilities.get(row.agent_id, ()), row.running) for row in page
            )
            token = encode_page_token(page[-1].agent_id) if len(found) > page_size else ""
            return Page(agents, token)

        return await self._read(op)

    # Definitions ---------------------------------------------------------------------------

    async def create_definition(
        self, draft: DefinitionDraft, request_id: str, now: datetime
    ) -> WorkflowDefinition:
        """Store the next version of `draft.name`; a repeated request_id returns the first."""

        def op(conn: Connection) -> WorkflowDefinition:
            if request_id:
                existing = (
                    conn.execute(
                        select(_definitions).where(_definitions.c.request_id == request_id)
                    )
                ).first()
                if existing is not None:
                    return rows.definition(existing)
            return _insert_definition(conn, draft, request_id or None, now)

        return await self._write(op)

    async def get_definition(self, definition_id: str) -> WorkflowDefinition:
        """One definition, NOT_FOUND if unknown."""

        def op(conn: Connection) -> WorkflowDefinition:
            return _get_definition(conn, definition_id)

        return await self._read(op)

    async def list_definitions(
        self, page_size: int, page_token: str, name: str
    ) -> Page[WorkflowDefinition]:
        """A page of definitions, oldest first (ids sort by creation time)."""
        after = decode_page_token(page_token)

        def op(conn: Connection) -> Page[WorkflowDefinition]:
            query = select(_definitions).order_by(_definitions.c.definition_id)
            if after is not None:
                query = query.where(_definitions.c.definition_id > after)
            if name:
                query = query.where(_definitions.c.name == name)
            found = (conn.execute(query.limit(page_size + 1))).all()
            page = found[:page_size]
            token = encode_page_token(page[-1].definition_id) if len(found) > page_size else ""
            return Page(tuple(rows.definition(row) for row in page), token)

        return await self._read(op)

    # Runs ------------------------------------------------------------------------------------

    async def create_run(self, request: NewRun) -> CreatedRun:
        """Start a run of a stored definition (by id, or the latest of a name) or of an inline
        one; its root tasks are queued at once. A repeated request_id returns the first run.
        Set-based: every trigger of a batch is written by one `_create_runs`.
        """
        created: CreatedRun = await self._writer.submit_grouped(self._create_runs, request)
        return created

    def _create_runs(
        self, conn: Connection, requests: Sequence[tuple[Tx, NewRun]]
    ) -> list[CreatedRun | OpsCoreError]:
        earlier = self._runs_by_request(conn, [request for _, request in requests])
        agent_ids = sorted({request.agent_id for _, request in requests if request.agent_id})
        known_agents = (
            {row.agent_id for row in _KNOWN_AGENTS.rows(conn, {"b_agent_ids": agent_ids})}
            if agent_ids
            else set()
        )
        latest: dict[str, str] = {}
        run_values: list[dict[str, Any]] = []
        task_rows: list[list[Any]] = []
        outcomes: list[CreatedRun | OpsCoreError] = []
        for tx, request in requests:
            outcome: CreatedRun | OpsCoreError
            repeated = earlier.get(request.request_id) if request.request_id else None
            if repeated is not None:
                outcome = CreatedRun(repeated, False, Effects())
            else:
                try:
                    if request.agent_id and request.agent_id not in known_agents:
                        raise NotFound("agent", request.agent_id)
                    source = self._source(conn, request, latest)
                except OpsCoreError as error:
                    outcomes.append(error)
                    continue
                outcome, new = _new_run(request, source, run_values, task_rows)
                self._remember_shape(outcome.run.run_id, new.shape)
                inserted = assignments.notes_of(tx).inserted
                for root in new.roots:
                    inserted[root.task_id] = root
                if request.request_id:
                    earlier[request.request_id] = outcome.run
                tx.note_effects(outcome.effects)
            tx.after_commit(functools.partial(request.on_commit, outcome))
            outcomes.append(outcome)
        if run_values:
            _INSERT_RUN.execute(conn, run_values)
            templates.insert_tasks(conn, task_rows)
        return outcomes

    def _runs_by_request(self, conn: Connection, requests: list[NewRun]) -> dict[str, WorkflowRun]:
        """The runs already started for these requests' request_ids."""
        request_ids = sorted({request.request_id for request in requests if request.request_id})
        if not request_ids:
            return {}
        found = conn.execute(_RUNS_BY_REQUEST, {"b_request_ids": request_ids}).all()
        tasks = _tasks_of(conn, [row.run_id for row in found])
        return {row.request_id: rows.workflow_run(row, tasks.get(row.run_id, [])) for row in found}

    def _source(
        self, conn: Connection, request: NewRun, latest: dict[str, str]
    ) -> tuple[str, str | None, RunTemplate]:
        """What a trigger runs: the workflow's name, its stored definition id (None for an
        inline definition) and the template of its runs. `latest` remembers, for this batch,
        the latest version of each name already looked up."""
        if request.inline is not None:
            return request.inline.name, None, RunTemplate.of(request.inline.tasks, conn.dialect)
        definition_id = request.definition_id
        if not definition_id:
            name = request.definition_name
            if name not in latest:
                found = _LATEST_DEFINITION.rows(conn, {"b_name": name})
                if not found:
                    raise NotFound("workflow definition named", name)
                latest[name] = found[0].definition_id
            definition_id = latest[name]
        name, template = self._template(conn, definition_id)
        return name, definition_id, template

    async def get_run(self, run_id: str) -> WorkflowRun:
        """One run with its tasks, NOT_FOUND if unknown."""

        def op(conn: Connection) -> WorkflowRun:
            return _get_run(conn, run_id)

        return await self._read(op)

    async def list_runs(
        self,
        page_size: int,
        page_token: str,
        state: RunState | None,
        definition_id: str,
        agent_id: str,
    ) -> Page[WorkflowRun]:
        """A page of runs with their tasks, oldest first."""
        after = decode_page_token(page_token)

        def op(conn: Connection) -> Page[WorkflowRun]:
            query = select(_runs).order_by(_runs.c.run_id)
            if after is not None:
                query = query.where(_runs.c.run_id > after)
            if state is not None:
                query = query.where(_runs.c.state == state.value)
            if definition_id:
                query = query.where(_runs.c.definition_id == definition_id)
            if agent_id:
                query = query.where(_runs.c.agent_id == agent_id)
            found = (conn.execute(query.limit(page_size + 1))).all()
            page = found[:page_size]
            tasks = _tasks_of(conn, [row.run_id for row in page])
            runs = tuple(rows.workflow_run(row, tasks.get(row.run_id, [])) for row in page)
            token = encode_page_token(page[-1].run_id) if len(found) > page_size else ""
            return Page(runs, token)

        return await self._read(op)

    async def cancel_run(
        self, run_id: str, now: datetime, on_commit: OnCommit[tuple[WorkflowRun, Effects]]
    ) -> tuple[WorkflowRun, Effects]:
        """Cancel an unfinished run: its queued tasks leave the queue, its held ones are to be
        stopped. FAILED_PRECONDITION for a finished run.
        """

        def op(conn: Connection) -> tuple[WorkflowRun, Effects]:
            run = _get_run(conn, run_id, lock=True)
            if run.state.finished:
                raise FailedPrecondition(f"run {run_id!r} is already {run.state.value}")
            changes = Changes(conn)
            effects = apply_transition(
                changes, run_id, run.tasks, graph.cancel(_states(run.tasks)), now
            )
            changes.flush()
            return _get_run(conn, run_id), effects

        return await self._write(op, on_commit)

    # Tasks ---------------------------------------------------------------------------------

    async def load_queue(self) -> list[ReadyTask]:
        """Every queued task, in the order they became ready (each with its retry time): the
        dispatcher's index at start."""

        def op(conn: Connection) -> list[ReadyTask]:
            result = conn.execute(
                select(
                    _tasks.c.task_id,
                    _tasks.c.run_id,
                    _tasks.c.capability,
                    _tasks.c.labels,
                    _tasks.c.pinned_agent_id,
                    _tasks.c.not_before,
                )
                .where(TASK_IS_QUEUED)
                .order_by(_tasks.c.queued_at, _tasks.c.task_id)
            )
            return [rows.ready_task(row) for row in result]

        return await self._read(op)

    async def assign(
        self,
        pairs: Sequence[tuple[ReadyTask, str]],
        now: datetime,
        default_timeout: timedelta,
        on_commit: OnCommit[list[Assignment | None]],
    ) -> list[Assignment | None]:
        """Hand each queued task to its agent as a new attempt, under a lease that ends at its
        timeout. A task that is no longer queued (cancelled, skipped meanwhile) gives None in its
        place and is left alone."""
        return await self._write(
            lambda conn: assignments.assign(conn, pairs, now, default_timeout, self._run_shapes),
            on_commit,
        )

    def assign_before_commit(
        self,
        place: Callable[
            [list[ReadyTask], list[tuple[str, str]]],
            tuple[list[tuple[ReadyTask, str]], Callable[[], None]],
        ],
        on_commit: Callable[[list[tuple[ReadyTask, str]], list[Assignment | None]], None],
        now: Callable[[], datetime],
        default_timeout: timedelta,
    ) -> None:
        """Let every write batch place the tasks its requests made ready (and fill the slots
        they freed) in its own transaction: `place` matches them (see `Dispatcher.place`), the
        assignments are written as by `assign`, and `on_commit` gets them once committed."""

        def before_commit(
            conn: Connection,
            effects: list[Effects],
            followups: list[Followup],
            notes: dict[str, Any],
        ) -> None:
            queued = [task for noted in effects for task in noted.queued]
            released = [
                (hold.agent_id, hold.task_id) for noted in effects for hold in noted.released
            ]
            pairs, undo = place(queued, released)
            if not pairs:
                return
            tx = Tx(conn, notes)
            # Registered before writing: if anything below or the commit fails, the writer
            # gives the placements back (on the event loop).
            followups.append(Followup(tx, undo))
            written = assignments.assign(
                conn, pairs, now(), default_timeout, self._run_shapes, assignments.notes_of(tx)
            )
            tx.after_commit(lambda: on_commit(pairs, written))

        self._writer.before_commit = before_commit

    async def complete_task(self, result: TaskResult) -> Effects:
        """Record the output of the attempt the agent holds and queue the dependents that became
        ready. The same result again, once recorded, changes nothing and is not an error.
        Set-based: every completion of a batch is written by one `_complete_tasks`."""
        effects: Effects = await self._writer.submit_grouped(self._complete_tasks, result)
        return effects

    def _complete_tasks(
        self, conn: Connection, requests: Sequence[tuple[Tx, TaskResult]]
    ) -> list[Effects | OpsCoreError]:
        # One read for the whole batch: the tasks of the runs these results belong to that
        # have not succeeded (the runs locked first where writers are concurrent, in the order
        # every write locks them).
        wanted = {result.task_id for _, result in requests}
        task_ids = sorted(wanted)
        self._lock_runs_of(conn, task_ids)
        found_rows: dict[str, dict[str, Any]] = {}
        held: dict[str, _Held] = {}
        for found in _SIBLINGS_FOR_UPDATE.rows(conn, {"b_task_ids": task_ids}):
            found_rows.setdefault(found.run_id, {})[found.name] = found
            if found.task_id in wanted:
                held[found.task_id] = _Held.of(found)
        outcomes: list[Effects | OpsCoreError] = []
        accepted: list[tuple[int, _Held, TaskResult]] = []
        for _, result in requests:
            row = held.get(result.task_id)
            try:
                if row is None:
                    raise NotFound("task", result.task_id)
                holds = _check_held(row, result.agent_id, result.attempt, _succeeded)
            except OpsCoreError as error:
                outcomes.append(error)
                continue
            if holds:
                accepted.append((len(outcomes), row, result))
                # A second completion of this task in the batch sees it recorded.
                held[result.task_id] = dataclasses.replace(row, state=TaskState.SUCCEEDED.value)
            outcomes.append(Effects())
        if accepted:
            shapes = self._run_shapes(conn, {row.run_id for _, row, _ in accepted})
            runs = {
                run_id: _RunNow.of(shape, found_rows[run_id]) for run_id, shape in shapes.items()
            }
            changes = Changes(conn)
            recorded = assignments.notes_of(requests[0][0]).recorded
            for index, row, result in accepted:
                outcomes[index] = _complete(
                    changes, shapes[row.run_id], runs[row.run_id], row, result
                )
                recorded[row.run_id, row.name] = result.output
            changes.flush()
        for (tx, result), outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, Effects):
                tx.note_effects(outcome)
                tx.after_commit(functools.partial(result.on_commit, outcome))
        return outcomes

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
        """Record the failure of the attempt the agent holds: retried under the task's policy
        when `retryable` and attempts remain, else final. The same failure again, once recorded,
        changes nothing."""

        def op(conn: Connection) -> Effects:
            self._lock_runs_of(conn, [task_id])
            row = _held_task(conn, task_id, agent_id, attempt, _failed_with(error))
            if row is None:
                return Effects()
            return self._fail_attempt(conn, row, error, retryable=retryable, reported=True, now=now)

        return await self._write(op, on_commit)

    async def extend_lease(
        self, task_id: str, agent_id: str, attempt: int, extend_by: timedelta, now: datetime
    ) -> datetime:
        """Move the lease of the attempt the agent holds to at least `now + extend_by` (never
        earlier). FAILED_PRECONDITION unless the agent holds that attempt."""

        def op(conn: Connection) -> datetime:
            row = _held_task(conn, task_id, agent_id, attempt, _never_recorded)
            deadline: datetime = max(row.deadline, now + extend_by)
            conn.execute(
                update(_tasks).where(_tasks.c.task_id == task_id).values(deadline=deadline)
            )
            return deadline

        return await self._write(op)

    async def next_timers(self) -> tuple[datetime | None, datetime | None]:
        """The earliest lease deadline of an assigned task, and the earliest grace start of a
        disconnected agent: both one look-up in an index, never a scan."""

        def op(conn: Connection) -> tuple[datetime | None, datetime | None]:
            deadline = (
                conn.execute(select(func.min(_tasks.c.deadline)).where(TASK_IS_ASSIGNED))
            ).scalar_one_or_none()
            disconnected = (
                conn.execute(
                    select(func.min(_agents.c.disconnected_at)).where(
                        _agents.c.connected.is_(False)
                    )
                )
            ).scalar_one_or_none()
            return _aware(deadline), _aware(disconnected)

        return await self._read(op)

    async def expire_leases(
        self, now: datetime, on_commit: OnCommit[Effects], limit: int = 500
    ) -> Effects:
        """Every attempt whose lease has ended counts as failed with "timed out" (retryable);
        its agent is told to stop."""

        def op(conn: Connection) -> Effects:
            due = (
                conn.execute(
                    select(_tasks.c.task_id)
                    .where(TASK_IS_ASSIGNED, _tasks.c.deadline <= now)
                    .order_by(_tasks.c.deadline)
                    .limit(limit)
                )
            ).scalars()
            return self._fail_held(conn, list(due), "timed out", now)

        return await self._write(op, on_commit)

    async def lose_agents(
        self, cutoff: datetime, now: datetime, on_commit: OnCommit[Effects]
    ) -> Effects:
        """Agents disconnected since `cutoff` or earlier are lost: every attempt they hold
        counts as failed with "agent lost" (retryable)."""

        def op(conn: Connection) -> Effects:
            lost = (
                conn.execute(
                    select(_agents.c.agent_id).where(
                        _agents.c.connected.is_(False), _agents.c.disconnected_at <= cutoff
                    )
                )
            ).scalars()
            lost_ids = list(lost)
            if not lost_ids:
                return Effects()
            conn.execute(
                update(_agents).where(_agents.c.agent_id.in_(lost_ids)).values(disconnected_at=None)
            )
            held = (
                conn.execute(
                    select(_tasks.c.task_id)
                    .where(
                        _tasks.c.agent_id.in_(lost_ids),
                        TASK_IS_ASSIGNED,
                    )
                    .order_by(_tasks.c.assigned_at)
                )
            ).scalars()
            return self._fail_held(conn, list(held), "agent lost", now)

        return await self._write(op, on_commit)

    def _fail_held(
        self, conn: Connection, task_ids: list[str], error: str, now: datetime
    ) -> Effects:
        """Fail the current attempt of each task (retryable), telling its agent to stop."""
        effects = Effects()
        self._lock_runs_of(conn, task_ids)
        for task_id in task_ids:
            row = (
                conn.execute(
                    select(_tasks)
                    .where(_tasks.c.task_id == task_id, _tasks.c.state == TaskState.ASSIGNED.value)
                    .with_for_update()
                )
            ).first()
            if row is None:
                continue
            effects.merge(
                self._fail_attempt(conn, row, error, retryable=True, reported=False, now=now)
            )
            effects.cancelled.append(
                Cancellation(row.agent_id, row.task_id, row.run_id, row.attempt, error)
            )
        return effects

    def _fail_attempt(
        self,
        conn: Connection,
        row: Any,
        error: str,
        *,
        retryable: bool,
        reported: bool,
        now: datetime,
    ) -> Effects:
        """A held attempt failed (`reported` by its agent, or declared by the server): queue
        the task again after its backoff while its policy allows, or fail it finally (its
        fallback takes over, or the run fails)."""
        policy = self._retry.resolve(rows.retry_from_json(row.retry_policy))
        # Callers lock the run first (`_lock_runs_of`), so its tasks cannot move meanwhile.
        tasks = _tasks_of(conn, [row.run_id]).get(row.run_id, [])
        if retryable and policy.may_retry(row.attempt):
            not_before = now + policy.delay(row.attempt, self._rng)
            conn.execute(
                update(_tasks)
                .where(_tasks.c.task_id == row.task_id)
                .values(
                    state=TaskState.QUEUED.value,
                    error=error,
                    error_reported=reported,
                    queued_at=now,
                    not_before=not_before,
                )
            )
            task = next(task for task in tasks if task.task_id == row.task_id)
            effects = Effects(queued=[task.ready(not_before)])
        else:
            conn.execute(
                update(_tasks)
                .where(_tasks.c.task_id == row.task_id)
                .values(error=error, error_reported=reported)
            )
            changes = Changes(conn)
            transition = graph.fail(_graph(tasks), _states(tasks), row.name)
            effects = apply_transition(changes, row.run_id, tasks, transition, now)
            changes.flush()
        effects.released.append(Hold(row.agent_id, row.task_id, row.run_id, row.attempt))
        return effects


# Statement helpers, shared by the methods above --------------------------------------------


def _state_condition(state: AgentState) -> Any:
    """The derived agent state (see `derive_agent_state`) as a SQL condition."""
    reported = _agents.c.reported_state
    full = _running_count >= _agents.c.max_concurrent_tasks
    connected = _agents.c.connected.is_(True)
    if state is AgentState.OFFLINE:
        return _agents.c.connected.is_(False)
    if state is AgentState.ERROR:
        return and_(connected, reported == ReportedState.ERROR.value)
    busy = or_(reported == ReportedState.BUSY.value, full)
    if state is AgentState.BUSY:
        return and_(connected, reported != ReportedState.ERROR.value, busy)
    return and_(
        connected, reported.not_in([ReportedState.ERROR.value, ReportedState.BUSY.value]), ~full
    )


def _capabilities_of(conn: Connection, agent_ids: list[str]) -> dict[str, tuple[str, ...]]:
    if not agent_ids:
        return {}
    result = conn.execute(_CAPABILITIES_OF, {"b_agent_ids": agent_ids})
    grouped: dict[str, list[str]] = {}
    for agent_id, capability in result:
        grouped.setdefault(agent_id, []).append(capability)
    return {agent_id: tuple(found) for agent_id, found in grouped.items()}


def _get_agent(conn: Connection, agent_id: str) -> Agent:
    found = _agents_by_id(conn, [agent_id]).get(agent_id)
    if found is None:
        raise NotFound("agent", agent_id)
    return found


def _agents_by_id(conn: Connection, agent_ids: list[str]) -> dict[str, Agent]:
    """Those of these agents that exist, with their capabilities and running-task counts: two
    statements, however many."""
    if not agent_ids:
        return {}
    found = conn.execute(_AGENTS, {"b_agent_ids": agent_ids}).all()
    capabilities = _capabilities_of(conn, [row.agent_id for row in found])
    return {
        row.agent_id: rows.agent(row, capabilities.get(row.agent_id, ()), row.running)
        for row in found
    }


def _write_registrations(conn: Connection, registering: list[tuple[str, NewRegistration]]) -> None:
    """Insert or update these agents (each at most once) and replace their capabilities."""
    agent_ids = [agent_id for agent_id, _ in registering]
    existing = {row.agent_id for row in _KNOWN_AGENTS.rows(conn, {"b_agent_ids": agent_ids})}
    updates = []
    inserts = []
    for agent_id, request in registering:
        registration = request.registration
        told = {
            "name": registration.name,
            "version": registration.version,
            "labels": registration.labels,
            "max_concurrent_tasks": registration.max_concurrent_tasks,
        }
        if agent_id in existing:
            updates.append(
                {"b_agent_id": agent_id, "b_now": request.now}
                | {f"b_{column}": value for column, value in told.items()}
            )
        else:
            inserts.append(
                {
                    "agent_id": agent_id,
                    **told,
                    "reported_state": ReportedState.NONE.value,
                    "state_detail": "",
                    "connected": False,
                    "registered_at": request.now,
                    "last_seen_at": request.now,
                }
            )
    if updates:
        conn.execute(_UPDATE_REGISTRATION, updates)
    if inserts:
        conn.execute(_INSERT_AGENT, inserts)
    conn.execute(_DELETE_CAPABILITIES, {"b_agent_ids": agent_ids})
    capabilities = [
        {"agent_id": agent_id, "capability": capability}
        for agent_id, request in registering
        for capability in dict.fromkeys(request.registration.capabilities)
    ]
    if capabilities:
        conn.execute(_INSERT_CAPABILITIES, capabilities)


def _insert_definition(
    conn: Connection, draft: DefinitionDraft, request_id: str | None, now: datetime
) -> WorkflowDefinition:
    latest = (
        conn.execute(
            select(func.max(_definitions.c.version)).where(_definitions.c.name == draft.name)
        )
    ).scalar_one_or_none()
    definition_id = new_id()
    conn.execute(
        insert(_definitions).values(
            definition_id=definition_id,
            name=draft.name,
            version=(latest or 0) + 1,
            description=draft.description,
            tasks=[rows.spec_to_json(spec) for spec in draft.tasks],
            request_id=request_id,
            created_at=now,
        )
    )
    return _get_definition(conn, definition_id)


def _get_definition(conn: Connection, definition_id: str) -> WorkflowDefinition:
    row = (
        conn.execute(select(_definitions).where(_definitions.c.definition_id == definition_id))
    ).first()
    if row is None:
        raise NotFound("workflow definition", definition_id)
    return rows.definition(row)


def _tasks_of(conn: Connection, run_ids: list[str]) -> dict[str, list[Any]]:
    if not run_ids:
        return {}
    result = conn.execute(_TASKS_OF_RUNS, {"b_run_ids": run_ids})
    grouped: dict[str, list[Any]] = {}
    for row in result:
        grouped.setdefault(row.run_id, []).append(rows.task_run(row))
    return grouped


def _load_run(conn: Connection, row: Any) -> WorkflowRun:
    tasks = _tasks_of(conn, [row.run_id])
    return rows.workflow_run(row, tasks.get(row.run_id, []))


def _get_run(conn: Connection, run_id: str, *, lock: bool = False) -> WorkflowRun:
    row = conn.execute(_RUN_FOR_UPDATE if lock else _RUN, {"b_run_id": run_id}).first()
    if row is None:
        raise NotFound("workflow run", run_id)
    return _load_run(conn, row)


def _graph(tasks: Sequence[TaskRun]) -> dict[str, graph.Node]:
    return {task.name: graph.Node(task.depends_on, task.fallback) for task in tasks}


def _states(tasks: Sequence[GraphTask]) -> dict[str, TaskState]:
    return {task.name: task.state for task in tasks}


def _aware(value: datetime | None) -> datetime | None:
    """Aggregates bypass the column type on SQLite: give a bare MIN() its time zone back."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _succeeded(row: Any) -> bool:
    return bool(row.state == TaskState.SUCCEEDED.value)


def _failed_with(error: str) -> Callable[[Any], bool]:
    """Whether this very failure was recorded: the task failed, or waits for its retry, with
    this error as its holder reported it (an attempt the server failed never matches)."""

    def recorded(row: Any) -> bool:
        waiting = (TaskState.FAILED.value, TaskState.QUEUED.value)
        return bool(row.state in waiting and row.error_reported and row.error == error)

    return recorded


def _never_recorded(_row: Any) -> bool:
    return False


def _held_task(
    conn: Connection,
    task_id: str,
    agent_id: str,
    attempt: int,
    recorded: Callable[[Any], bool],
) -> Any:
    """The task row, locked, if `agent_id` holds `attempt` of it; None if the result was
    already `recorded` for that attempt (a retried call); see `_check_held`."""
    row = conn.execute(_TASK_FOR_UPDATE, {"b_task_id": task_id}).first()
    if row is None:
        raise NotFound("task", task_id)
    return row if _check_held(row, agent_id, attempt, recorded) else None


def _check_held(row: Any, agent_id: str, attempt: int, recorded: Callable[[Any], bool]) -> bool:
    """True if `agent_id` holds `attempt` of the task in `row`; False if that holder's result
    was already `recorded` (a retried call: nothing to do); FAILED_PRECONDITION for any other
    holder, attempt or state."""
    holder = row.agent_id == agent_id and row.attempt == attempt
    if holder and row.state == TaskState.ASSIGNED.value:
        return True
    if holder and recorded(row):
        return False
    if row.state == TaskState.ASSIGNED.value or not holder:
        raise FailedPrecondition(
            f"agent {agent_id!r} does not hold attempt {attempt} of task {row.task_id!r}"
        )
    raise FailedPrecondition(f"task {row.task_id!r} is {row.state}, not assigned")


@dataclass(frozen=True, slots=True)
class _Held:
    """What checking a result needs of its task's row; a set-based write updates it in memory
    as it records results, so a second result for the task in the same batch sees the first."""

    task_id: str
    run_id: str
    name: str
    agent_id: str | None
    attempt: int
    state: str
    error: str
    error_reported: bool

    @classmethod
    def of(cls, row: Any) -> _Held:
        return cls(
            row.task_id,
            row.run_id,
            row.name,
            row.agent_id,
            row.attempt,
            row.state,
            row.error,
            row.error_reported,
        )


@dataclass(frozen=True, slots=True)
class _RunNow:
    """The current state of a run's tasks, by name, as a batch of completions moves it."""

    rows: dict[str, Any]
    """The row of `_SIBLINGS_FOR_UPDATE` of each task that had not succeeded, by name."""
    states: dict[str, TaskState]
    """Each task's state, following the batch's completions."""

    @classmethod
    def of(cls, shape: RunShape, found: dict[str, Any]) -> _RunNow:
        """The run of `shape` whose tasks not found among its rows have succeeded."""
        states = dict.fromkeys(shape.graph, TaskState.SUCCEEDED)
        for name, row in found.items():
            states[name] = rows.TASK_STATES[row.state]
        return cls(found, states)


def _complete(
    changes: Changes, shape: rows.RunShape, run: _RunNow, row: _Held, result: TaskResult
) -> Effects:
    """Record one accepted completion: the task's success with its output, and the rest of the
    transition of its run's graph. `run` follows the batch, so the next completion in the same
    run starts from this one's outcome."""
    transition = graph.succeed(shape.graph, run.states, row.name)
    changes.add(
        SUCCEED_TASK,
        row.task_id,
        {"b_task_id": row.task_id, "b_output": result.output, "b_now": result.now},
    )
    rest = graph.Transition(
        {name: state for name, state in transition.tasks.items() if name != row.name},
        transition.run_state,
    )
    moved = [shape.node(row.run_id, run.rows[name], run.states[name]) for name in rest.tasks]
    effects = apply_transition(changes, row.run_id, moved, rest, result.now)
    effects.released.append(Hold(result.agent_id, row.task_id, row.run_id, result.attempt))
    run.states.update(transition.tasks)
    return effects


def _new_run(
    request: NewRun,
    source: tuple[str, str | None, RunTemplate],
    run_values: list[dict[str, Any]],
    task_rows: list[list[Any]],
) -> tuple[CreatedRun, NewTasks]:
    """Add a new run's row and its tasks' rows to the rows to insert; the run as inserted,
    built from those values rather than read back, with its root tasks queued; and its tasks."""
    name, stored_id, template = source
    run_id = new_id()
    run_values.append(
        {
            "run_id": run_id,
            "definition_id": stored_id,
            "workflow_name": name,
            "agent_id": request.agent_id or None,
            "state": RunState.PENDING.value,
            "input": request.run_input,
            "request_id": request.request_id or None,
            "created_at": request.now,
        }
    )
    new = template.new_tasks(
        run_id,
        new_ids(len(template.specs)),
        request.agent_id,
        request.run_input,
        request.now,
    )
    task_rows.extend(new.rows)
    run = WorkflowRun(
        run_id=run_id,
        definition_id=stored_id or "",
        workflow_name=name,
        agent_id=request.agent_id,
        state=RunState.PENDING,
        input=dict(request.run_input),
        tasks=new.tasks,
        created_at=request.now,
        started_at=None,
        finished_at=None,
    )
    return CreatedRun(run, True, Effects(queued=new.queued)), new
