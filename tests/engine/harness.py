"""The engine on its own: the in-memory store, a virtual clock, the engine's loops running, and
agents whose streams are read as the servicer reads them. Time moves only when a test advances
it, and `World.advance` returns once the engine has done everything that time made due."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from engine.memory import MemoryStore
from opscore.domain.clock import VirtualClock
from opscore.domain.engine import DEFAULT_TASK_TIMEOUT, Engine, EngineSettings
from opscore.domain.errors import OpsCoreError
from opscore.domain.machine import StateMachine
from opscore.domain.models import (
    Agent,
    AgentRegistration,
    Assignment,
    Cancellation,
    DefinitionDraft,
    JsonObject,
    StreamEvent,
    TaskRun,
    TaskSpec,
    TriggerRequest,
    WorkflowDefinition,
    WorkflowRun,
)
from opscore.domain.retry import ResolvedRetryPolicy
from opscore.streams import AgentStream

T0 = datetime(2026, 1, 1, tzinfo=UTC)
"""When every test's clock starts."""
WAIT = 5.0
"""Real seconds a test waits for the engine to settle before it fails: never reached unless the
engine hangs, since no wait of the engine's is in real time."""
TICK = timedelta(microseconds=1)
"""The smallest step of the clock: what separates "just before" a time from the time itself."""


class Sent:
    """The engine's encoder for the tests: each event is its own message, one byte long, and is
    kept by agent as it is pushed, for the test to `take`."""

    def __init__(self) -> None:
        self._events: dict[str, list[StreamEvent]] = {}

    def __call__(self, event: StreamEvent) -> tuple[StreamEvent, int]:
        self._events.setdefault(event.agent_id, []).append(event)
        return event, 1

    def take(self, agent_id: str) -> list[StreamEvent]:
        """What was pushed to the agent since the last `take`."""
        return self._events.pop(agent_id, [])


class OneByte:
    """Every item of a response measures one byte: the in-memory store cuts pages by count."""

    def run(self, run: WorkflowRun) -> int:
        return 1

    def task(self, task: TaskRun) -> int:
        return 1

    def definition(self, definition: WorkflowDefinition) -> int:
        return 1

    def agent(self, agent: Agent) -> int:
        return 1

    def assignment(self, assignment: Assignment) -> int:
        return 1

    def dependency_output(self, name: str, output: JsonObject) -> int:
        return 1


class Unlimited:
    """Admission with room for any work."""

    def admit_new_work(self) -> None:
        """Always admitted."""


class World:
    """An engine, its store and its clock, and the agents' streams (see the module docstring)."""

    def __init__(self, engine: Engine, store: MemoryStore, clock: VirtualClock, sent: Sent) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self._sent = sent
        self._readers: dict[str, asyncio.Task[None]] = {}

    async def settle(self) -> None:
        """Return once the engine has done all that is due now."""
        async with asyncio.timeout(WAIT):
            await self.engine.until_idle()

    async def advance(self, by: timedelta) -> None:
        """Move the clock `by` on, and settle."""
        self.clock.advance(by)
        await self.settle()

    async def advance_to(self, when: datetime) -> None:
        """Move the clock to `when`, and settle."""
        await self.advance(when - self.clock.now())

    async def agent(self, agent_id: str, *capabilities: str, slots: int = 1) -> None:
        """Register an agent and open its stream."""
        await self.engine.register_agent(
            AgentRegistration(agent_id, capabilities=capabilities, max_concurrent_tasks=slots)
        )
        await self.connect(agent_id)

    async def connect(self, agent_id: str) -> None:
        """Open the agent's stream, read from then on as the servicer reads it."""
        stream = await self.engine.open_stream(agent_id)
        self._readers[agent_id] = asyncio.create_task(self._read(stream))
        await self.settle()

    async def _read(self, stream: AgentStream) -> None:
        with contextlib.suppress(OpsCoreError):  # ended with a reason (replaced, draining)
            async for _ in stream.messages():
                pass
        await self.engine.close_stream(stream)

    async def disconnect(self, agent_id: str) -> None:
        """The agent goes away: its stream ends, and the engine learns of it."""
        stream = self.engine.streams.get(agent_id)
        assert stream is not None, f"{agent_id} has no open stream"
        stream.close()
        await self._readers.pop(agent_id)
        await self.settle()

    def take(self, agent_id: str) -> list[StreamEvent]:
        """The events pushed to the agent since the last `take`."""
        return self._sent.take(agent_id)

    def assignment(self, agent_id: str) -> Assignment:
        """The one event pushed to the agent since the last `take`, an assignment."""
        [event] = self.take(agent_id)
        assert isinstance(event, Assignment), event
        return event

    def cancellation(self, agent_id: str) -> Cancellation:
        """The one event pushed to the agent since the last `take`, a cancellation."""
        [event] = self.take(agent_id)
        assert isinstance(event, Cancellation), event
        return event

    async def trigger(self, *tasks: TaskSpec, name: str = "flow") -> WorkflowRun:
        """Start a run of an inline definition of `tasks`, and settle."""
        run = await self.engine.trigger(
            TriggerRequest(definition=DefinitionDraft(name, tasks=tasks))
        )
        await self.settle()
        return run

    async def task(self, run_id: str, name: str) -> TaskRun:
        """A task of a run, as a client reads it now."""
        run = await self.engine.get_run(run_id)
        [found] = [task for task in run.tasks if task.name == name]
        return found

    async def complete(self, assignment: Assignment, output: JsonObject | None = None) -> None:
        """The holder reports the assignment's success, and the engine settles."""
        await self.engine.complete_task(
            assignment.task_id, assignment.agent_id, assignment.attempt, output or {}
        )
        await self.settle()

    async def fail(self, assignment: Assignment, error: str, *, retryable: bool) -> None:
        """The holder reports the assignment's failure, and the engine settles."""
        await self.engine.fail_task(
            assignment.task_id, assignment.agent_id, assignment.attempt, error, retryable
        )
        await self.settle()

    async def close(self) -> None:
        """End every stream, as a draining server does, and wait for their readers."""
        self.engine.shut_down()
        await asyncio.gather(*self._readers.values())


@contextlib.asynccontextmanager
async def running(
    settings: EngineSettings,
    retry: ResolvedRetryPolicy | None = None,
    timeout: timedelta = DEFAULT_TASK_TIMEOUT,
) -> AsyncIterator[World]:
    """An engine with its loops running on a fresh store, whose clock stands at `T0`; `retry`
    and `timeout` are the defaults for tasks that set none (the backoffs' jitter is drawn from a
    seeded generator)."""
    clock = VirtualClock(T0)
    rules = StateMachine(retry or ResolvedRetryPolicy(), timeout, random.Random(0))
    store = MemoryStore(rules)
    sent = Sent()
    engine = Engine(
        store, settings, admission=Unlimited(), encode=sent, sizes=OneByte(), clock=clock
    )
    store.placement(engine.dispatcher.reserve_for_commit, engine.assigned, clock.now)
    await engine.recover()
    loops = [
        asyncio.create_task(engine.dispatcher.run()),
        asyncio.create_task(engine.run_timers()),
    ]
    world = World(engine, store, clock, sent)
    try:
        yield world
    finally:
        await world.close()
        for loop in loops:
            loop.cancel()
        for ended in await asyncio.gather(*loops, return_exceptions=True):
            if isinstance(ended, Exception):  # the loop failed before it was stopped
                raise ended
