"""Agents, ready tasks and a clock moved by hand, for the tests of dispatch."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from opscore.domain.clock import VirtualClock
from opscore.domain.models import AgentProfile, ReadyTask, ReportedState

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class TickingClock(VirtualClock):
    """A virtual clock, starting at `T0`, whose monotonic reading moves on at each reading, as a
    real one does between two events: of two agents that start waiting one after the other, the
    first has waited longer."""

    def __init__(self) -> None:
        super().__init__(T0)
        self._ticks = itertools.count()

    def monotonic(self) -> float:
        """One more than the last reading."""
        return float(next(self._ticks))


def agent(
    agent_id: str,
    *capabilities: str,
    labels: dict[str, str] | None = None,
    slots: int = 1,
    reported: ReportedState = ReportedState.NONE,
) -> AgentProfile:
    """A connected agent's profile: any capability if none is named, one slot by default."""
    return AgentProfile(agent_id, frozenset(capabilities), labels or {}, slots, reported)


def ready(
    task_id: str,
    capability: str = "",
    labels: dict[str, str] | None = None,
    pinned: str = "",
    not_before: datetime | None = None,
) -> ReadyTask:
    """A ready task of run "run", needing what it names."""
    return ReadyTask(
        task_id, "run", capability, tuple(sorted((labels or {}).items())), pinned, not_before
    )
