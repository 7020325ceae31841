"""What the store tests build their stores with: the state machine, and a before-commit hook
that each test may set."""

from __future__ import annotations

from datetime import timedelta

from opscore.domain.machine import StateMachine
from opscore.domain.retry import ResolvedRetryPolicy
from opscore.store.writer import Batch, BeforeCommit, Followup

STORE_TIMEOUT = timedelta(minutes=1)
"""The lease of an attempt whose task sets no timeout."""


def store_rules() -> StateMachine:
    """One attempt per task (a failure is final), leases of `STORE_TIMEOUT`."""
    return StateMachine(ResolvedRetryPolicy(max_attempts=1), STORE_TIMEOUT)


class Placement:
    """The store fixture's writer's before-commit hook: none until a test sets `hook` (as the
    server passes `Store.placement` to its writer)."""

    def __init__(self) -> None:
        self.hook: BeforeCommit | None = None

    def __call__(self, batch: Batch, followups: list[Followup]) -> None:
        if self.hook is not None:
            self.hook(batch, followups)
