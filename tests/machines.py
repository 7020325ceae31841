"""The state machine the store tests build their stores with."""

from __future__ import annotations

from datetime import timedelta

from opscore.domain.machine import StateMachine
from opscore.domain.retry import ResolvedRetryPolicy

STORE_TIMEOUT = timedelta(minutes=1)
"""The lease of an attempt whose task sets no timeout."""


def store_rules() -> StateMachine:
    """One attempt per task (a failure is final), leases of `STORE_TIMEOUT`."""
    return StateMachine(ResolvedRetryPolicy(max_attempts=1), STORE_TIMEOUT)
