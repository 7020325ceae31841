"""The clocks and a loop's pauses: a virtual clock's waits end exactly when it is advanced past
them, or when their event is set; the system clock waits as asyncio does."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from opscore.domain.clock import SystemClock, VirtualClock
from opscore.domain.idle import Pauses

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def test_a_virtual_wait_ends_when_the_clock_reaches_its_time() -> None:
    clock = VirtualClock(T0)
    waiting = asyncio.create_task(clock.wait(asyncio.Event(), T0 + timedelta(seconds=10)))
    await asyncio.sleep(0)
    clock.advance(timedelta(seconds=10) - timedelta(microseconds=1))
    await asyncio.sleep(0)
    assert not waiting.done()
    clock.advance(timedelta(microseconds=1))
    await asyncio.wait_for(waiting, timeout=5)
    assert clock.now() == T0 + timedelta(seconds=10)
    assert clock.monotonic() == 10.0


async def test_a_virtual_wait_ends_when_its_event_is_set_and_leaves_the_event_set() -> None:
    clock = VirtualClock(T0)
    event = asyncio.Event()
    waiting = asyncio.create_task(clock.wait(event, T0 + timedelta(hours=1)))
    await asyncio.sleep(0)
    event.set()
    await asyncio.wait_for(waiting, timeout=5)
    assert event.is_set()
    assert clock.now() == T0
    # The wait's timer is gone: advancing past it wakes nothing and fails nothing.
    clock.advance(timedelta(hours=2))


async def test_a_virtual_wait_without_a_time_waits_for_its_event_alone() -> None:
    clock = VirtualClock(T0)
    event = asyncio.Event()
    waiting = asyncio.create_task(clock.wait(event, None))
    clock.advance(timedelta(days=365))
    await asyncio.sleep(0)
    assert not waiting.done()
    event.set()
    await asyncio.wait_for(waiting, timeout=5)


async def test_waits_already_due_return_at_the_next_turn() -> None:
    clock = VirtualClock(T0)
    await asyncio.wait_for(clock.wait(asyncio.Event(), T0), timeout=5)
    await asyncio.wait_for(clock.sleep(0), timeout=5)


async def test_virtual_sleeps_end_in_the_order_of_their_times() -> None:
    clock = VirtualClock(T0)
    ended: list[float] = []

    async def sleep(seconds: float) -> None:
        await clock.sleep(seconds)
        ended.append(seconds)

    sleepers = [asyncio.create_task(sleep(seconds)) for seconds in (3.0, 1.0, 2.0)]
    await asyncio.sleep(0)
    clock.advance(timedelta(seconds=2))
    await asyncio.sleep(0)
    assert ended == [1.0, 2.0]
    sleepers[0].cancel()  # a cancelled sleep leaves nothing behind for the clock
    clock.advance(timedelta(seconds=5))
    await asyncio.gather(*sleepers, return_exceptions=True)
    assert ended == [1.0, 2.0]


def test_a_virtual_clock_does_not_go_back() -> None:
    with pytest.raises(ValueError, match="does not go back"):
        VirtualClock(T0).advance(timedelta(seconds=-1))


async def test_the_system_clock_waits_for_the_event_or_the_time() -> None:
    clock = SystemClock()
    assert clock.now().tzinfo is UTC
    assert clock.monotonic() <= clock.monotonic()
    event = asyncio.Event()
    event.set()
    await asyncio.wait_for(clock.wait(event, None), timeout=5)
    await asyncio.wait_for(clock.wait(asyncio.Event(), clock.now()), timeout=5)
    await asyncio.wait_for(clock.sleep(0), timeout=5)


async def test_a_waiter_for_a_pause_goes_on_at_the_next_one() -> None:
    pauses = Pauses()
    pauses.pause()  # paused already: a waiter wants the next pause, after the loop goes on
    waiter = asyncio.create_task(pauses.next_pause())
    other = asyncio.create_task(pauses.next_pause())
    await asyncio.sleep(0)
    assert not waiter.done()
    pauses.resume()
    assert not pauses.paused
    other.cancel()  # one waiter giving up does not cancel the pause for the others
    pauses.pause()
    await asyncio.wait_for(waiter, timeout=5)
    assert pauses.paused
