"""The agents' rows: registration, state, connections, and the reads behind `GetAgent` and
`ListAgents`."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql import Select

from opscore.domain.errors import NotFound, OpsCoreError, Resource
from opscore.domain.ids import new_id
from opscore.domain.models import (
    Agent,
    AgentProfile,
    AgentRegistration,
    AgentState,
    Assignment,
    Effects,
    Page,
    ReportedState,
    TaskRun,
    TaskState,
)
from opscore.domain.ports import AgentRow, Connected, OnCommit, Rules
from opscore.domain.responses import Budget
from opscore.domain.state import RunNow
from opscore.domain.waiting import Offer, Requirement, requirement
from opscore.store import assignments, rows
from opscore.store.changes import record
from opscore.store.prepared import Prepared
from opscore.store.queries.base import Shared, tasks_of
from opscore.store.queries.pages import read_id_page
from opscore.store.tables import AGENTS, CAPABILITIES, TASK_IS_ASSIGNED, TASKS
from opscore.store.writer import Tx

_running_count = (
    select(func.count())
    .where(
        TASKS.c.agent_id == AGENTS.c.agent_id,
        TASK_IS_ASSIGNED,
    )
    .correlate(AGENTS)
    .scalar_subquery()
)

KNOWN_AGENTS = Prepared(
    "agents.known_agents",
    select(AGENTS.c.agent_id).where(
        AGENTS.c.agent_id.in_(bindparam("b_agent_ids", expanding=True))
    ),
    samples=[{"b_agent_ids": []}, {"b_agent_ids": ["g2", "g9"]}],
)
_TOUCH_AGENT = (
    update(AGENTS)
    .where(AGENTS.c.agent_id == bindparam("b_agent_id"))
    .values(last_seen_at=bindparam("b_now"))
)
# An agent's registration and connection: every agent of a fleet runs them, ten thousand at a
# time when a server restarts, so they are built once too.
_UPDATE_REGISTRATION = (
    update(AGENTS)
    .where(AGENTS.c.agent_id == bindparam("b_agent_id"))
    .values(
        name=bindparam("b_name"),
        version=bindparam("b_version"),
        labels=bindparam("b_labels", type_=AGENTS.c.labels.type),
        max_concurrent_tasks=bindparam("b_max_concurrent_tasks"),
        token_digest=bindparam("b_token_digest"),
        last_seen_at=bindparam("b_now", type_=AGENTS.c.last_seen_at.type),
        # Registering again lifts a quarantine (an agent that restarts starts afresh).
        reported_state=case(
            (AGENTS.c.quarantined, ReportedState.NONE.value), else_=AGENTS.c.reported_state
        ),
        state_detail=case((AGENTS.c.quarantined, ""), else_=AGENTS.c.state_detail),
        quarantined=False,
        lease_expiries=0,
    )
)
_INSERT_AGENT = insert(AGENTS)
_TOKENS = select(AGENTS.c.agent_id, AGENTS.c.token_digest).where(AGENTS.c.token_digest.is_not(None))
_DELETE_CAPABILITIES = delete(CAPABILITIES).where(
    CAPABILITIES.c.agent_id.in_(bindparam("b_agent_ids", expanding=True))
)
_INSERT_CAPABILITIES = insert(CAPABILITIES)
_CONNECT_AGENT = (
    update(AGENTS)
    .where(AGENTS.c.agent_id == bindparam("b_agent_id"))
    .values(
        connected=True,
        replica_id=bindparam("b_replica_id"),
        stream_generation=AGENTS.c.stream_generation + 1,
        last_seen_at=bindparam("b_now", type_=AGENTS.c.last_seen_at.type),
        disconnected_at=None,
    )
)
_GENERATIONS = select(AGENTS.c.agent_id, AGENTS.c.stream_generation).where(
    AGENTS.c.agent_id.in_(bindparam("b_agent_ids", expanding=True))
)
_STREAM_OWNERS = select(
    AGENTS.c.agent_id,
    AGENTS.c.token_digest,
    AGENTS.c.replica_id,
    AGENTS.c.stream_generation,
    AGENTS.c.lease_expiries,
).where(AGENTS.c.agent_id.in_(bindparam("b_agent_ids", expanding=True)))
_HELD_IDS = select(TASKS.c.agent_id, TASKS.c.task_id).where(
    TASKS.c.agent_id.in_(bindparam("b_agent_ids", expanding=True)), TASK_IS_ASSIGNED
)
_DISCONNECT_AGENT = (
    update(AGENTS)
    .where(
        AGENTS.c.agent_id == bindparam("b_agent_id"),
        AGENTS.c.replica_id == bindparam("b_replica_id"),
        AGENTS.c.stream_generation == bindparam("b_generation"),
    )
    .values(
        connected=False,
        replica_id=None,
        last_seen_at=bindparam("b_now", type_=AGENTS.c.last_seen_at.type),
        disconnected_at=bindparam("b_now", type_=AGENTS.c.disconnected_at.type),
    )
)
_AGENTS = select(AGENTS, _running_count.label("running")).where(
    AGENTS.c.agent_id.in_(bindparam("b_agent_ids", expanding=True))
)
_CAPABILITIES_OF = (
    select(CAPABILITIES.c.agent_id, CAPABILITIES.c.capability)
    .where(CAPABILITIES.c.agent_id.in_(bindparam("b_agent_ids", expanding=True)))
    .order_by(CAPABILITIES.c.agent_id, CAPABILITIES.c.capability)
)
_WAITING_STATES = (TaskState.QUEUED.value, TaskState.ASSIGNED.value)
# The tasks an agent holds, and the unfinished ones pinned to it: the tasks its removal moves.
_HELD_BY_OR_PINNED_TO = select(TASKS.c.task_id, TASKS.c.run_id).where(
    or_(
        and_(TASKS.c.agent_id == bindparam("b_agent_id"), TASK_IS_ASSIGNED),
        and_(
            TASKS.c.pinned_agent_id == bindparam("b_agent_id"),
            TASKS.c.state.in_(_WAITING_STATES),
        ),
    )
)
_HELD_TASKS = (
    select(TASKS)
    .where(TASKS.c.agent_id.in_(bindparam("b_agent_ids", expanding=True)), TASK_IS_ASSIGNED)
    .order_by(TASKS.c.agent_id, TASKS.c.assigned_at, TASKS.c.task_id)
)


@dataclass(frozen=True, slots=True)
class NewRegistration:
    """An agent's registration, as the store writes it."""

    registration: AgentRegistration
    token_digest: str
    now: datetime
    on_commit: OnCommit[Agent]


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """An agent's task stream opening, as the store records it."""

    agent_id: str
    now: datetime
    on_commit: OnCommit[Connected]


