"""When a failed task is tried again.

After attempt `n` fails and may be retried (the agent said `retryable`, the lease ran out, or
the agent was lost) while attempts remain, the task is queued again no sooner than

    delay(n) = U(0.5, 1.0) x min(initial_backoff x backoff_multiplier^(n-1), max_backoff)

after the failure, where U is drawn uniformly at random ("equal jitter"): retries of many tasks
that failed together spread out instead of returning as a herd, and no retry ever comes back
sooner than half its backoff. The time is persisted with the task, so a restart keeps it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

from opscore.domain.models import RetryPolicy


@dataclass(frozen=True, slots=True)
class ResolvedRetryPolicy:
    """A retry policy with the server's defaults filled in."""

    max_attempts: int = 3
    initial_backoff: timedelta = timedelta(seconds=1)
    backoff_multiplier: float = 2.0
    max_backoff: timedelta = timedelta(seconds=60)

    def resolve(self, policy: RetryPolicy | None) -> ResolvedRetryPolicy:
        """`policy` with every unset field taken from these defaults."""
        if policy is None:
            return self
        return ResolvedRetryPolicy(
            max_attempts=policy.max_attempts or self.max_attempts,
            initial_backoff=(
                self.initial_backoff if policy.initial_backoff is None else policy.initial_backoff
            ),
            backoff_multiplier=policy.backoff_multiplier or self.backoff_multiplier,
            max_backoff=self.max_backoff if policy.max_backoff is None else policy.max_backoff,
        )

    def may_retry(self, failed_attempt: int) -> bool:
        """Whether another attempt follows attempt number `failed_attempt` (counted from 1)."""
        return failed_attempt < self.max_attempts

    def backoff(self, failed_attempt: int) -> timedelta:
        """The ceiling of the delay after attempt `failed_attempt`, before jitter."""
        seconds = self.initial_backoff.total_seconds()
        try:
            grown = seconds * self.backoff_multiplier ** (failed_attempt - 1)
        except OverflowError:
            grown = float("inf")
        return timedelta(seconds=min(grown, self.max_backoff.total_seconds()))

    def delay(self, failed_attempt: int, rng: random.Random) -> timedelta:
        """The delay before the next attempt: the backoff with equal jitter (see module)."""
        return self.backoff(failed_attempt) * rng.uniform(0.5, 1.0)
