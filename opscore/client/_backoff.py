"""How long a worker waits before it tries again: reconnecting, re-sending a result."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_MAX_EXPONENT = 64
"""Failures beyond this grow the wait no further (the maximum has long been reached)."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter, the formula of the server's retry policy.

    After the `n`-th failure in a row (1 for the first), the wait is drawn uniformly between
    half and all of `min(initial * multiplier ** (n - 1), maximum)` seconds: workers that lost the
    same server spread out as they come back, and none comes back sooner than half its wait.
    """

    initial: float = 0.1
    """Seconds of the first wait's upper bound."""
    multiplier: float = 2.0
    """Growth of the upper bound after each further failure."""
    maximum: float = 10.0
    """Largest upper bound, in seconds."""

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.multiplier < 1 or self.maximum < self.initial:
            raise ValueError("a backoff needs initial > 0, multiplier >= 1 and maximum >= initial")

    def ceiling(self, failures: int) -> float:
        """The upper bound of the wait after `failures` failures in a row (at least 1)."""
        exponent = min(max(failures, 1), _MAX_EXPONENT) - 1
        return min(self.initial * self.multiplier**exponent, self.maximum)

    def delay(self, failures: int, draw: Callable[[], float] = random.random) -> float:
        """Seconds to wait after `failures` failures in a row; `draw` returns a number in
        [0, 1) (the jitter; a fixed one in tests)."""
        ceiling = self.ceiling(failures)
        return ceiling / 2 + draw() * ceiling / 2