class Agents:
    """The store's repository of agents: registration, reported state, streams opening and
    closing, and removal."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    async def register_agent(
        self,
        registration: AgentRegistration,
        token_digest: str,
        now: datetime,
        on_commit: OnCommit[Agent],
    ) -> Agent:
        """Insert the agent, or update its information keeping its history and tasks; its
        token's digest becomes `token_digest`. Set-based: every registration of a batch is
        written by one `_register_agents` (a fleet registers all at once when a server
        restarts)."""
        request = NewRegistration(registration, token_digest, now, on_commit)
        agent: Agent = await self._shared.writer.submit_grouped(self._register_agents, request)
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
            agents = agents_by_id(conn, list(taken))
            for agent_id, index in taken.items():
                outcomes[index] = agents[agent_id]
            waiting = [index for index in waiting if index not in outcomes]
        for index, (tx, request) in enumerate(requests):
            tx.after_commit(functools.partial(request.on_commit, outcomes[index]))
        return [outcomes[index] for index in range(len(requests))]

    async def token_digests(self) -> list[tuple[str, str]]:
        """Every agent's id and the digest of its current token."""
        return await self._shared.read(
            lambda conn: [(row.agent_id, row.token_digest) for row in conn.execute(_TOKENS)]
        )

    async def touch_agent(self, agent_id: str, now: datetime) -> None:
        """Record that the agent was heard from (a heartbeat)."""

        def op(conn: Connection) -> None:
            result = conn.execute(_TOUCH_AGENT, {"b_agent_id": agent_id, "b_now": now})
            if result.rowcount == 0:
                raise NotFound(Resource.AGENT, agent_id)

        await self._shared.write(op)

    async def report_state(
        self,
        agent_id: str,
        state: ReportedState,
        detail: str,
        now: datetime,
        on_commit: OnCommit[Agent],
    ) -> Agent:
        """Record the state the agent reports of itself."""
        lifted = {"quarantined": False, "lease_expiries": 0} if state is ReportedState.IDLE else {}

        def op(conn: Connection) -> Agent:
            result = conn.execute(
                update(AGENTS)
                .where(AGENTS.c.agent_id == agent_id)
                .values(reported_state=state.value, state_detail=detail, last_seen_at=now, **lifted)
            )
            if result.rowcount == 0:
                raise NotFound(Resource.AGENT, agent_id)
            return agent_of(conn, agent_id)

        return await self._shared.write(op, on_commit)

    async def connect_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Connected]
    ) -> Connected:
        """Mark the agent connected and read what the dispatcher needs: its profile and the
        attempts it holds (to send again). Runs through the writer so the snapshot sits at an
        exact point of the commit order. Set-based: every stream a batch opens is recorded by
        one `_connect_agents`.
        """
        request = StreamOpened(agent_id, now, on_commit)
        connected: Connected = await self._shared.writer.submit_grouped(
            self._connect_agents, request
        )
        return connected

    def _connect_agents(
        self, conn: Connection, requests: Sequence[tuple[Tx, StreamOpened]]
    ) -> list[Connected | OpsCoreError]:
        wanted = sorted({request.agent_id for _, request in requests})
        known = {row.agent_id for row in KNOWN_AGENTS.rows(conn, {"b_agent_ids": wanted})}
        replica_id = self._shared.replica_id
        if known:
            conn.execute(
                _CONNECT_AGENT,
                [
                    {
                        "b_agent_id": request.agent_id,
                        "b_now": request.now,
                        "b_replica_id": replica_id,
                    }
                    for _, request in requests
                    if request.agent_id in known
                ],
            )
        agent_ids = sorted(known)
        generations: dict[str, int] = {
            row.agent_id: row.stream_generation
            for row in conn.execute(_GENERATIONS, {"b_agent_ids": agent_ids})
        }
        agents = agents_by_id(conn, agent_ids)
        held_rows = conn.execute(_HELD_TASKS, {"b_agent_ids": agent_ids}).all() if known else []
        shapes = self._shared.shapes.of(conn, {row.run_id for row in held_rows})
        tasks = [rows.held_task(row, shapes[row.run_id]) for row in held_rows]
        context = assignments.context_of(conn, tasks, {}, shapes)
        held: dict[str, list[Assignment]] = {}
        for row, task in zip(held_rows, tasks, strict=True):
            held.setdefault(row.agent_id, []).append(
                self._shared.rules.assignment(
                    context, task, row.agent_id, row.deadline, redelivered=True
                )
            )
        outcomes: list[Connected | OpsCoreError] = []
        for tx, request in requests:
            agent = agents.get(request.agent_id)
            if agent is None:
                outcomes.append(NotFound(Resource.AGENT, request.agent_id))
                continue
            connected = Connected(
                agent.profile(), held.get(request.agent_id, []), generations[request.agent_id]
            )
            tx.after_commit(functools.partial(request.on_commit, connected))
            outcomes.append(connected)
        return outcomes

    async def disconnect_agent(self, agent_id: str, generation: int, now: datetime) -> None:
        """Mark the agent's stream closed, if the stream open is still the one of `generation`
        on this replica (not a newer one, here or elsewhere): its grace period starts now."""
        parameters = {
            "b_agent_id": agent_id,
            "b_replica_id": self._shared.replica_id,
            "b_generation": generation,
            "b_now": now,
        }

        def op(conn: Connection) -> None:
            conn.execute(_DISCONNECT_AGENT, parameters)

        await self._shared.write(op)

    async def reread(self, agent_ids: list[str], on_commit: OnCommit[dict[str, AgentRow]]) -> None:
        """These agents as they are (the removed ones missing), with the tasks they hold, read
        through the writer so that `on_commit` gets them in commit order with this replica's own
        writes. Those whose leases another replica counted as expired are noted: their next
        success resets the count here too."""

        def op(conn: Connection) -> dict[str, AgentRow]:
            agents = agents_by_id(conn, agent_ids)
            found = conn.execute(_STREAM_OWNERS, {"b_agent_ids": list(agents)}).all()
            self._shared.expiring.noted(row.agent_id for row in found if row.lease_expiries)
            held: dict[str, set[str]] = {}
            for agent_id, task_id in conn.execute(_HELD_IDS, {"b_agent_ids": list(agents)}):
                held.setdefault(agent_id, set()).add(task_id)
            return {
                row.agent_id: AgentRow(
                    agents[row.agent_id].profile(),
                    row.token_digest,
                    row.replica_id,
                    row.stream_generation,
                    frozenset(held.get(row.agent_id, ())),
                )
                for row in found
            }

        await self._shared.write(op, on_commit)

    async def waiting_candidates(
        self, tasks: Sequence[TaskRun]
    ) -> tuple[dict[str, Agent], dict[Requirement, Offer]]:
        """For explaining why these queued tasks wait: the registered agents they are pinned
        to, and for each requirement of the unpinned ones (capability, sorted labels) whether
        some registered agent meets it, and some connected one. One look-up per distinct
        requirement, connected agents first, stopping at the first agent that meets it."""
        wanted = {requirement(task) for task in tasks if not task.pinned_agent_id}

        def op(conn: Connection) -> tuple[dict[str, Agent], dict[Requirement, Offer]]:
            pinned_ids = sorted({task.pinned_agent_id for task in tasks if task.pinned_agent_id})
            offers = {needs: _offer(conn, needs, self._shared.replica_id) for needs in wanted}
            return agents_by_id(conn, pinned_ids), offers

        return await self._shared.read(op)

    async def deregister_agent(
        self, agent_id: str, now: datetime, on_commit: OnCommit[Effects]
    ) -> None:
        """Remove the agent. Every task it held goes back to the queue for another attempt,
        except the tasks pinned to it: no other agent may take those, so each one held or
        queued fails finally (its run follows the usual rules: a fallback, pinned too, fails
        in turn; otherwise the run fails)."""

        def op(conn: Connection) -> tuple[None, Effects]:
            agent_of(conn, agent_id)
            # The runs first, as every write that moves runs locks them (`lock_runs_of`).
            moved = conn.execute(_HELD_BY_OR_PINNED_TO, {"b_agent_id": agent_id}).all()
            self._shared.lock_runs_of(conn, [task_id for task_id, _ in moved])
            found = tasks_of(conn, sorted({run_id for _, run_id in moved}))
            runs = [RunNow.of_runs(run_id, tasks) for run_id, tasks in found.items()]
            effects = record(conn, self._shared.rules.deregister(runs, agent_id, now), now)
            delete_agent(conn, agent_id)
            return None, effects

        await self._shared.write_moving(op, on_commit)

    async def get_agent(self, agent_id: str) -> Agent:
        """One agent, NOT_FOUND if unknown."""
        return await self._shared.read(lambda conn: agent_of(conn, agent_id))

    async def list_agents(
        self,
        page_size: int,
        page_token: str,
        state: AgentState | None,
        capability: str,
        budget: Budget,
    ) -> Page[Agent]:
        """A page of agents by id, filtered by derived state and capability, cut to fit
        `budget`."""

        def op(conn: Connection) -> Page[Agent]:
            query = select(AGENTS, _running_count.label("running")).order_by(AGENTS.c.agent_id)
            if capability:
                query = query.where(
                    select(CAPABILITIES.c.agent_id)
                    .where(
                        CAPABILITIES.c.agent_id == AGENTS.c.agent_id,
                        CAPABILITIES.c.capability == capability,
                    )
                    .exists()
                )
            if state is not None:
                query = query.where(_state_condition(state))

            def fetch(start: str | None, limit: int) -> list[Agent]:
                chunk = query if start is None else query.where(AGENTS.c.agent_id >= start)
                found = conn.execute(chunk.limit(limit)).all()
                capabilities = _capabilities_of(conn, [row.agent_id for row in found])
                return [
                    rows.agent(row, capabilities.get(row.agent_id, ()), row.running)
                    for row in found
                ]

            return read_id_page(
                fetch,
                lambda agent: agent.agent_id,
                budget.sizes.agent,
                page_size,
                page_token,
                json.dumps(["agents", "" if state is None else state.value, capability]),
                budget.bytes,
            )

        return await self._shared.read(op)


