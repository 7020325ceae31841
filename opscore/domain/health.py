"""Whether the server's storage works, judged from the outcome of every transaction.

`Database.run` tells `StorageHealth` how each transaction went. A few failures in a row (reads
and writes counted apart: a full or read-only disk still serves reads) make storage unhealthy,
which the server publishes as NOT_SERVING so that load balancers route elsewhere; the first
success of the failing kind makes it healthy again. While it is unhealthy and nothing else
touches the database, `watch` probes it about once a second, so recovery is found by itself.

The log tells an outage once, not once per failed call: one WARNING when storage turns
unhealthy, naming the cause; while it lasts, at most one WARNING per `REPORT_EVERY` with the
count of transactions that failed since; one INFO when every kind of transaction succeeds again,
with the outage's length and count (also after a short run of failures that never turned
storage unhealthy, so that no failed call goes unexplained).

A success costs one attribute check: this sits on every transaction of the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opscore.domain.errors import StorageFault

log = logging.getLogger("opscore.storage")

FAILURES_TO_UNHEALTHY = 3
"""Failed transactions of one kind in a row that make storage unhealthy, by default."""

REPORT_EVERY = 10.0
"""Seconds between two WARNINGs about one outage."""

PROBE_EVERY = 1.0
"""Seconds between two probes of unhealthy storage (never more often)."""


@dataclass(slots=True)
class _Outage:
    """A run of failed transactions, from the first failure to the success that ends it."""

    started: float
    cause: str
    reason: str
    failed: int = 0
    reported_at: float = 0.0
    reported: int = 0
    """`failed` when the last WARNING was written."""


class StorageHealth:
    """Healthy until `threshold` transactions of one kind fail in a row (see the module
    docstring); `clock` is monotonic seconds."""

    def __init__(
        self,
        threshold: int = FAILURES_TO_UNHEALTHY,
        *,
        clock: Callable[[], float] = time.monotonic,
        report_every: float = REPORT_EVERY,
    ) -> None:
        self._threshold = threshold
        self._clock = clock
        self._report_every = report_every
        self._streaks = [0, 0]
        """Failed reads in a row, failed writes in a row."""
        self._failing = False
        """Whether either streak is open: all that a success looks at."""
        self._healthy = True
        self._outage: _Outage | None = None
        self._changed = asyncio.Event()
        self._recovered: list[Callable[[], None]] = []
        self._lost: list[Callable[[StorageFault], None]] = []

    @property
    def healthy(self) -> bool:
        """Whether storage works as far as the last transactions tell."""
        return self._healthy

    def on_recovery(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever an outage ends (every kind of transaction succeeds again)."""
        self._recovered.append(callback)

    def on_lost(self, callback: Callable[[StorageFault], None]) -> None:
        """Call `callback` with each failure that retrying cannot mend (`StorageFault.lost`)."""
        self._lost.append(callback)

    def succeeded(self, write: bool) -> None:
        """A transaction committed (or a read finished)."""
        if self._failing:
            self._success(write)

    def failed(self, fault: StorageFault, write: bool) -> None:
        """A transaction failed for want of storage (never for a domain error or a bug)."""
        now = self._clock()
        outage = self._outage
        if outage is None:
            outage = self._outage = _Outage(now, fault.cause, fault.reason)
        outage.failed += 1
        outage.cause, outage.reason = fault.cause, fault.reason
        self._failing = True
        self._streaks[write] += 1
        if fault.lost:
            for lost in self._lost:
                lost(fault)
        if self._healthy:
            if self._streaks[write] >= self._threshold:
                self._healthy = False
                self._changed.set()
                self._report(outage, now, "storage unavailable: health NOT_SERVING")
        elif now - outage.reported_at >= self._report_every:
            self._report(outage, now, "storage still unavailable")

    def _report(self, outage: _Outage, now: float, event: str) -> None:
        log.warning(
            event,
            extra={
                "reason": outage.reason,
                "cause": outage.cause,
                "failed_transactions": outage.failed - outage.reported,
                "outage_seconds": round(now - outage.started, 3),
            },
        )
        outage.reported_at = now
        outage.reported = outage.failed

    def _success(self, write: bool) -> None:
        self._streaks[write] = 0
        if not self._healthy and max(self._streaks) < self._threshold:
            self._healthy = True
            self._changed.set()
        if any(self._streaks):
            return  # the other kind of transaction still fails
        self._failing = False
        outage, self._outage = self._outage, None
        assert outage is not None  # a streak was open
        log.info(
            "storage recovered",
            extra={
                "reason": outage.reason,
                "cause": outage.cause,
                "failed_transactions": outage.failed,
                "outage_seconds": round(self._clock() - outage.started, 3),
            },
        )
        for recovered in self._recovered:
            recovered()

    async def watch(
        self,
        publish: Callable[[bool], Awaitable[None]],
        probe: Callable[[], Awaitable[object]],
        every: float = PROBE_EVERY,
    ) -> None:
        """Until cancelled: `publish` each change of health, and while storage is unhealthy,
        `probe` it once `every` seconds have passed without a change (a probe's outcome reaches
        this tracker through `Database.run`, like any transaction's)."""
        published = True
        while True:
            self._changed.clear()
            if self._healthy != published:
                published = self._healthy
                await publish(published)
                continue
            if published:
                await self._changed.wait()
                continue
            try:
                async with asyncio.timeout(every):
                    await self._changed.wait()
            except TimeoutError:
                with contextlib.suppress(StorageFault):  # counted as a failure already
                    await probe()


@dataclass(slots=True)
class Backoff:
    """The waits of a background loop between attempts while storage fails: `first` seconds,
    doubling each time, at most `cap`; back to `first` once an attempt succeeds."""

    first: float = 0.05
    cap: float = 2.0
    _next: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next = self.first

    def next_delay(self) -> float:
        """The wait before the next attempt, after one more failure."""
        delay = self._next
        self._next = min(self.cap, delay * 2)
        return delay

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits `first` again."""
        self._next = self.first
