"""Limits no single client can exhaust: a rate per caller, and a number of calls at once.

A caller is whoever the server identifies a call as coming from (a token's name, an agent, a
certificate's subject, a host); this module only sees the string.

`RateLimiter` gives each caller a token bucket of `Rate.burst` tokens, refilled at
`Rate.per_second`: a call takes a token, and a caller with none is told how long until one comes
back. So a caller idle long enough may make `burst` calls at once, and over any window of `t`
seconds no caller is admitted more than `burst + per_second x t` calls. A new caller starts with
a full bucket.

The buckets are kept as a generic cell rate algorithm: each caller's state is one number, the
time at which its bucket will be full again (its "theoretical arrival time"). Each call moves it
on by one token's worth of time (`1 / per_second`, rounded up to a nanosecond, so a rate is
never exceeded by rounding), from now or from where it was if that is later; the call is admitted
while that time is at most `burst` tokens' worth ahead of now. Integer nanoseconds keep it exact:
a caller told to wait is admitted when it retries after exactly that wait.

Memory is bounded: at most `max_callers` buckets are kept. A full bucket says nothing a missing
one does not (a caller without one starts full), so full ones are dropped first when room is
needed. When every bucket is in use, the least recently used is dropped, and that caller starts
full again: it is forgiven what it owed, at most one burst. That takes more than `max_callers`
callers busy at once; a client that has that many identities gets a burst for each new one
anyway, so the bound costs nothing a limit per caller could have kept.

`Slots` bounds how many calls run at once, across callers.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

from opscore.domain.clock import Clock

NANOSECONDS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Rate:
    """`per_second` calls a second on average, `burst` of them at once; `per_second` 0 admits
    every call."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not math.isfinite(self.per_second) or self.per_second < 0:
            raise ValueError(f"a rate is a finite number of calls a second >= 0: {self}")
        if self.burst < 1:
            raise ValueError(f"a burst admits at least one call: {self}")

    @property
    def unlimited(self) -> bool:
        """Whether every call is admitted."""
        return self.per_second == 0


class RateLimiter:
    """A token bucket per caller (see the module): `take` admits a call or says how long to
    wait."""

    def __init__(self, rate: Rate, clock: Clock, *, max_callers: int = 10_000) -> None:
        if max_callers < 1:
            raise ValueError("a rate limiter keeps at least one caller")
        self._rate = rate
        self._clock = clock
        self._max_callers = max_callers
        self._interval = 0 if rate.unlimited else math.ceil(NANOSECONDS / rate.per_second)
        """Nanoseconds one token takes to come back."""
        self._ahead = self._interval * rate.burst
        """How far ahead of now a caller's full time may be after an admitted call."""
        self._full_at: OrderedDict[str, int] = OrderedDict()
        """Each caller's theoretical arrival time (nanoseconds on the clock's monotonic scale):
        when its bucket is full again. Least recently used first."""
        self._filling: list[tuple[int, str]] = []
        """A heap of (time, caller) to find full buckets without a scan: each kept caller has an
        entry at or before its full time (full times only move later), and entries of callers
        since dropped or moved on are put right as they come out."""

    def take(self, caller: str) -> timedelta | None:
        """None if `caller` may make a call now (and its token is taken); otherwise how long
        until it may, rounded up to a microsecond."""
        if self._rate.unlimited:
            return None
        now = round(self._clock.monotonic() * NANOSECONDS)
        full_at = self._full_at.get(caller)
        if full_at is None:
            # A new caller has a full bucket, and a burst is at least one call.
            self._keep(caller, now + self._interval, now)
            return None
        self._full_at.move_to_end(caller)
        after = max(full_at, now) + self._interval
        wait = after - now - self._ahead
        if wait > 0:
            return timedelta(microseconds=-(-wait // 1000))
        self._full_at[caller] = after
        return None

    def __len__(self) -> int:
        """How many callers have a bucket kept."""
        return len(self._full_at)

    def _keep(self, caller: str, full_at: int, now: int) -> None:
        if len(self._full_at) >= self._max_callers:
            self._drop_one(now)
        self._full_at[caller] = full_at
        heapq.heappush(self._filling, (full_at, caller))
        if len(self._filling) > 2 * self._max_callers:
            # Entries of dropped callers pile up when the least recently used are dropped.
            self._filling = [(time, kept) for kept, time in self._full_at.items()]
            heapq.heapify(self._filling)

    def _drop_one(self, now: int) -> None:
        """Drop a full bucket if there is one, else the least recently used."""
        filling = self._filling
        while filling and filling[0][0] <= now:
            _, caller = heapq.heappop(filling)
            full_at = self._full_at.get(caller)
            if full_at is None:
                continue
            if full_at <= now:
                del self._full_at[caller]
                return
            heapq.heappush(filling, (full_at, caller))
        self._full_at.popitem(last=False)


class Slots:
    """At most `limit` holders at once (0: no limit): `try_acquire` a slot, `release` it."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"a limit of slots is >= 0: {limit}")
        self._limit = limit
        self._in_use = 0

    @property
    def in_use(self) -> int:
        """How many slots are held."""
        return self._in_use

    def try_acquire(self) -> bool:
        """Take a slot if one is free; whether one was taken."""
        if self._limit and self._in_use >= self._limit:
            return False
        self._in_use += 1
        return True

    def release(self) -> None:
        """Give back a slot taken by `try_acquire`."""
        if self._in_use == 0:
            raise ValueError("released a slot that was not acquired")
        self._in_use -= 1