def _state_condition(state: AgentState) -> Any:
    """The derived agent state (see `derive_agent_state`) as a SQL condition."""
    reported = AGENTS.c.reported_state
    full = _running_count >= AGENTS.c.max_concurrent_tasks
    connected = AGENTS.c.connected.is_(True)
    if state is AgentState.OFFLINE:
        return AGENTS.c.connected.is_(False)
    if state is AgentState.ERROR:
        return and_(connected, reported == ReportedState.ERROR.value)
    busy = or_(reported == ReportedState.BUSY.value, full)
    if state is AgentState.BUSY:
        return and_(connected, reported != ReportedState.ERROR.value, busy)
    return and_(
        connected, reported.not_in([ReportedState.ERROR.value, ReportedState.BUSY.value]), ~full
    )


def _offer(conn: Connection, needs: Requirement, replica_id: str) -> Offer:
    """Whether some registered agent offers the capability and carries the labels, whether
    one of those is connected (connected agents first), and whether one streams from another
    replica than `replica_id` and is idle with a free slot."""
    query = _meeting(select(AGENTS.c.connected, AGENTS.c.labels), needs)
    found = _first_meeting(conn, query.order_by(AGENTS.c.connected.desc()), needs)
    if found is None:
        return Offer(registered=False, connected=False)
    if not found.connected:
        return Offer(registered=True, connected=False)
    idle = _meeting(select(AGENTS.c.labels), needs).where(
        AGENTS.c.connected,
        AGENTS.c.replica_id != replica_id,
        AGENTS.c.reported_state.not_in([ReportedState.BUSY.value, ReportedState.ERROR.value]),
        _running_count < AGENTS.c.max_concurrent_tasks,
    )
    return Offer(True, True, idle_elsewhere=_first_meeting(conn, idle, needs) is not None)


