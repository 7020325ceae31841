"""The engine: what each request means for agents, definitions, runs and tasks.

Plain async Python over the store, the dispatcher and the open streams; it knows nothing of gRPC.
Lifecycle events are logged at INFO, except the two that every task of every run has ("task
assigned", "task completed"), at DEBUG: at thousands of tasks a second they cost a noticeable
share of the throughput and say nothing the run's own events do not.
Every write goes to the store with an `on_commit` callback, and only those callbacks touch
memory (dispatcher indexes, streams) and log lifecycle events, so what the server holds in
memory and says in its log is always what the database has committed.

Storage faults reach the callers of the writes they refuse. The engine's own loops (dispatch,
timers) back off and try again until storage returns; once an outage ends, the timers write the
disconnections it refused and bring the dispatcher's queue in line with the database, since a
write whose commit was cut off may have committed without its effects being applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from opscore.domain import idempotency, validation, waiting
from opscore.domain.clock import Clock
from opscore.domain.credentials import AgentTokens, issue_agent_token
from opscore.domain.dispatch import Dispatch, DispatchFactory
from opscore.domain.dispatcher import Dispatcher
from opscore.domain.errors import (
    Aborted,
    FieldViolation,
    StorageFault,
    StreamStalled,
    TokenRotated,
    Unauthenticated,
    Unavailable,
)
from opscore.domain.health import Backoff
from opscore.domain.idle import Pauses
from opscore.domain.ids import new_id
from opscore.domain.membership import Membership, MembershipSettings
from opscore.domain.models import (
    Agent,
    AgentRegistration,
    AgentState,
    Assignment,
    DefinitionDraft,
    Effects,
    JsonObject,
    Page,
    Placed,
    ReadyTask,
    ReportedState,
    RunFilter,
    RunView,
    StreamEvent,
    TaskRun,
    TaskState,
    TriggerRequest,
    Unassigned,
    WorkflowDefinition,
    WorkflowRun,
)
from opscore.domain.notices import REREAD_EVERY, Notice, Noticeboard
from opscore.domain.ports import (
    Admission,
    AgentRow,
    Claimed,
    Connected,
    CreatedRun,
    NewRun,
    Persistence,
    TaskResult,
    Want,
)
from opscore.domain.responses import (
    DEFAULT_CLIENT_MESSAGE_BYTES,
    Budget,
    WireSizes,
    fit_assignment,
    response_bytes,
)
from opscore.domain.validation import Limits, check_id, raise_if
from opscore.domain.watch import ANNOUNCE_EVERY, WATCHED_FOR, Change, RunWatch, Watches
from opscore.domain.watch import REREAD_EVERY as WATCH_REREAD_EVERY
from opscore.streams import AgentStream, Encode, StreamLimits, Streams, StreamWatch

log = logging.getLogger("opscore.engine")


def _record_after_sends(level: int, event: str, fields: dict[str, object]) -> None:
    """Log `event` two turns of the loop from now: from a commit's callbacks, behind the stream
    sends those callbacks release (a stream's send takes a turn of its own), so no assignment
    waits for a log record to be written."""
    if log.isEnabledFor(level):
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, functools.partial(log.log, level, event, extra=fields))


FAILURE_WITHOUT_TEXT = "the agent reported a failure without an error message"
"""The error recorded for a `FailTask` whose error is empty."""


DEFAULT_TASK_TIMEOUT = timedelta(minutes=5)
"""How long an agent may hold a task whose spec sets no timeout, by default."""
AGENT_GRACE = timedelta(seconds=30)
"""How long an agent whose stream closed keeps its tasks, by default."""
QUARANTINE_AFTER = 3
"""Lease expiries in a row that put an agent in ERROR, by default."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The engine's tunables (set from the server's configuration, whose defaults are these)."""

    agent_grace: timedelta = AGENT_GRACE
    limits: Limits = field(default_factory=Limits)
    streams: StreamLimits = field(default_factory=StreamLimits)
    quarantine_after: int = QUARANTINE_AFTER
    """Lease expiries in a row that put an agent in ERROR (see `Effects.quarantined`)."""
    response_bytes: int = response_bytes(DEFAULT_CLIENT_MESSAGE_BYTES)
    """Bytes of runs and tasks one response may carry (see `responses.response_bytes`)."""
    replicas: MembershipSettings = field(default_factory=MembershipSettings)


class Engine:
    """The domain behind both services (see the module docstring)."""

    def __init__(
        self,
        store: Persistence,
        settings: EngineSettings,
        *,
        admission: Admission,
        encode: Encode,
        sizes: WireSizes,
        clock: Clock,
        dispatch: DispatchFactory = Dispatcher,
        agent_tokens: AgentTokens | None = None,
        noticeboard: Noticeboard | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._budget = Budget(settings.response_bytes, waiting.WithReasons(sizes))
        self._admission = admission
        self._clock = clock
        self._now = clock.now
        # The server chooses how dispatch is implemented (see `dispatch`).
        self.dispatcher: Dispatch = dispatch(self._assign, clock=clock)
        self._encode = encode
        self.streams = Streams(
            self._encode_event, settings.streams, StreamWatch(self._backlogged, self._stalled)
        )
        self._timers_wake = asyncio.Event()
        self._timers_target: datetime | None = None
        self._timers_pauses = Pauses()
        self._draining = False
        self._disconnects_due: deque[tuple[AgentStream, datetime]] = deque()
        """Closed streams whose disconnection storage refused, and when they closed."""
        self._resync_due = False
        self.membership = Membership(
            store.replicas,
            settings.replicas,
            clock,
            fenced=self._fenced,
            streams_lost=self._streams_lost,
        )
        self.agent_tokens = AgentTokens() if agent_tokens is None else agent_tokens
        """The digest of each agent's current token (see `register_agent`), which callers are
        identified by."""
        self._noticeboard = noticeboard
        self.watches = Watches()
        """The open WatchWorkflowRun calls (the writer observes their runs: see the server)."""
        self._watch_wake = asyncio.Event()
        """Where replicas sharing the database tell each other what they committed (None:
        this server owns its database alone)."""
        self._stale: set[str] = set()
        """Agents other replicas changed, to reread (see `run_notices`)."""
        self._stale_wake = asyncio.Event()

    async def recover(self) -> None:
        """Join the replicas and rebuild memory from the database: no stream is open here yet
        (alone on the database, agents that were connected start their grace period now), the
        agents' tokens and the queue are as stored, leases run on."""
        await self.membership.join()
        self.agent_tokens.load(await self._store.agents.token_digests())
        if not self.dispatcher.whole_queue:
            self.dispatcher.work_elsewhere(None)  # claimed from the database as agents come
            return
        queued = await self._store.tasks.load_queue()
        self.dispatcher.enqueue(queued)
        log.info("queue recovered", extra={"queued_tasks": len(queued)})

    def shut_down(self) -> None:
        """Refuse new streams and end every open one: agents reconnect elsewhere or later."""
        self._draining = True
        self.streams.close_all(Unavailable("the server is shutting down"))

    # Timers --------------------------------------------------------------------------------

    async def run_timers(self) -> None:
        """End expired leases and lose agents whose grace has passed, waking exactly at the
        next of these times (read from indexes) or when an earlier one is created. While
        storage fails, back off and try again."""
        backoff = Backoff()
        while True:
            # No target while reading: a time created meanwhile wakes the wait below at once.
            self._timers_target = None
            try:
                target = await self._fire_due_timers()
            except StorageFault:
                await self._clock.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._timers_target = target
            self._timers_pauses.pause()
            await self._clock.wait(self._timers_wake, target)
            self._timers_pauses.resume()
            self._timers_wake.clear()

    @property
    def idle(self) -> bool:
        """Whether the engine's loops wait with nothing to do: no dispatch pass pending (see
        `Dispatch.idle`), and no timer due or woken. It may not stay so: a request, or the
        next lease to end, gives them work again."""
        target = self._timers_target
        return (
            self.dispatcher.idle
            and self._timers_pauses.paused
            and not self._timers_wake.is_set()
            and (target is None or target > self._now())
        )

    async def until_idle(self) -> None:
        """Return at a moment the engine is `idle`: everything it was given so far has been
        carried through (assignments committed and pushed, timers that were due fired)."""
        while not self.idle:
            if not self.dispatcher.idle:
                await self.dispatcher.until_idle()
            else:
                await self._timers_pauses.next_pause()

    async def _fire_due_timers(self) -> datetime | None:
        """Catch up after an outage, then do what is due; when the next thing will be."""
        if self._resync_due and not self.dispatcher.whole_queue:
            self._resync_due = False
            self.dispatcher.work_elsewhere(None)
        elif self._resync_due:
            queued = await self._store.tasks.load_queue()
            self._resync_due = False
            self.dispatcher.enqueue(queued)  # tasks it already knows are passed over
        while self._disconnects_due:
            stream, closed_at = self._disconnects_due[0]
            if stream.generation is not None:
                await self._store.agents.disconnect_agent(
                    stream.agent_id, stream.generation, closed_at
                )
            self._disconnects_due.popleft()
        grace = self._settings.agent_grace
        while True:
            now = self._now()
            deadline, disconnected = await self._store.timers.next_timers()
            grace_end = None if disconnected is None else disconnected + grace
            if deadline is not None and deadline <= now:
                await self._store.timers.expire_leases(
                    now, self._settings.quarantine_after, self._apply
                )
            elif grace_end is not None and grace_end <= now:
                await self._store.timers.lose_agents(now - grace, now, self._apply)
            else:
                return min(
                    (when for when in (deadline, grace_end) if when is not None), default=None
                )

    def _fenced(self, why: str) -> None:
        """No stream may be held here any more (see `membership`): its agents reconnect to
        another."""
        self.streams.close_all(
            Unavailable(f"this replica stopped holding streams ({why}): reconnect")
        )

    def _streams_lost(self, now: datetime) -> None:
        """Agents were disconnected for their replica's death: their grace periods end later."""
        self._timer_at(now + self._settings.agent_grace)

    def storage_recovered(self) -> None:
        """Storage works again after an outage: have the timers write what it refused and
        reread the queue (see the module docstring)."""
        self._resync_due = True
        self._timers_wake.set()

    def _timer_at(self, when: datetime) -> None:
        """A lease or grace period now ends at `when`: wake the timers if that is sooner."""
        if self._timers_target is None or when < self._timers_target:
            self._timers_wake.set()

    # Agents --------------------------------------------------------------------------------

    async def register_agent(self, registration: AgentRegistration) -> tuple[Agent, str]:
        """Register an agent or update a registered one (agents restart: this is idempotent).
        Returns the agent and its new token: the earlier token stops working when the
        registration commits, and a stream opened with it ends."""
        raise_if(validation.check_registration(registration))
        slots = registration.max_concurrent_tasks or 1
        token, token_digest = issue_agent_token()

        def on_commit(agent: Agent) -> None:
            self._install_token(agent.agent_id, token_digest)
            self.dispatcher.agent_changed(agent.profile())
            self._tell(Notice("", agents={agent.agent_id}))

        agent = await self._store.agents.register_agent(
            dataclasses.replace(registration, max_concurrent_tasks=slots),
            token_digest,
            self._now(),
            on_commit,
        )
        log.info("agent registered", extra={"agent_id": agent.agent_id})
        return agent, token

    def _install_token(self, agent_id: str, token_digest: str) -> None:
        """The agent's token is now the one of `token_digest`: a stream opened with the one
        before ends."""
        earlier = self.agent_tokens.install(agent_id, token_digest)
        stream = self.streams.get(agent_id)
        rotated = earlier not in (None, token_digest)
        if rotated and stream is not None and stream.token_digest == earlier:
            stream.close(
                TokenRotated("the agent registered again: this stream's token no longer works")
            )
            log.info("stream of a rotated token closed", extra={"agent_id": agent_id})

    async def deregister_agent(self, agent_id: str) -> None:
        """Remove an agent: its stream ends, the tasks it held go back to the queue, and the
        tasks pinned to it, which no other agent may take, fail (see
        `AgentStore.deregister_agent`)."""
        raise_if(check_id(agent_id, "agent_id"))

        def on_commit(effects: Effects) -> None:
            self._forget_agent(agent_id)
            self._apply(effects)
            self._tell(Notice("", agents={agent_id}))

        await self._store.agents.deregister_agent(agent_id, self._now(), on_commit)
        log.info("agent deregistered", extra={"agent_id": agent_id})

    def _forget_agent(self, agent_id: str) -> None:
        """The agent was removed: its token, its stream and its place in dispatch go."""
        self.agent_tokens.revoke(agent_id)
        self.streams.forget(agent_id)
        self.dispatcher.agent_offline(agent_id)

    async def heartbeat(self, agent_id: str) -> datetime:
        """Record that the agent is alive; returns the server's time."""
        raise_if(check_id(agent_id, "agent_id"))
        now = self._now()
        await self._store.agents.touch_agent(agent_id, now)
        return now

    async def report_state(
        self, agent_id: str, reported: ReportedState | None, detail: str
    ) -> Agent:
        """Record the state the agent reports: IDLE, BUSY or ERROR."""
        violations = [*check_id(agent_id, "agent_id"), *validation.check_text(detail, "detail")]
        if reported is None or reported is ReportedState.NONE:
            violations.append(FieldViolation("state", "must be IDLE, BUSY or ERROR"))
        raise_if(violations)
        assert reported is not None
        agent = await self._store.agents.report_state(
            agent_id,
            reported,
            detail,
            self._now(),
            self._reported,
        )
        log.info(
            "agent reported state",
            extra={"agent_id": agent_id, "state": reported.value, "detail": detail},
        )
        return agent

    def _reported(self, agent: Agent) -> None:
        self.dispatcher.agent_changed(agent.profile())
        self._tell(Notice("", agents={agent.agent_id}))

    async def get_agent(self, agent_id: str) -> Agent:
        """One agent."""
        raise_if(check_id(agent_id, "agent_id"))
        return await self._store.agents.get_agent(agent_id)

    async def list_agents(
        self, page_size: int, page_token: str, state: AgentState | None, capability: str
    ) -> Page[Agent]:
        """A page of agents."""
        raise_if(
            [
                *validation.check_page(page_size),
                *validation.check_text(capability, "capability", 200),
            ]
        )
        size = validation.page_size_or_default(page_size, self._settings.limits)
        return await self._store.agents.list_agents(
            size, page_token, state, capability, self._budget
        )

    # Streams -------------------------------------------------------------------------------

    async def open_stream(self, agent_id: str, token_digest: str | None = None) -> AgentStream:
        """Open the agent's task stream, replacing any older one. The attempts the agent already
        holds are sent first (marked redelivered): an agent that restarted lost them. A stream
        opened with an agent token (of digest `token_digest`) ends when the token is revoked.
        """
        raise_if(check_id(agent_id, "agent_id"))
        if self._draining:
            raise Unavailable("the server is shutting down")
        if not self.membership.serving:
            raise Unavailable("this replica holds no streams now: connect to another")
        stream = self.streams.new_stream(agent_id, token_digest)

        def on_commit(connected: Connected) -> None:
            stream.generation = connected.generation
            self.streams.install(stream, Aborted("replaced by a newer stream for this agent"))
            if self._draining:  # the drain began while this stream was being opened
                stream.close(Unavailable("the server is shutting down"))
                return
            if token_digest is not None and self.agent_tokens.agent_of(token_digest) != agent_id:
                # Rotated or revoked while this stream was being opened.
                stream.close(Unauthenticated("the agent token of this stream was revoked"))
                return
            for assignment in connected.held:
                stream.push(assignment)
            self.dispatcher.agent_online(
                connected.profile,
                (a.task_id for a in connected.held),
                backlogged=stream.backlogged,
            )
            self._tell(Notice("", agents={agent_id}))  # a replica that held it lets go

        await self._store.agents.connect_agent(agent_id, self._now(), on_commit)
        log.info("agent connected", extra={"agent_id": agent_id})
        return stream

    async def close_stream(self, stream: AgentStream) -> None:
        """The stream ended (client gone, replaced, deregistered, draining)."""
        stream.close()
        if self.streams.remove(stream):
            self.dispatcher.agent_offline(stream.agent_id)
            now = self._now()
            try:
                if stream.generation is not None:
                    await self._store.agents.disconnect_agent(
                        stream.agent_id, stream.generation, now
                    )
            except StorageFault:
                # Written by the timers once storage is back; until then the agent shows
                # connected, and takes no task (the dispatcher knows it is gone).
                self._disconnects_due.append((stream, now))
                self._timers_wake.set()
            except Unavailable:
                pass  # draining refuses writes: every agent is marked disconnected at next start
            else:
                self._timer_at(now + self._settings.agent_grace)
        log.info("agent disconnected", extra={"agent_id": stream.agent_id})

    def _encode_event(self, event: StreamEvent) -> tuple[Any, int]:
        """An event as its stream carries it. The size of the encoding, known anyway, is all
        the common event costs; only an assignment over the response budget is cut (see
        `fit_assignment`) and encoded again, so that a default client can receive it."""
        message, size = self._encode(event)
        if size > self._budget.bytes and isinstance(event, Assignment) and event.dependency_outputs:
            return self._encode(fit_assignment(event, self._budget))
        return message, size

    def _backlogged(self, stream: AgentStream, over: bool) -> None:
        """A stream's buffer crossed its bound: its agent takes no new work while it is over."""
        if self.streams.is_current(stream):
            self.dispatcher.agent_backlogged(stream.agent_id, over)

    def _stalled(self, stream: AgentStream) -> None:
        """A stream took nothing for the stall timeout: close it, and disconnect its agent now,
        not when its write (which waits on the client) ends; the timers write the disconnection,
        and the agent's tasks follow the agent-loss rules from this moment."""
        log.warning(
            "agent stream stalled",
            extra={
                "agent_id": stream.agent_id,
                "buffered_messages": stream.buffered_messages,
                "buffered_bytes": stream.buffered_bytes,
            },
        )
        timeout = self._settings.streams.stall_timeout
        stream.close(StreamStalled(f"the task stream took no message for {timeout:g} s; reconnect"))
        if self.streams.remove(stream):
            self.dispatcher.agent_offline(stream.agent_id)
            self._disconnects_due.append((stream, self._now()))
            self._timers_wake.set()

    # Definitions ---------------------------------------------------------------------------

    async def create_definition(
        self, draft: DefinitionDraft, request_id: str
    ) -> WorkflowDefinition:
        """Store a new definition (the next version of its name)."""
        violations = list(validation.check_definition(draft, "definition.", self._settings.limits))
        violations.extend(check_id(request_id, "request_id", required=False))
        raise_if(violations)
        raise_if(self._check_readable(draft))
        self._admission.admit_new_work()
        definition = await self._store.definitions.create_definition(draft, request_id, self._now())
        log.info(
            "definition created",
            extra={
                "definition_id": definition.definition_id,
                "workflow": definition.workflow_name,
                "version": definition.version,
            },
        )
        return definition

    def _check_readable(self, draft: DefinitionDraft) -> list[FieldViolation]:
        """A definition is stored only if a client with the default message limit can read it
        back: a request under a raised OPSCORE_MAX_MESSAGE_BYTES can hold a larger one, and so,
        by a few bytes, can a request at the limit, since the server adds its id and version."""
        stored = WorkflowDefinition(
            definition_id=new_id(),
            workflow_name=draft.workflow_name,
            version=2**31 - 1,
            description=draft.description,
            tasks=draft.tasks,
            created_at=self._now(),
        )
        size = self._budget.sizes.definition(stored)
        if size <= self._budget.bytes:
            return []
        return [
            FieldViolation(
                "definition",
                f"takes {size} bytes in a response, more than the {self._budget.bytes} one "
                "response may carry",
                over_limit=True,
            )
        ]

    async def get_definition(self, definition_id: str) -> WorkflowDefinition:
        """One definition."""
        raise_if(check_id(definition_id, "definition_id"))
        return await self._store.definitions.get_definition(definition_id)

    async def list_definitions(
        self, page_size: int, page_token: str, workflow_name: str
    ) -> Page[WorkflowDefinition]:
        """A page of definitions, cut to fit one response."""
        raise_if(
            [
                *validation.check_page(page_size),
                *validation.check_text(workflow_name, "workflow_name", 200),
            ]
        )
        size = validation.page_size_or_default(page_size, self._settings.limits)
        return await self._store.definitions.list_definitions(
            size, page_token, workflow_name, self._budget
        )

    # Runs ----------------------------------------------------------------------------------

    async def trigger(self, request: TriggerRequest) -> WorkflowRun:
        """Start a run; a repeated request_id returns the first run, whole (see `fit_run`), if
        the request is the same (ALREADY_EXISTS if not)."""
        raise_if(self._check_trigger(request))
        self._admission.admit_new_work()

        def on_commit(created: CreatedRun) -> None:
            if created.created:
                _record_after_sends(
                    logging.DEBUG,
                    "run started",
                    {"run_id": created.run.run_id, "workflow": created.run.workflow_name},
                )
            self._apply(created.effects)

        return await self._store.runs.create_run(
            NewRun(
                definition_id=request.definition_id,
                workflow_name=request.workflow_name,
                inline=request.definition,
                agent_id=request.agent_id,
                run_input=request.input,
                request_id=request.request_id,
                fingerprint=(
                    idempotency.trigger_fingerprint(request) if request.request_id else ""
                ),
                now=self._now(),
                on_commit=on_commit,
            )
        )

    def _check_trigger(self, request: TriggerRequest) -> list[FieldViolation]:
        sources = [
            bool(request.definition_id),
            bool(request.workflow_name),
            request.definition is not None,
        ]
        violations: list[FieldViolation] = []
        if sum(sources) != 1:
            violations.append(
                FieldViolation(
                    "source",
                    "exactly one of definition_id, workflow_name, definition is required",
                )
            )
        violations.extend(check_id(request.definition_id, "definition_id", required=False))
        violations.extend(validation.check_text(request.workflow_name, "workflow_name", 200))
        if request.definition is not None:
            violations.extend(
                validation.check_definition(
                    request.definition, "definition.", self._settings.limits
                )
            )
        violations.extend(check_id(request.agent_id, "agent_id", required=False))
        violations.extend(check_id(request.request_id, "request_id", required=False))
        violations.extend(validation.check_payload(request.input, "input", self._settings.limits))
        return violations

    async def get_run(self, run_id: str, view: RunView | None = None) -> WorkflowRun:
        """One run in `view` (FULL by default): with as many of its tasks as fit in one
        response, each queued one saying why it waits."""
        raise_if(check_id(run_id, "run_id"))
        run = await self._store.runs.read_run(run_id, view or RunView.FULL, self._budget)
        return dataclasses.replace(run, tasks=await self._explained(run.tasks))

    async def list_runs(
        self,
        page_size: int,
        page_token: str,
        where: RunFilter,
        order_by: str = "",
        view: RunView | None = None,
    ) -> Page[WorkflowRun]:
        """A page of the runs `where` matches, in the order `order_by` names (newest first by
        default), in `view` (BASIC by default), cut to fit one response."""
        raise_if([*validation.check_page(page_size), *validation.check_run_filter(where)])
        order = validation.run_order(order_by)
        size = validation.page_size_or_default(page_size, self._settings.limits)
        page = await self._store.runs.list_runs(
            size, page_token, where, order, view or RunView.BASIC, self._budget
        )
        tasks = iter(await self._explained([task for run in page.items for task in run.tasks]))
        runs = [
            dataclasses.replace(run, tasks=tuple(next(tasks) for _ in run.tasks))
            for run in page.items
        ]
        return Page(tuple(runs), page.next_page_token)

    async def list_run_tasks(self, run_id: str, page_size: int, page_token: str) -> Page[TaskRun]:
        """A page of a run's tasks in definition order, cut to fit one response, each queued
        one saying why it waits."""
        raise_if([*check_id(run_id, "run_id"), *validation.check_page(page_size)])
        size = validation.page_size_or_default(page_size, self._settings.limits)
        page = await self._store.runs.list_run_tasks(run_id, size, page_token, self._budget)
        return Page(await self._explained(page.items), page.next_page_token)

    async def _explained(self, tasks: Sequence[TaskRun]) -> tuple[TaskRun, ...]:
        """The tasks with a `waiting_reason` on each queued one, from the registered agents
        (read now) and the free ones (the dispatcher's). The budget measured each queued task
        with room for its reason (`waiting.WithReasons`), so the response still fits."""
        queued = [task for task in tasks if task.state is TaskState.QUEUED]
        if not queued:
            return tuple(tasks)
        pinned, offers = await self._store.agents.waiting_candidates(queued)
        now = self._now()
        nobody = waiting.Offer(registered=False, connected=False)

        def explain(task: TaskRun) -> TaskRun:
            if task.state is not TaskState.QUEUED:
                return task
            needs = waiting.requirement(task)
            offer = offers.get(needs, nobody)
            candidates = waiting.Candidates(
                offer,
                not task.pinned_agent_id
                and (offer.idle_elsewhere or self.dispatcher.has_free_agent(*needs)),
                pinned.get(task.pinned_agent_id),
            )
            return dataclasses.replace(
                task, waiting_reason=waiting.waiting_reason(task, now, candidates)
            )

        return tuple(map(explain, tasks))

    async def cancel_run(self, run_id: str) -> WorkflowRun:
        """Cancel an unfinished run; agents holding its tasks are told to stop. The run is
        returned whole (see `fit_run`)."""
        raise_if(check_id(run_id, "run_id"))
        return await self._store.runs.cancel_run(run_id, self._now(), self._apply)

    @property
    def response_bytes(self) -> int:
        """Bytes of runs and tasks one response may carry."""
        return self._budget.bytes

    def fit_run(self, run: WorkflowRun) -> WorkflowRun:
        """A run read whole (as a trigger or a cancellation returns it) that is too large for
        one response, cut to fit: as many of its tasks as fit, and a token for the rest."""
        return self._store.runs.fit_run(run, self._budget)

    async def watch_run(self, run_id: str) -> AsyncIterator[Change]:
        """A run as it changes (WatchWorkflowRun, see `domain.watch`): first the run with as
        many of its tasks as fit in one response, then its own fields with the tasks that
        changed, as many as fit in each response, until a response carries it final."""
        raise_if(check_id(run_id, "run_id"))
        await self._store.runs.read_run(run_id, RunView.BASIC, self._budget)  # NOT_FOUND
        watch = RunWatch(run_id)
        self.watches.opening(watch)
        try:
            # A batch, for its observation: the watch opens at its end, if not at an earlier's.
            await self._store.runs.observe_watched()
            run = await watch.first
            if not run.state.finished:
                self._tell(Notice("", watching={run_id}))
            yield self.fit_run(run), ()
            while not run.state.finished:
                run, changed = await watch.next(self.watches.latest(run_id))
                for part in self._parts(run, changed):
                    yield run, part
        finally:
            self.watches.remove(watch)

    def _parts(self, run: WorkflowRun, tasks: Sequence[TaskRun]) -> list[tuple[TaskRun, ...]]:
        """`tasks` in as many responses as they need beside `run` (a task alone may still be
        over: it is sent so, as its cut could not be read back)."""
        sizes = self._budget.sizes
        room = self._budget.bytes - sizes.run(run)
        parts: list[tuple[TaskRun, ...]] = []
        part: list[TaskRun] = []
        used = 0
        for task in tasks:
            size = sizes.task(task)
            if part and used + size > room:
                parts.append(tuple(part))
                part, used = [], 0
            part.append(task)
            used += size
        parts.append(tuple(part))
        return parts

    def observed_runs(self, runs: dict[str, WorkflowRun]) -> None:
        """The watched runs as a committed batch left them (what the server has the writer
        call): to this replica's watches, and word to the others of what changed in theirs."""
        changed = self.watches.observed(runs)
        if changed:
            self._tell(Notice("", changed_runs=changed))

    async def run_watch_rereads(self) -> None:
        """Until cancelled, with other replicas: observe the runs watched here when another
        replica says it changed one, and at least every `domain.watch.REREAD_EVERY` while one
        is unfinished; tell the others every `ANNOUNCE_EVERY` which runs are watched here
        (nothing for a server that owns its database alone, whose writer sees every change)."""
        if self._noticeboard is None:
            return
        announced = self._clock.monotonic()
        while True:
            await self._clock.wait(self._watch_wake, self._now() + WATCH_REREAD_EVERY)
            self._watch_wake.clear()
            now = self._clock.monotonic()
            self.watches.expire(now)
            if not (self.membership.peers and self.watches.due()):
                continue
            if now >= announced + ANNOUNCE_EVERY.total_seconds():
                announced = now
                self._tell(Notice("", watching=self.watches.watching()))
            with contextlib.suppress(StorageFault):
                await self._store.runs.observe_watched()

    # Results -------------------------------------------------------------------------------

    async def complete_task(
        self, task_id: str, agent_id: str, attempt: int, output: JsonObject
    ) -> None:
        """Record a task's output; returns once it is committed and its dependents are queued."""
        raise_if(
            [
                *_check_result(task_id, agent_id, attempt),
                *validation.check_payload(output, "output", self._settings.limits),
            ]
        )

        def on_commit(effects: Effects) -> None:
            if effects.released:
                _record_after_sends(
                    logging.DEBUG,
                    "task completed",
                    {"task_id": task_id, "agent_id": agent_id, "attempt": attempt},
                )
            self._apply(effects)

        await self._store.tasks.complete_task(
            TaskResult(task_id, agent_id, attempt, output, self._now(), on_commit)
        )

    async def fail_task(
        self, task_id: str, agent_id: str, attempt: int, error: str, retryable: bool
    ) -> None:
        """Record a task's failure: retried under its policy when `retryable` and attempts
        remain; otherwise final (its fallback runs, or its run fails). The same failure again
        changes nothing; another result for the same attempt is refused (RESULT_CONFLICT)."""
        limits = self._settings.limits
        raise_if(
            [
                *_check_result(task_id, agent_id, attempt),
                *validation.check_text(error, "error", limits.max_error_bytes),
            ]
        )
        # A final failure always says something, for operators and for a fallback's input.
        error = error or FAILURE_WITHOUT_TEXT

        def on_commit(effects: Effects) -> None:
            if effects.released:
                _record_after_sends(
                    logging.INFO,
                    "task failed",
                    {
                        "task_id": task_id,
                        "agent_id": agent_id,
                        "attempt": attempt,
                        "error": error,
                        "retryable": retryable,
                    },
                )
            self._apply(effects)

        await self._store.tasks.fail_task(
            task_id, agent_id, attempt, error, retryable, self._now(), on_commit
        )

    async def extend_lease(
        self, task_id: str, agent_id: str, attempt: int, extend_by: timedelta | None
    ) -> datetime:
        """Give a long task more time: its lease ends no sooner than `extend_by` from now."""
        violations = _check_result(task_id, agent_id, attempt)
        if extend_by is None:
            violations.append(FieldViolation("extend_by", "is required"))
        else:
            violations.extend(
                validation.check_duration(
                    extend_by,
                    "extend_by",
                    allow_zero=False,
                    maximum=self._settings.limits.max_task_timeout,
                )
            )
        raise_if(violations)
        assert extend_by is not None
        return await self._store.tasks.extend_lease(
            task_id, agent_id, attempt, extend_by, self._now()
        )

    # Replicas ------------------------------------------------------------------------------

    def _tell(self, notice: Notice) -> None:
        """Tell the other replicas, if any, what a committed write means for their agents."""
        if self._noticeboard is not None and self.membership.peers and notice:
            notice.sender = self.membership.replica_id
            self._noticeboard.post(notice)

    def announce(self, capabilities: set[str]) -> None:
        """Tasks of these capabilities were queued and no agent here took them: the other
        replicas' free agents may (what the shared dispatch calls)."""
        self._tell(Notice("", ready=capabilities))

    async def claim(self, wants: list[Want]) -> Claimed:
        """Claim queued tasks from the database for this replica's free agents (what the
        shared dispatch calls: see `shared_dispatcher`)."""
        return await self._store.tasks.claim(
            wants, self._now(), self.dispatcher.reserve_for_commit, self.assigned
        )

    def noticed(self, notice: Notice) -> None:
        """Another replica committed what concerns this one: work to claim, slots and attempts
        of this replica's agents, agents to reread."""
        if notice.joined:
            self.membership.peers += 1
            self._tell(Notice("", watching=self.watches.watching()))
        if notice.watching:
            until = self._clock.monotonic() + WATCHED_FOR.total_seconds()
            self.watches.watched_elsewhere(notice.watching, until)
        if notice.changed_runs:
            self._watch_wake.set()
        if notice.ready:
            self.dispatcher.work_elsewhere(notice.ready)
        for agent_id, task_id in notice.released:
            self.dispatcher.release(agent_id, task_id)
        for cancellation in notice.cancelled:
            stream = self.streams.get(cancellation.agent_id)
            if stream is not None:
                stream.push(cancellation)
        self._reread(notice.agents)

    def notices_missed(self) -> None:
        """Notices may have been lost: claim whatever the free agents can take, and reread
        every agent streaming here."""
        self.dispatcher.work_elsewhere(None)
        self._reread(self.streams.agent_ids())
        self._tell(Notice("", watching=self.watches.watching()))
        self._watch_wake.set()

    def _reread(self, agent_ids: Iterable[str]) -> None:
        self._stale.update(agent_ids)
        if self._stale:
            self._stale_wake.set()

    async def run_notices(self) -> None:
        """Receive the other replicas' notices and reread the agents they changed, until
        cancelled (nothing to do for a server that owns its database alone)."""
        if self._noticeboard is None:
            return
        listening = asyncio.create_task(self._noticeboard.run(self.noticed, self.notices_missed))
        try:
            while True:
                await self._clock.wait(self._stale_wake, self._now() + REREAD_EVERY)
                if not self._stale_wake.is_set() and self.membership.peers:
                    # A notice dies with a replica killed between its commit and its NOTIFY.
                    self._reread(self.streams.agent_ids())
                self._stale_wake.clear()
                if not self._stale:
                    continue
                stale, self._stale = sorted(self._stale), set()
                try:
                    await self._store.agents.reread(
                        stale, functools.partial(self._agents_reread, stale)
                    )
                except StorageFault:
                    self._reread(stale)
                    await self._clock.sleep(1.0)
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)

    def _agents_reread(self, agent_ids: list[str], found: dict[str, AgentRow]) -> None:
        """Bring tokens, streams and dispatch in line with agents as another replica left
        them: removed, registered again (a new token), streaming elsewhere now, or changed."""
        for agent_id in agent_ids:
            row = found.get(agent_id)
            if row is None:
                self._forget_agent(agent_id)
                continue
            if row.token_digest is not None:
                self._install_token(agent_id, row.token_digest)
            stream = self.streams.get(agent_id)
            if stream is None or stream.generation is None:
                continue
            if row.generation > stream.generation:
                stream.close(
                    Aborted("replaced by a newer stream for this agent on another replica")
                )
            else:
                self.dispatcher.agent_changed(row.profile)
                self.dispatcher.holding(agent_id, row.held)

    # Dispatch ------------------------------------------------------------------------------

    async def _assign(self, pairs: list[tuple[ReadyTask, str]]) -> None:
        await self._store.tasks.assign(
            pairs,
            self._now(),
            functools.partial(self.assigned, pairs),
        )

    def assigned(self, pairs: list[tuple[ReadyTask, str]], placed: list[Placed]) -> None:
        """Committed assignments: the agents hold their tasks and are sent them. A task whose
        agent could not take it waits again; a task gone frees its agent's slot. Also what the
        placement before a write's commit calls (`Store.placement`, wired by the server)."""
        for (task, agent_id), assignment in zip(pairs, placed, strict=True):
            if assignment is Unassigned.AGENT_UNFIT:
                self.dispatcher.not_taken(agent_id, task)
                continue
            if assignment is Unassigned.TASK_GONE:
                self.dispatcher.gone(agent_id, task)
                continue
            self.dispatcher.assigned(agent_id, task.task_id)
            self._timer_at(assignment.deadline)
            stream = self.streams.get(agent_id)
            if stream is not None:
                stream.push(assignment)
            _record_after_sends(
                logging.DEBUG,
                "task assigned",
                {
                    "task_id": task.task_id,
                    "run_id": task.run_id,
                    "agent_id": agent_id,
                    "attempt": assignment.attempt,
                },
            )

    def _apply(self, effects: Effects) -> None:
        """Bring memory in line with a committed write (called from its commit's callbacks)."""
        self.dispatcher.dequeue(effects.unqueued)
        elsewhere = Notice("")
        for hold in effects.released:
            self.dispatcher.release(hold.agent_id, hold.task_id)
            if self.streams.get(hold.agent_id) is None:
                elsewhere.released.append((hold.agent_id, hold.task_id))
        for cancellation in effects.cancelled:
            _record_after_sends(
                logging.INFO,
                "task attempt cancelled",
                {
                    "task_id": cancellation.task_id,
                    "agent_id": cancellation.agent_id,
                    "attempt": cancellation.attempt,
                    "reason": cancellation.reason,
                },
            )
            stream = self.streams.get(cancellation.agent_id)
            if stream is not None:
                stream.push(cancellation)
            else:
                # Its holder rereads it too: an expired lease counts against the agent.
                elsewhere.cancelled.append(cancellation)
                elsewhere.agents.add(cancellation.agent_id)
        for profile, expiries in effects.quarantined:
            self.dispatcher.agent_changed(profile)
            elsewhere.agents.add(profile.agent_id)
            _record_after_sends(
                logging.WARNING,
                "agent quarantined",
                {"agent_id": profile.agent_id, "lease_expiries": expiries},
            )
        self._tell(elsewhere)
        self.dispatcher.enqueue(effects.queued)
        for run_id, state in effects.finished_runs:
            _record_after_sends(
                logging.INFO, "run finished", {"run_id": run_id, "state": state.value}
            )


def _check_result(task_id: str, agent_id: str, attempt: int) -> list[FieldViolation]:
    violations = [*check_id(task_id, "task_id"), *check_id(agent_id, "agent_id")]
    if attempt < 1:
        violations.append(
            FieldViolation("attempt", "must be the attempt of the assignment (1 or more)")
        )
    return violations
