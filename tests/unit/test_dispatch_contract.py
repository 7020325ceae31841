"""The contract of `Dispatch`, run against every implementation: what the engine relies on
whichever one the server chooses. Ready order, who may take what, slots, reservations made before
a write commits and their undo, retry times, and the loop that takes what writes did not place.

Each implementation is driven as the engine drives it: a write reserves before it commits, then
its effects arrive (`release`, `enqueue`) and its assignments are confirmed (`assigned`); the
loop commits its own batches. What one implementation does beside the contract (its cost, its
internals) is tested beside it (`test_dispatcher.py`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta

import pytest
from dispatching import T0, TickingClock, agent, ready

from opscore.domain.dispatch import AssignBatch, Dispatch
from opscore.domain.dispatcher import Dispatcher
from opscore.domain.models import ReadyTask, ReportedState
from opscore.domain.ports import Claimed, Want
from opscore.domain.shared_dispatcher import SharedDispatcher

WAIT = 5.0
"""Seconds to wait for an assignment the loop should commit at once, before failing."""

Build = Callable[[AssignBatch, TickingClock], Dispatch]
"""An implementation under test, built with the batch committer and the clock given."""


def single_process(assign: AssignBatch, clock: TickingClock) -> Dispatch:
    """`Dispatcher`."""
    return Dispatcher(assign, clock=clock)


class Seam:
    """One implementation, driven as the engine drives it (see the module docstring)."""

    def __init__(self, build: Build) -> None:
        self.clock = TickingClock()
        self.dispatch = build(self._commit_batch, self.clock)
        self._by_loop: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._loop: asyncio.Task[None] | None = None

    async def _commit_batch(self, pairs: list[tuple[ReadyTask, str]]) -> None:
        for task, agent_id in pairs:
            self.dispatch.assigned(agent_id, task.task_id)
            self._by_loop.put_nowait((task.task_id, agent_id))

    def commit(
        self, queued: Sequence[ReadyTask] = (), released: Sequence[tuple[str, str]] = ()
    ) -> list[tuple[str, str]]:
        """A write that queues `queued` and frees the slots `released` commits: what it assigns
        in its own transaction, as (task id, agent id) pairs. Its effects are applied after the
        reservation, in the engine's order, and its assignments confirmed."""
        pairs, _ = self.dispatch.reserve_for_commit(queued, released)
        for agent_id, task_id in released:
            self.dispatch.release(agent_id, task_id)
        self.dispatch.enqueue(queued)
        for task, agent_id in pairs:
            self.dispatch.assigned(agent_id, task.task_id)
        return [(task.task_id, agent_id) for task, agent_id in pairs]

    def start_loop(self) -> None:
        """Start the loop (`run`): tests that need it start it, the others never let it run."""
        self._loop = asyncio.create_task(self.dispatch.run())

    async def loop_assigns(self, count: int) -> list[tuple[str, str]]:
        """The next `count` assignments the loop commits, in order, as they come."""
        async with asyncio.timeout(WAIT):
            return [await self._by_loop.get() for _ in range(count)]

    async def stop(self) -> None:
        """Stop the loop; it must have committed nothing the test did not expect."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        assert self._by_loop.empty(), "the loop assigned what the test did not expect"


async def _nothing_elsewhere(wants: list[Want]) -> Claimed:
    """A database holding nothing but what the dispatch was told of."""
    return Claimed({want.capability: 0 for want in wants}, 0, [])


def replica(assign: AssignBatch, clock: TickingClock) -> Dispatch:
    """`SharedDispatcher`, alone on its database: everything it is told of fits its prefetch."""
    return SharedDispatcher(
        assign, clock=clock, claim=_nothing_elsewhere, announce=lambda capabilities: None
    )


@pytest.fixture(
    params=[
        pytest.param(single_process, id="single-process"),
        pytest.param(replica, id="replica"),
    ]
)
async def seam(request: pytest.FixtureRequest) -> AsyncIterator[Seam]:
    """Each implementation of `Dispatch` in turn."""
    seam = Seam(request.param)
    yield seam
    await seam.stop()


async def test_tasks_go_out_in_ready_order_to_the_longest_waiting_agent(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("first"), ())
    seam.dispatch.agent_online(agent("second"), ())
    placed = seam.commit([ready("t1"), ready("t2"), ready("t3")])
    assert placed == [("t1", "first"), ("t2", "second")]
    assert seam.dispatch.queued == 1
    assert seam.commit(released=[("first", "t1")]) == [("t3", "first")]
    assert seam.dispatch.queued == 0


async def test_capability_labels_and_pins_are_respected(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("cpu", "cpu", labels={"zone": "eu"}), ())
    seam.dispatch.agent_online(agent("gpu", "gpu", labels={"zone": "us"}), ())
    placed = seam.commit(
        [
            ready("needs-gpu-eu", "gpu", {"zone": "eu"}),
            ready("pinned-cpu", pinned="cpu"),
            ready("any-us", labels={"zone": "us"}),
        ]
    )
    assert sorted(placed) == [("any-us", "gpu"), ("pinned-cpu", "cpu")]
    assert seam.dispatch.queued == 1


async def test_a_pinned_task_waits_for_its_own_agent_while_others_are_free(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("mine"), ["busy"])
    seam.dispatch.agent_online(agent("other"), ())
    assert seam.commit([ready("pinned", pinned="mine"), ready("to-gone", pinned="gone")]) == []
    assert seam.commit(released=[("mine", "busy")]) == [("pinned", "mine")]
    assert seam.dispatch.queued == 1


async def test_reported_state_and_slots_gate_dispatch(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("w", slots=2, reported=ReportedState.ERROR), ())
    assert seam.commit([ready("t1"), ready("t2"), ready("t3")]) == []
    seam.start_loop()
    seam.dispatch.agent_changed(agent("w", slots=2, reported=ReportedState.IDLE))
    assert await seam.loop_assigns(2) == [("t1", "w"), ("t2", "w")]
    seam.dispatch.release("w", "t1")
    seam.dispatch.release("w", "t1")  # idempotent: one slot, not two
    assert await seam.loop_assigns(1) == [("t3", "w")]
    assert seam.commit([ready("t4")]) == []


async def test_a_backlogged_agent_takes_nothing_until_its_stream_drains(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("silent", slots=10), (), backlogged=True)
    seam.dispatch.agent_online(agent("reader", slots=10), ())
    assert {a for _, a in seam.commit([ready("t1"), ready("t2")])} == {"reader"}
    seam.dispatch.agent_backlogged("reader", True)
    assert seam.commit([ready("t3")]) == []
    seam.start_loop()
    seam.dispatch.agent_backlogged("silent", False)
    assert await seam.loop_assigns(1) == [("t3", "silent")]


async def test_dequeued_tasks_and_offline_agents_are_skipped(seam: Seam) -> None:
    seam.commit([ready("gone"), ready("kept")])
    seam.dispatch.dequeue(["gone"])
    seam.dispatch.agent_online(agent("w"), ())
    seam.dispatch.agent_offline("w")
    assert seam.commit() == []
    seam.dispatch.agent_online(agent("w"), ["held-before"])
    assert seam.commit() == []
    seam.start_loop()
    seam.dispatch.release("w", "held-before")
    assert await seam.loop_assigns(1) == [("kept", "w")]


async def test_the_longest_waiting_agent_of_the_capability_wins_after_any_history(
    seam: Seam,
) -> None:
    for name in ("a", "b", "c"):
        seam.dispatch.agent_online(agent(name, "cpu", slots=2), ())
    assert seam.commit([ready("t1", "cpu"), ready("t2", "cpu")]) == [("t1", "a"), ("t2", "b")]
    seam.dispatch.release("a", "t1")  # a still had a free slot: it keeps waiting from t1's match
    seam.dispatch.agent_changed(agent("c", "cpu", slots=2, reported=ReportedState.BUSY))
    seam.dispatch.agent_changed(agent("c", "cpu", slots=2, reported=ReportedState.IDLE))
    placed = seam.commit([ready("t3", "cpu"), ready("t4", "cpu"), ready("t5", "cpu")])
    assert [a for _, a in placed] == ["a", "b", "c"]


async def test_changing_capabilities_while_idle_keeps_the_agents_place(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("old", "cpu"), ())
    seam.dispatch.agent_online(agent("new", "cpu", "gpu"), ())
    seam.dispatch.agent_changed(agent("old", "cpu", "gpu"))  # re-registered, gains "gpu"
    assert seam.commit([ready("g", "gpu")]) == [("g", "old")]


async def test_a_free_agent_is_told_by_capability_and_labels(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("w", "cpu", labels={"zone": "eu"}), ())
    assert seam.dispatch.has_free_agent("cpu", (("zone", "eu"),))
    assert seam.dispatch.has_free_agent("", ())
    assert not seam.dispatch.has_free_agent("gpu", ())
    assert not seam.dispatch.has_free_agent("cpu", (("zone", "us"),))
    seam.commit([ready("t", "cpu")])
    assert not seam.dispatch.has_free_agent("cpu", ())


# Reservations before a commit ----------------------------------------------------------------


async def test_a_write_places_what_it_makes_ready_on_the_slots_it_frees(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("w"), ["done"])
    assert seam.commit([ready("older")]) == []
    # A write completes "done" (freeing w) and queues "next"; the older task goes first.
    pairs, _ = seam.dispatch.reserve_for_commit([ready("next")], [("w", "done")])
    assert [(t.task_id, a) for t, a in pairs] == [("older", "w")]
    # Nothing else moved before the commit: "next" is not queued yet, w holds "done" still.
    assert seam.dispatch.queued == 0
    assert seam.commit() == []
    # The commit's effects arrive: w's slot for "done" frees, "older" is confirmed.
    seam.dispatch.release("w", "done")
    seam.dispatch.enqueue([ready("next")])
    seam.dispatch.assigned("w", "older")
    assert seam.commit() == []
    assert seam.commit(released=[("w", "older")]) == [("next", "w")]


async def test_a_reserved_task_is_not_matched_again_nor_queued_by_its_commit(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("a"), ())
    seam.dispatch.agent_online(agent("b"), ())
    pairs, _ = seam.dispatch.reserve_for_commit([ready("t")], [])
    assert [(t.task_id, a) for t, a in pairs] == [("t", "a")]
    assert seam.commit() == []  # b is free, but "t" is taken
    seam.dispatch.enqueue([ready("t")])  # the write's own effects, applied after its commit
    seam.dispatch.assigned("a", "t")
    assert seam.dispatch.queued == 0
    assert seam.commit() == []
    # Its reservation ended with the assignment: a failed attempt's retry is placed again.
    assert seam.commit([ready("t")], [("a", "t")]) == [("t", "b")]


async def test_a_task_whose_agent_became_unfit_in_its_commit_waits_again(seam: Seam) -> None:
    """A write both queues a task and takes its agent out (it reports ERROR, or is quarantined,
    in the same transaction): the match is not written, and the task, queued by that commit,
    must wait again for another agent, not be forgotten."""
    seam.dispatch.agent_online(agent("leaving"), ())
    pairs, _ = seam.dispatch.reserve_for_commit([ready("t")], [])
    assert [(t.task_id, a) for t, a in pairs] == [("t", "leaving")]
    seam.dispatch.enqueue([ready("t")])  # the write's own effects: "t" is reserved
    seam.dispatch.agent_changed(agent("leaving", reported=ReportedState.ERROR))
    seam.dispatch.not_taken("leaving", pairs[0][0])
    assert seam.dispatch.queued == 1
    seam.dispatch.agent_online(agent("other"), ())
    assert seam.commit() == [("t", "other")]


async def test_a_task_not_taken_keeps_its_place_in_the_ready_order(seam: Seam) -> None:
    seam.dispatch.enqueue([ready("first"), ready("second")])
    seam.dispatch.agent_online(agent("w"), ())
    pairs, _ = seam.dispatch.reserve_for_commit([], [])
    assert [t.task_id for t, _ in pairs] == ["first"]
    seam.dispatch.not_taken("w", pairs[0][0])
    assert seam.commit() == [("first", "w")]


async def test_the_undo_of_a_write_that_failed_gives_everything_back(seam: Seam) -> None:
    seam.dispatch.enqueue([ready("old")])
    seam.dispatch.agent_online(agent("w", slots=2), ())
    pairs, undo = seam.dispatch.reserve_for_commit([ready("new")], [])
    assert sorted(t.task_id for t, _ in pairs) == ["new", "old"]
    undo()
    # "old" is queued as it was, "new" never was (its write did not commit); w is free again.
    assert seam.commit() == [("old", "w")]
    assert seam.dispatch.queued == 0


async def test_a_task_given_back_keeps_its_place_in_the_ready_order(seam: Seam) -> None:
    seam.dispatch.enqueue([ready("first"), ready("second")])
    seam.dispatch.agent_online(agent("w"), ())
    pairs, undo = seam.dispatch.reserve_for_commit([], [])
    assert [t.task_id for t, _ in pairs] == ["first"]
    seam.dispatch.enqueue([ready("third")])  # another write committed meanwhile
    undo()
    assert seam.commit() == [("first", "w")]
    assert seam.commit(released=[("w", "first")]) == [("second", "w")]


async def test_an_assignment_that_found_its_task_gone_frees_the_slot(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("w"), ())
    [(task, agent_id)], _ = seam.dispatch.reserve_for_commit([ready("t")], [])
    seam.dispatch.release(agent_id, task.task_id)  # the commit's word: the task was gone
    assert seam.commit([ready("u")]) == [("u", "w")]
    # Its reservation ended too: ready again later (a retry), the task is placed again.
    assert seam.commit([ready("t")], [("w", "u")]) == [("t", "w")]


# Retry times and the loop ----------------------------------------------------------------


async def test_a_retry_waits_for_its_time_then_the_loop_takes_it(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("w"), ())
    later = T0 + timedelta(seconds=5)
    assert seam.commit([ready("t", not_before=later)]) == []
    assert seam.dispatch.queued == 1
    assert seam.commit() == []
    seam.clock.advance(later - T0)
    seam.start_loop()
    assert await seam.loop_assigns(1) == [("t", "w")]


async def test_a_dequeued_retry_never_comes_back(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("w"), ())
    assert seam.commit([ready("retry", not_before=T0 + timedelta(seconds=1))]) == []
    seam.dispatch.dequeue(["retry"])
    assert seam.dispatch.queued == 0
    seam.clock.advance(timedelta(seconds=5))
    seam.start_loop()
    seam.dispatch.enqueue([ready("next")])
    assert await seam.loop_assigns(1) == [("next", "w")]
    # Had the retry come back, it would be ahead of "last" now that w is free again.
    seam.dispatch.release("w", "next")
    seam.dispatch.enqueue([ready("last")])
    assert await seam.loop_assigns(1) == [("last", "w")]


async def test_the_loop_takes_what_no_write_placed_once_an_agent_frees_up(seam: Seam) -> None:
    seam.dispatch.agent_online(agent("w"), ["done"])
    seam.start_loop()
    assert seam.commit([ready("older")]) == []  # w is busy: it waits
    # A write completes "done" and gives w its next task itself; "queued" waits.
    assert seam.commit([ready("queued")], [("w", "done")]) == [("older", "w")]
    # w finishes "older" through a write that places nothing: the loop gives it "queued".
    seam.dispatch.release("w", "older")
    assert await seam.loop_assigns(1) == [("queued", "w")]


async def test_what_an_agent_holds_as_of_a_commit_frees_the_rest(seam: Seam) -> None:
    """Another replica's word that a hold ended was lost: rereading the agent's holds frees the
    slot, and a task reserved for the agent by a write yet to commit keeps its slot."""
    seam.dispatch.agent_online(agent("w", slots=3), ["gone", "kept"])
    [(reserved, _)], _ = seam.dispatch.reserve_for_commit([ready("reserved")], [])
    seam.dispatch.holding("w", ["kept"])  # "gone" ended; "reserved" is not committed yet
    assert seam.commit([ready("next"), ready("after")]) == [("next", "w")]
    seam.dispatch.assigned("w", reserved.task_id)
    seam.dispatch.holding("w", ["kept", "reserved", "next"])
    assert seam.commit() == []
    seam.dispatch.holding("w", ["next"])
    assert seam.commit() == [("after", "w")]
