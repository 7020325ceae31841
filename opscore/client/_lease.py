"""The lease on one attempt a worker holds, kept before its deadline.

The server gives each assignment a `deadline`; an attempt still held when it passes fails as
`timed out`. A handler that may outlive it has its lease extended: when half of the lease is
left, by the lease's whole length again (the length being what was left of it when the
assignment arrived), so a handler of any duration keeps its attempt, and one that hangs is
the handler's own business (an `asyncio.timeout` of its own).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from opscore.client._backoff import Backoff
from opscore.client._errors import Unreachable
from opscore.domain.clock import Clock

log = logging.getLogger("opscore.client")

SHORTEST = timedelta(seconds=1)
"""The least a lease is extended by, whatever was left of it on arrival."""

Extend = Callable[[timedelta], Awaitable[datetime]]
"""Asks the server for `extend_by` more from now; the new deadline. Raises `AttemptLost` when
the attempt is no longer the worker's, `Unreachable` when no server answered."""


def renewal_due(deadline: datetime, length: timedelta) -> datetime:
    """When a lease ending at `deadline`, `length` long, is extended: half of it left."""
    return deadline - length / 2


class Lease:
    """The deadline of one attempt, moved by `extend` (a handler's `ctx.extend`) and, while
    `keep` runs, before it passes. Times are the server's: `skew` gives the server's clock
    from the worker's (server time minus local time, as the heartbeats measure it)."""

    def __init__(
        self,
        deadline: datetime,
        extend: Extend,
        clock: Clock,
        skew: Callable[[], timedelta],
        backoff: Backoff,
    ) -> None:
        self.deadline = deadline
        """When the lease ends, as the server last said."""
        self._extend = extend
        self._clock = clock
        self._skew = skew
        self._backoff = backoff
        self.length = max(deadline - self.server_now(), SHORTEST)
        """What each automatic extension asks for."""
        self._moved = asyncio.Event()

    def server_now(self) -> datetime:
        """The server's time now, as far as the worker can tell."""
        return self._clock.now() + self._skew()

    async def extend(self, by: timedelta) -> datetime:
        """Move the deadline to `by` from now (never earlier than it is); the new deadline."""
        self.moved_to(await self._extend(max(by, SHORTEST)))
        return self.deadline

    def moved_to(self, deadline: datetime) -> None:
        """The server moved the deadline to `deadline` (an extension, or an assignment sent
        again with a later one)."""
        if deadline > self.deadline:
            self.deadline = deadline
            self._moved.set()

    async def keep(self) -> None:
        """Extend the lease whenever half of it is left, until cancelled. Raises `AttemptLost`
        once the server says the attempt is no longer the worker's. An unanswered extension is
        tried again after a backoff, past the deadline too: the server's answer then says whether
        the attempt is still the worker's."""
        failures = 0
        while True:
            due = renewal_due(self.deadline, self.length) - self._skew()
            self._moved.clear()
            await self._clock.wait(self._moved, due)
            if self._moved.is_set():
                continue  # moved by someone else: the next extension is due later
            try:
                await self.extend(self.length)
            except Unreachable as error:
                failures += 1
                wait = max(self._backoff.delay(failures), error.retry_after)
                log.warning(
                    "lease extension unanswered",
                    extra={"deadline": self.deadline.isoformat(), "error": str(error)},
                )
                await self._clock.sleep(wait)
                continue
            failures = 0