def _meeting(query: Select[Any], needs: Requirement) -> Select[Any]:
    """`query` of the agents that offer the capability and carry the labels the database
    can compare: SQLite's JSON paths miss keys with quotes, backslashes or characters beyond
    ASCII, so those are compared by `_first_meeting`, on the rows the rest let through."""
    capability, labels = needs
    if capability:
        query = query.join(CAPABILITIES, CAPABILITIES.c.agent_id == AGENTS.c.agent_id).where(
            CAPABILITIES.c.capability == capability
        )
    plain = [(key, value) for key, value in labels if _plain_key(key)]
    for key, value in plain:
        query = query.where(AGENTS.c.labels[key].as_string() == value)
    return query.limit(1) if len(plain) == len(labels) else query


def _first_meeting(conn: Connection, query: Select[Any], needs: Requirement) -> Row[Any] | None:
    """The first row of `query` (see `_meeting`) whose labels carry all of `needs`."""
    _, labels = needs
    for row in conn.execute(query):
        if all(row.labels.get(key) == value for key, value in labels):
            return row
    return None


def _plain_key(key: str) -> bool:
    """Whether a label key can be looked up by a JSON path on every backend."""
    return key.isascii() and key.isprintable() and '"' not in key and "\\" not in key


def delete_agent(conn: Connection, agent_id: str) -> None:
    """Remove an agent's row and its capabilities (what it held is the caller's to move)."""
    conn.execute(_DELETE_CAPABILITIES, {"b_agent_ids": [agent_id]})
    conn.execute(delete(AGENTS).where(AGENTS.c.agent_id == agent_id))


