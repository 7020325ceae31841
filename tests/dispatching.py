"""Agents, ready tasks and a wall clock moved by hand, for the tests of dispatch."""

from __future__ import annotations

from datetime import UTC, datetime

from opscore.domain.models import AgentProfile, ReadyTask, ReportedState

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class FakeNow:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.value = T0

    def __call__(self) -> datetime:
        return self.value


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
