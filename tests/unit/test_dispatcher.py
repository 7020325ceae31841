"""The dispatcher's matching, without a server: order, eligibility, slots, and its cost."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
from datetime import UTC, datetime, timedelta

from opscore.domain.dispatcher import Dispatcher
from opscore.domain.errors import StorageUnavailable
from opscore.domain.models import AgentProfile, ReadyTask, ReportedState


async def _never(_: object) -> None:
    raise AssertionError("match() is called directly in these tests")


T0 = datetime(2026, 1, 1, tzinfo=UTC)


class FakeNow:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.value = T0

    def __call__(self) -> datetime:
        return self.value


def make(now: FakeNow | None = None) -> Dispatcher:
    ticks = itertools.count()
    return Dispatcher(_never, clock=lambda: float(next(ticks)), now=now or FakeNow())


def agent(
    agent_id: str,
    *capabilities: str,
    labels: dict[str, str] | None = None,
    slots: int = 1,
    reported: ReportedState = ReportedState.NONE,
) -> AgentProfile:
    return AgentProfile(agent_id, frozenset(capabilities), labels or {}, slots, reported)


def ready(
    task_id: str,
    capability: str = "",
    labels: dict[str, str] | None = None,
    pinned: str = "",
    not_before: datetime | None = None,
) -> ReadyTask:
    return ReadyTask(
        task_id, "run", capability, tuple(sorted((labels or {}).items())), pinned, not_before
    )


def test_tasks_go_out_in_ready_order_to_the_longest_waiting_agent() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("first"), ())
    dispatcher.agent_online(agent("second"), ())
    dispatcher.enqueue([ready("t1"), ready("t2"), ready("t3")])
    assert [(t.task_id, a) for t, a in dispatcher.match()] == [("t1", "first"), ("t2", "second")]
    assert dispatcher.queued == 1
    dispatcher.release("first", "t1")
    assert [(t.task_id, a) for t, a in dispatcher.match()] == [("t3", "first")]


def test_capability_labels_and_pins_are_respected() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("cpu", "cpu", labels={"zone": "eu"}), ())
    dispatcher.agent_online(agent("gpu", "gpu", labels={"zone": "us"}), ())
    dispatcher.enqueue(
        [
            ready("needs-gpu-eu", "gpu", {"zone": "eu"}),
            ready("pinned-cpu", pinned="cpu"),
            ready("any-us", labels={"zone": "us"}),
        ]
    )
    assert sorted((t.task_id, a) for t, a in dispatcher.match()) == [
        ("any-us", "gpu"),
        ("pinned-cpu", "cpu"),
    ]
    assert dispatcher.queued == 1


def test_reported_state_and_slots_gate_dispatch() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("w", slots=2, reported=ReportedState.ERROR), ())
    dispatcher.enqueue([ready("t1"), ready("t2"), ready("t3")])
    assert dispatcher.match() == []
    dispatcher.agent_changed(agent("w", slots=2, reported=ReportedState.IDLE))
    assert [t.task_id for t, _ in dispatcher.match()] == ["t1", "t2"]
    dispatcher.release("w", "t1")
    dispatcher.release("w", "t1")  # idempotent: one slot, not two
    assert [t.task_id for t, _ in dispatcher.match()] == ["t3"]
    assert dispatcher.match() == []


def test_a_backlogged_agent_takes_nothing_until_its_stream_drains() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("silent", slots=10), (), backlogged=True)
    dispatcher.agent_online(agent("reader", slots=10), ())
    dispatcher.enqueue([ready("t1"), ready("t2")])
    assert {a for _, a in dispatcher.match()} == {"reader"}
    dispatcher.agent_backlogged("reader", True)
    dispatcher.enqueue([ready("t3")])
    assert dispatcher.match() == []
    dispatcher.agent_backlogged("silent", False)
    assert [(t.task_id, a) for t, a in dispatcher.match()] == [("t3", "silent")]


def test_dequeued_and_offline_are_skipped() -> None:
    dispatcher = make()
    dispatcher.enqueue([ready("gone"), ready("kept")])
    dispatcher.dequeue(["gone"])
    dispatcher.agent_online(agent("w"), ())
    dispatcher.agent_offline("w")
    assert dispatcher.match() == []
    dispatcher.agent_online(agent("w"), ["held-before"])
    assert dispatcher.match() == []
    dispatcher.release("w", "held-before")
    assert [t.task_id for t, _ in dispatcher.match()] == ["kept"]


def test_a_backlog_nobody_can_take_is_one_group() -> None:
    dispatcher = make()
    dispatcher.enqueue(ready(f"t{i}", "nobody-has-this") for i in range(10_000))
    dispatcher.agent_online(agent("w", "cpu"), ())
    dispatcher.enqueue([ready("mine", "cpu")])
    assert [t.task_id for t, _ in dispatcher.match()] == ["mine"]


def test_a_retry_waits_for_its_time_then_queues_behind_earlier_tasks() -> None:
    now = FakeNow()
    dispatcher = make(now)
    dispatcher.agent_online(agent("w", slots=5), ())
    dispatcher.enqueue([ready("retry", not_before=T0 + timedelta(seconds=2)), ready("first")])
    assert dispatcher.queued == 2
    assert [t.task_id for t, _ in dispatcher.match()] == ["first"]
    now.value = T0 + timedelta(seconds=1)
    dispatcher.enqueue([ready("second")])
    assert dispatcher._release_due() == 1.0  # seconds until the retry is due
    assert [t.task_id for t, _ in dispatcher.match()] == ["second"]
    now.value = T0 + timedelta(seconds=2)
    assert dispatcher._release_due() is None
    assert [t.task_id for t, _ in dispatcher.match()] == ["retry"]


def test_a_cancelled_retry_never_comes_back() -> None:
    now = FakeNow()
    dispatcher = make(now)
    dispatcher.agent_online(agent("w"), ())
    dispatcher.enqueue([ready("retry", not_before=T0 + timedelta(seconds=1))])
    dispatcher.dequeue(["retry"])
    assert dispatcher.queued == 0
    now.value = T0 + timedelta(seconds=5)
    assert dispatcher._release_due() is None
    assert dispatcher.match() == []


def test_the_longest_waiting_agent_of_the_capability_wins_after_any_history() -> None:
    dispatcher = make()
    for name in ("a", "b", "c"):
        dispatcher.agent_online(agent(name, "cpu", slots=2), ())
    dispatcher.enqueue([ready("t1", "cpu"), ready("t2", "cpu")])
    assert [a for _, a in dispatcher.match()] == ["a", "b"]
    dispatcher.release("a", "t1")  # a still had a free slot: it keeps waiting from t1's match
    dispatcher.agent_changed(agent("c", "cpu", slots=2, reported=ReportedState.BUSY))
    dispatcher.agent_changed(agent("c", "cpu", slots=2, reported=ReportedState.IDLE))
    dispatcher.enqueue([ready("t3", "cpu"), ready("t4", "cpu"), ready("t5", "cpu")])
    assert [a for _, a in dispatcher.match()] == ["a", "b", "c"]


def test_changing_capabilities_while_idle_keeps_the_agents_place() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("old", "cpu"), ())
    dispatcher.agent_online(agent("new", "cpu", "gpu"), ())
    dispatcher.agent_changed(agent("old", "cpu", "gpu"))  # re-registered, gains "gpu"
    dispatcher.enqueue([ready("g", "gpu")])
    assert [a for _, a in dispatcher.match()] == ["old"]


def test_a_task_reaches_the_one_agent_of_a_large_fleet_that_can_take_it() -> None:
    dispatcher = make()
    for index in range(5000):
        dispatcher.agent_online(agent(f"idle-{index}", "common", labels={"zone": "eu"}), ())
    dispatcher.agent_online(agent("special", "rare", labels={"zone": "us"}), ())
    dispatcher.agent_online(agent("rare-eu", "rare", labels={"zone": "eu"}), ())
    dispatcher.enqueue([ready("only-us", "rare", {"zone": "us"})])
    assert [a for _, a in dispatcher.match()] == ["special"]
    dispatcher.agent_offline("rare-eu")
    dispatcher.enqueue([ready("rare-any", "rare")])
    assert dispatcher.match() == []
    dispatcher.release("special", "only-us")
    assert [a for _, a in dispatcher.match()] == ["special"]


def test_a_write_places_what_it_makes_ready_on_the_slots_it_frees() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("w"), ["done"])
    dispatcher.enqueue([ready("older")])
    # A write completes "done" (freeing w) and queues "next"; the older task goes first.
    pairs, _ = dispatcher.reserve_for_commit([ready("next")], [("w", "done")])
    assert [(t.task_id, a) for t, a in pairs] == [("older", "w")]
    # Nothing else moved before the commit: "next" is not queued yet, w holds "done" still.
    assert dispatcher.match() == []
    assert dispatcher.queued == 0
    # The commit's effects arrive: w's slot for "done" frees, "older" is confirmed.
    dispatcher.enqueue([ready("next")])
    dispatcher.release("w", "done")
    dispatcher.assigned("w", "older")
    assert dispatcher.match() == []
    dispatcher.release("w", "older")
    assert [(t.task_id, a) for t, a in dispatcher.match()] == [("next", "w")]


def test_a_placed_task_is_not_queued_again_by_its_commit() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("a"), ())
    dispatcher.agent_online(agent("b"), ())
    pairs, _ = dispatcher.reserve_for_commit([ready("t")], [])
    assert [(t.task_id, a) for t, a in pairs] == [("t", "a")]
    dispatcher.enqueue([ready("t")])  # the write's own effects, applied after its commit
    assert dispatcher.match() == []
    dispatcher.assigned("a", "t")
    assert dispatcher.queued == 0


def test_a_placement_whose_write_fails_is_given_back() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("w", slots=2), ())
    dispatcher.enqueue([ready("old")])
    pairs, undo = dispatcher.reserve_for_commit([ready("new")], [])
    assert sorted(t.task_id for t, _ in pairs) == ["new", "old"]
    undo()
    # "old" is queued as it was, "new" never was (its write did not commit); w is free again.
    assert [(t.task_id, a) for t, a in dispatcher.match()] == [("old", "w")]
    assert dispatcher.queued == 0


def test_a_placement_given_back_keeps_its_place_in_the_queue() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("w"), ())
    dispatcher.enqueue([ready("first"), ready("second")])
    pairs, undo = dispatcher.reserve_for_commit([], [])
    assert [t.task_id for t, _ in pairs] == ["first"]
    dispatcher.enqueue([ready("third")])
    undo()
    assert [t.task_id for t, _ in dispatcher.match()] == ["first"]
    dispatcher.release("w", "first")
    assert [t.task_id for t, _ in dispatcher.match()] == ["second"]


def test_a_placement_the_database_refuses_frees_the_slot() -> None:
    dispatcher = make()
    dispatcher.agent_online(agent("w"), ())
    [(task, agent_id)], _ = dispatcher.reserve_for_commit([ready("t")], [])
    dispatcher.release(agent_id, task.task_id)  # the assignment found the task gone
    dispatcher.enqueue([ready("u")])
    assert [(t.task_id, a) for t, a in dispatcher.match()] == [("u", "w")]


def test_a_write_does_not_place_a_retry_before_its_time() -> None:
    now = FakeNow()
    dispatcher = make(now)
    dispatcher.agent_online(agent("w"), ())
    later = T0 + timedelta(seconds=5)
    pairs, _ = dispatcher.reserve_for_commit([ready("t", not_before=later)], [])
    assert pairs == []
    dispatcher.enqueue([ready("t", not_before=later)])
    assert dispatcher.match() == []
    now.value = later
    dispatcher._release_due()
    assert [(t.task_id, a) for t, a in dispatcher.match()] == [("t", "w")]


def test_a_deep_queue_is_out_of_the_garbage_collectors_sight() -> None:
    """Queued tasks are kept as plain tuples of strings, which the garbage collector stops
    tracking once it has seen them: a queue of 100,000 tasks made every full collection walk
    them (pauses of 24-72 ms) while they were dataclasses."""
    dispatcher = make()
    gc.collect()
    gc.collect()
    before = len(gc.get_objects())
    dispatcher.enqueue(ready(f"deep{index}", capability="nobody") for index in range(10_000))
    gc.collect()
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    assert dispatcher.queued == 10_000


async def test_the_loop_assigns_a_queued_task_once_an_agent_frees_up() -> None:
    """The loop is woken only when something can be matched: a task queued while every agent
    is busy waits, without a wake, until the release that frees an agent."""
    batches: list[list[tuple[str, str]]] = []
    assigned = asyncio.Event()

    async def assign(pairs: list[tuple[ReadyTask, str]]) -> None:
        batches.append([(task.task_id, agent_id) for task, agent_id in pairs])
        assigned.set()

    ticks = itertools.count()
    dispatcher = Dispatcher(assign, clock=lambda: float(next(ticks)), now=FakeNow())
    dispatcher.agent_online(agent("w"), ["done"])
    loop = asyncio.create_task(dispatcher.run())
    try:
        dispatcher.enqueue([ready("older")])  # w is busy: it waits
        # A write completed "done" and gave w its next task itself (see `reserve_for_commit`).
        pairs, _ = dispatcher.reserve_for_commit([ready("queued")], [("w", "done")])
        assert [(t.task_id, a) for t, a in pairs] == [("older", "w")]
        # Its commit: "queued" waits (nobody is free), "done" is released, "older" held.
        dispatcher.enqueue([ready("queued")])
        dispatcher.release("w", "done")
        dispatcher.assigned("w", "older")
        await asyncio.sleep(0.01)
        assert batches == []
        # w finishes "older" through a write that placed nothing: the release wakes the loop.
        dispatcher.release("w", "older")
        await asyncio.wait_for(assigned.wait(), timeout=5)
        assert batches == [[("queued", "w")]]
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_a_batch_storage_refuses_is_given_back_in_order_and_tried_again() -> None:
    """The loop's own assignments fail while storage does: its tasks return to their places,
    its agents' slots are freed, and it tries again (after a backoff) until storage takes it;
    a task queued meanwhile waits its turn."""
    attempts: list[list[tuple[str, str]]] = []
    taken = asyncio.Event()

    async def assign(pairs: list[tuple[ReadyTask, str]]) -> None:
        attempts.append([(task.task_id, agent_id) for task, agent_id in pairs])
        if len(attempts) < 3:
            raise StorageUnavailable("refused", timedelta(seconds=1))
        taken.set()

    ticks = itertools.count()
    dispatcher = Dispatcher(assign, clock=lambda: float(next(ticks)), now=FakeNow())
    loop = asyncio.create_task(dispatcher.run())
    try:
        dispatcher.enqueue([ready("t1"), ready("t2"), ready("t3")])
        dispatcher.agent_online(agent("w", slots=2), ())
        await asyncio.sleep(0)
        dispatcher.enqueue([ready("t4")])
        await asyncio.wait_for(taken.wait(), timeout=5)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert attempts == [[("t1", "w"), ("t2", "w")]] * 3
    assert dispatcher.queued == 2