def _capabilities_of(conn: Connection, agent_ids: list[str]) -> dict[str, tuple[str, ...]]:
    if not agent_ids:
        return {}
    result = conn.execute(_CAPABILITIES_OF, {"b_agent_ids": agent_ids})
    grouped: dict[str, list[str]] = {}
    for agent_id, capability in result:
        grouped.setdefault(agent_id, []).append(capability)
    return {agent_id: tuple(found) for agent_id, found in grouped.items()}


def agent_of(conn: Connection, agent_id: str) -> Agent:
    """One agent, NOT_FOUND if unknown."""
    found = agents_by_id(conn, [agent_id]).get(agent_id)
    if found is None:
        raise NotFound(Resource.AGENT, agent_id)
    return found


def agents_by_id(conn: Connection, agent_ids: list[str]) -> dict[str, Agent]:
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
    existing = {row.agent_id for row in KNOWN_AGENTS.rows(conn, {"b_agent_ids": agent_ids})}
    updates = []
    inserts = []
    for agent_id, request in registering:
        registration = request.registration
        told = {
            "name": registration.name,
            "version": registration.version,
            "labels": registration.labels,
            "max_concurrent_tasks": registration.max_concurrent_tasks,
            "token_digest": request.token_digest,
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


_EXPIRIES = select(AGENTS.c.agent_id, AGENTS.c.lease_expiries).where(
    AGENTS.c.agent_id.in_(bindparam("b_agent_ids", expanding=True)),
    AGENTS.c.quarantined.is_(False),
)


def quarantine(
    conn: Connection, agent_ids: list[str], after: int, rules: Rules
) -> list[tuple[AgentProfile, int]]:
    """Put in ERROR those of these agents (not quarantined yet) that `rules` quarantine for
    their counts of leases expired in a row; their profiles and counts."""
    found = conn.execute(_EXPIRIES, {"b_agent_ids": agent_ids})
    counts: dict[str, int] = {row.agent_id: row.lease_expiries for row in found}
    due = rules.quarantined(counts, after)
    for agent_id, detail in due.items():
        conn.execute(
            update(AGENTS)
            .where(AGENTS.c.agent_id == agent_id)
            .values(quarantined=True, reported_state=ReportedState.ERROR.value, state_detail=detail)
        )
    agents = agents_by_id(conn, list(due))
    return [(agents[agent_id].profile(), counts[agent_id]) for agent_id in due]


def reset_expiries(conn: Connection, agent_ids: list[str]) -> None:
    """These agents succeeded: their count of expiries in a row starts again from zero."""
    conn.execute(
        update(AGENTS)
        .where(AGENTS.c.agent_id.in_(agent_ids), AGENTS.c.lease_expiries > 0)
        .values(lease_expiries=0)
    )
