"""Time as the engine and the dispatcher see it: the current time, a monotonic reading, and
waiting for an event or a time, whichever comes first.

The server runs on `SystemClock`. Tests of leases, grace periods and backoffs run on a
`VirtualClock`, which moves only when told to: a lease of five minutes ends the moment a test
advances the clock past it, and nothing waits in real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the engine and the dispatcher need of time."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going back: for ordering waits."""

    async def wait(self, event: asyncio.Event, until: datetime | None) -> None:
        """Return once `event` is set or `until` has come (None: no time limit), whichever is
        first. The event is left as it is."""

    async def sleep(self, seconds: float) -> None:
        """Return after `seconds`."""


class SystemClock:
    """The clock of the machine."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """`time.monotonic()`."""
        return time.monotonic()

    async def wait(self, event: asyncio.Event, until: datetime | None) -> None:
        """Return once `event` is set or `until` has come, whichever is first."""
        timeout = None if until is None else (until - self.now()).total_seconds()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the wait ends, and a loop waiting here must stop when the server stops.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    async def sleep(self, seconds: float) -> None:
        """`asyncio.sleep(seconds)`."""
        await asyncio.sleep(seconds)


class VirtualClock:
    """A clock that stands still until `advance` moves it: waits end when the clock passes
    their time, never in real time, so a test decides exactly when each timer fires."""

    def __init__(self, start: datetime) -> None:
        self._start = start
        self._now = start
        self._timers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        """The pending waits, earliest first: each ends when its future is resolved."""
        self._sequence = itertools.count()

    def now(self) -> datetime:
        """The clock's time."""
        return self._now

    def monotonic(self) -> float:
        """Seconds the clock has been advanced since it started."""
        return (self._now - self._start).total_seconds()

    def advance(self, by: timedelta) -> None:
        """Move the clock `by` forward, and end every wait whose time has come; those waiting
        go on at the loop's next turns."""
        if by < timedelta(0):
            raise ValueError("a clock does not go back")
        self._now += by
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.done():
                timer.set_result(None)

    async def wait(self, event: asyncio.Event, until: datetime | None) -> None:
        """Return once `event` is set or the clock has reached `until`, whichever is first."""
        if until is None:
            await event.wait()
            return
        if event.is_set() or until <= self._now:
            await asyncio.sleep(0)  # a turn of the loop, as a timeout already due takes
            return
        timer = self._timer(until)
        woken = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((woken, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()

    async def sleep(self, seconds: float) -> None:
        """Return once the clock has moved `seconds` on."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        await self._timer(self._now + timedelta(seconds=seconds))

    def _timer(self, until: datetime) -> asyncio.Future[None]:
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (until, next(self._sequence), timer))
        return timer
