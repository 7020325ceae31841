"""`SharedDispatcher` beside the contract every dispatch keeps (`test_dispatch_contract.py`):
what only a replica does. Its memory is bounded, what overflowed is claimed once memory runs dry,
work is announced to the other replicas when it is due, and an announcement that comes while a
claim runs is not lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from dispatching import T0, TickingClock, agent, ready

from opscore.domain.models import ReadyTask
from opscore.domain.ports import Claimed, Want
from opscore.domain.shared_dispatcher import SharedDispatcher

WAIT = 5.0


class Database:
    """The queued tasks as the database holds them, claimed earliest first as `Tasks.claim`
    claims them: those due by `clock` (and, for a want `ahead`, those waiting in the places
    left), locked, matched by the dispatch, the matches assigned in the same write."""

    def __init__(self, clock: TickingClock) -> None:
        self.clock = clock
        self.queued: list[ReadyTask] = []
        self.assigned: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.claims: list[list[Want]] = []
        self.dispatch: SharedDispatcher | None = None
        self.hold: asyncio.Event | None = None
        """While set to an unset event, a claim waits for it (a claim that takes a while)."""

    async def assign(self, pairs: list[tuple[ReadyTask, str]]) -> None:
        for task, agent_id in pairs:
            self._assigned(task, agent_id)

    def _assigned(self, task: ReadyTask, agent_id: str) -> None:
        assert self.dispatch is not None
        self.queued = [queued for queued in self.queued if queued.task_id != task.task_id]
        self.dispatch.assigned(agent_id, task.task_id)
        self.assigned.put_nowait((task.task_id, agent_id))

    async def claim(self, wants: list[Want]) -> Claimed:
        assert self.dispatch is not None
        self.claims.append(wants)
        if self.hold is not None:
            await self.hold.wait()
        found: dict[str, int] = {}
        locked: list[ReadyTask] = []
        for want in wants:
            now = self.clock.now()
            mine = [task for task in self.queued if task.capability == want.capability]
            due = [task for task in mine if task.not_before is None or task.not_before <= now]
            taken = due[: want.limit]
            found[want.capability] = len(taken)
            if want.ahead:
                waiting = [task for task in mine if task not in due]
                taken += waiting[: want.limit - len(taken)]
            locked.extend(taken)
        pairs, _ = self.dispatch.reserve_for_commit(locked, [])
        for task, agent_id in pairs:
            self._assigned(task, agent_id)
        taken = {task.task_id for task, _ in pairs}
        return Claimed(found, len(pairs), [task for task in locked if task.task_id not in taken])

    async def next_assigned(self) -> tuple[str, str]:
        async with asyncio.timeout(WAIT):
            return await self.assigned.get()


class Replica:
    def __init__(self, prefetch: int) -> None:
        self.clock = TickingClock()
        self.database = Database(self.clock)
        self.announced: list[set[str]] = []
        self.dispatch = SharedDispatcher(
            self.database.assign,
            clock=self.clock,
            claim=self.database.claim,
            announce=self.announced.append,
            prefetch=prefetch,
        )
        self.database.dispatch = self.dispatch

    def commit(self, tasks: list[ReadyTask]) -> None:
        """A write of this replica queued these tasks (in the database, then in memory)."""
        self.database.queued.extend(tasks)
        self.dispatch.enqueue(tasks)


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    made = Replica(prefetch=3)
    loop = asyncio.create_task(made.dispatch.run())
    yield made
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop


async def test_memory_keeps_a_prefetch_and_the_rest_is_claimed_in_ready_order(
    replica: Replica,
) -> None:
    replica.dispatch.agent_online(agent("w", "c"), ["busy"])  # its one slot taken
    replica.commit([ready(f"t{index}", "c") for index in range(10)])
    assert replica.dispatch.queued <= 3
    replica.dispatch.release("w", "busy")
    taken = []
    for _ in range(10):
        task_id, agent_id = await replica.database.next_assigned()
        taken.append(task_id)
        replica.dispatch.release(agent_id, task_id)
    assert taken == [f"t{index}" for index in range(10)]
    assert replica.database.claims, "what overflowed the prefetch was never claimed"


async def test_a_retry_is_announced_when_it_is_due_not_before(replica: Replica) -> None:
    replica.commit([ready("now", "c"), ready("later", "d", not_before=T0 + timedelta(seconds=1))])
    assert replica.announced == [{"c"}]
    replica.clock.advance(timedelta(seconds=1))
    async with asyncio.timeout(WAIT):
        while len(replica.announced) < 2:
            await asyncio.sleep(0)
    assert replica.announced[1] == {"d"}


async def test_a_retry_in_the_database_that_nobody_announces_is_assigned_when_due(
    replica: Replica,
) -> None:
    """A replica that starts learns, in its first claim, of retries queued before (by itself
    before a restart, or by a replica that is gone), and assigns each when its backoff ends."""
    due_at = T0 + timedelta(seconds=3)
    replica.database.queued.append(ready("retry", "c", not_before=due_at))
    replica.dispatch.agent_online(agent("w", "c"), ())
    async with asyncio.timeout(WAIT):
        while not replica.database.claims:  # the claim at start
            await asyncio.sleep(0)
    assert replica.database.claims[0][0].ahead
    replica.clock.advance(timedelta(seconds=3))
    assert await replica.database.next_assigned() == ("retry", "w")
    assert replica.clock.now() >= due_at


async def test_a_claim_for_work_announced_takes_due_tasks_only(replica: Replica) -> None:
    """Retries waiting ahead of due work in ready order take none of the claim's places."""
    replica.dispatch.agent_online(agent("w", "c"), ())
    async with asyncio.timeout(WAIT):
        while not replica.database.claims:  # the claim at start, which finds nothing
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = T0 + timedelta(seconds=600)
    replica.database.queued.extend(
        ready(f"later{index}", "c", not_before=later) for index in range(3)
    )
    replica.database.queued.append(ready("due", "c"))
    replica.database.claims.clear()
    replica.dispatch.work_elsewhere({"c"})
    assert await replica.database.next_assigned() == ("due", "w")
    assert not any(want.ahead for claim in replica.database.claims for want in claim)


