"""The single-process dispatcher beside the contract every `Dispatch` keeps
(`test_dispatch_contract.py`): what its matching costs, its timer, and its loop under a storage
outage."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from datetime import timedelta

from dispatching import T0, TickingClock, agent, ready

from opscore.domain.dispatcher import Dispatcher
from opscore.domain.errors import StorageUnavailable
from opscore.domain.models import ReadyTask


async def _never(_: object) -> None:
    raise AssertionError("match() is called directly in these tests")


def make(clock: TickingClock | None = None) -> Dispatcher:
    return Dispatcher(_never, clock=clock or TickingClock())


def test_a_backlog_nobody_can_take_is_one_group() -> None:
    dispatcher = make()
    dispatcher.enqueue(ready(f"t{i}", "nobody-has-this") for i in range(10_000))
    dispatcher.agent_online(agent("w", "cpu"), ())
    dispatcher.enqueue([ready("mine", "cpu")])
    assert [t.task_id for t, _ in dispatcher.match()] == ["mine"]


def test_a_retry_waits_for_its_time_then_queues_behind_earlier_tasks() -> None:
    clock = TickingClock()
    dispatcher = make(clock)
    dispatcher.agent_online(agent("w", slots=5), ())
    dispatcher.enqueue([ready("retry", not_before=T0 + timedelta(seconds=2)), ready("first")])
    assert dispatcher.queued == 2
    assert [t.task_id for t, _ in dispatcher.match()] == ["first"]
    clock.advance(timedelta(seconds=1))
    dispatcher.enqueue([ready("second")])
    assert dispatcher._release_due() == T0 + timedelta(seconds=2)  # when the retry is due
    assert [t.task_id for t, _ in dispatcher.match()] == ["second"]
    clock.advance(timedelta(seconds=1))
    assert dispatcher._release_due() is None
    assert [t.task_id for t, _ in dispatcher.match()] == ["retry"]


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


async def test_a_batch_storage_refuses_is_given_back_in_order_and_tried_again() -> None:
    """The loop's own assignments fail while storage does: its tasks return to their places,
    its agents' slots are freed, and it tries again (after a backoff) until storage takes it;
    a task queued meanwhile waits its turn."""
    attempts: list[list[tuple[str, str]]] = []
    tried = asyncio.Event()

    async def assign(pairs: list[tuple[ReadyTask, str]]) -> None:
        attempts.append([(task.task_id, agent_id) for task, agent_id in pairs])
        tried.set()
        if len(attempts) < 3:
            raise StorageUnavailable("refused", timedelta(seconds=1))

    clock = TickingClock()
    dispatcher = Dispatcher(assign, clock=clock)
    loop = asyncio.create_task(dispatcher.run())
    try:
        dispatcher.enqueue([ready("t1"), ready("t2"), ready("t3")])
        dispatcher.agent_online(agent("w", slots=2), ())
        await asyncio.wait_for(tried.wait(), timeout=5)
        dispatcher.enqueue([ready("t4")])
        for backoff in (0.05, 0.1):  # the loop's backoff (`health.Backoff`) after each refusal
            tried.clear()
            clock.advance(timedelta(seconds=backoff))
            await asyncio.wait_for(tried.wait(), timeout=5)
        await asyncio.wait_for(dispatcher.until_idle(), timeout=5)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert attempts == [[("t1", "w"), ("t2", "w")]] * 3
    assert dispatcher.queued == 2


def test_a_write_queueing_work_no_free_agent_takes_leaves_no_trace_in_the_heaps() -> None:
    """A run of many tasks that no free agent can take (a backlog) is not pushed into the
    queues for the match before its commit: nothing of it stays behind in their heaps."""
    dispatcher = make()
    dispatcher.agent_online(agent("w", "a"), ())
    pairs, _ = dispatcher.reserve_for_commit([ready(f"t{n}", "b") for n in range(1_000)], [])
    assert pairs == []
    assert sum(len(queue.heap) for queue in dispatcher._queues.values()) == 0