async def test_work_announced_while_a_claim_runs_is_claimed_after_it(replica: Replica) -> None:
    held = asyncio.Event()
    replica.database.hold = held
    replica.dispatch.agent_online(agent("w", "c"), ())
    async with asyncio.timeout(WAIT):
        while not replica.database.claims:  # the claim at start, now waiting
            await asyncio.sleep(0)
    # Another replica queues work and says so while the claim runs, which finds nothing.
    replica.database.queued.append(ready("elsewhere", "c"))
    replica.dispatch.work_elsewhere({"c"})
    replica.database.hold = None
    held.set()
    assert await replica.database.next_assigned() == ("elsewhere", "w")


async def test_a_task_gone_at_assignment_is_claimed_back_if_still_queued(
    replica: Replica,
) -> None:
    """Another replica's write held the task when this one assigned it, and left it queued:
    the assignment came back gone, and the agent claims it from the database."""
    replica.dispatch.agent_online(agent("w", "c"), ())
    async with asyncio.timeout(WAIT):
        while not replica.database.claims:  # the claim at start, which finds nothing
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    replica.dispatch.assigned("w", "busy")  # its one slot taken: the write below frees it
    task = ready("held", "c")
    replica.commit([task])
    replica.database.claims.clear()
    pairs, _ = replica.dispatch.reserve_for_commit([], [("w", "busy")])
    assert pairs == [(task, "w")]
    replica.dispatch.release("w", "busy")  # the write committed
    replica.dispatch.gone("w", task)
    assert await replica.database.next_assigned() == ("held", "w")
    assert replica.database.claims, "the task was taken from memory, not claimed"


async def test_the_prefetch_counts_only_tasks_still_queued(replica: Replica) -> None:
    """Tasks that left the queue (cancelled, taken elsewhere) leave entries behind in its heap
    until passed over: they do not count against the prefetch."""
    replica.dispatch.agent_online(agent("w", "c"), ["busy"])  # its one slot taken
    first = [ready(f"old{index}", "c") for index in range(3)]
    replica.commit(first)
    replica.dispatch.dequeue(task.task_id for task in first)
    replica.commit([ready(f"new{index}", "c") for index in range(3)])
    assert replica.dispatch.queued == 3
