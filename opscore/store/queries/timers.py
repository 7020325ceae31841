"""What ends with time: leases that expire (and the quarantine of agents whose leases keep
expiring), and agents whose grace period ends without their coming back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection

from opscore.domain.models import Effects, RetryPolicy
from opscore.domain.ports import OnCommit
from opscore.domain.state import Decision, RunNow
from opscore.store import rows
from opscore.store.changes import record
from opscore.store.queries.agents import quarantine
from opscore.store.queries.base import Shared, run_now
from opscore.store.tables import AGENTS, TASK_IS_ASSIGNED, TASKS

Abandon = Callable[[RunNow, str, RetryPolicy | None, datetime], Decision]
"""How an attempt that ended without a result moves its run (`Rules.expire`, `Rules.lose`)."""

_COUNT_EXPIRIES = (
    update(AGENTS)
    .where(AGENTS.c.agent_id == bindparam("b_agent_id"))
    .values(lease_expiries=AGENTS.c.lease_expiries + bindparam("b_count"))
)
_ASSIGNED_FOR_UPDATE = (
    select(TASKS)
    .where(TASKS.c.task_id == bindparam("b_task_id"), TASK_IS_ASSIGNED)
    .with_for_update()
)


class Timers:
    """The store's repository of what ends with time."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._rules = shared.rules

    async def next_timers(self) -> tuple[datetime | None, datetime | None]:
        """The earliest lease deadline of an assigned task, and the earliest grace start of a
        disconnected agent: both one look-up in an index, never a scan."""

        def op(conn: Connection) -> tuple[datetime | None, datetime | None]:
            deadline = (
                conn.execute(select(func.min(TASKS.c.deadline)).where(TASK_IS_ASSIGNED))
            ).scalar_one_or_none()
            disconnected = (
                conn.execute(
                    select(func.min(AGENTS.c.disconnected_at)).where(AGENTS.c.connected.is_(False))
                )
            ).scalar_one_or_none()
            return _aware(deadline), _aware(disconnected)

        return await self._shared.read(op)

    async def expire_leases(
        self, now: datetime, quarantine_after: int, on_commit: OnCommit[Effects], limit: int = 500
    ) -> None:
        """Every attempt whose lease has ended counts as failed with "timed out" (retryable);
        its agent is told to stop. Each expiry adds to its agent's count of expiries in a row,
        and an agent whose count reaches `quarantine_after` is quarantined: put in ERROR, with
        the reason in its state detail, until it reports IDLE or registers again."""

        def op(conn: Connection) -> tuple[None, Effects]:
            due = (
                conn.execute(
                    select(TASKS.c.task_id)
                    .where(TASK_IS_ASSIGNED, TASKS.c.deadline <= now)
                    .order_by(TASKS.c.deadline)
                    .limit(limit)
                )
            ).scalars()
            effects, expired = _abandon(self._shared, conn, list(due), self._rules.expire, now)
            if expired:
                self._shared.expiring.noted(expired)
                conn.execute(
                    _COUNT_EXPIRIES,
                    [{"b_agent_id": agent_id, "b_count": n} for agent_id, n in expired.items()],
                )
                effects.quarantined = quarantine(conn, list(expired), quarantine_after, self._rules)
            return None, effects

        await self._shared.write_moving(op, on_commit)

    async def lose_agents(
        self, cutoff: datetime, now: datetime, on_commit: OnCommit[Effects]
    ) -> None:
        """Agents disconnected since `cutoff` or earlier are lost: every attempt they hold
        counts as failed with "agent lost" (retryable)."""

        def op(conn: Connection) -> tuple[None, Effects]:
            lost = (
                conn.execute(
                    select(AGENTS.c.agent_id).where(
                        AGENTS.c.connected.is_(False), AGENTS.c.disconnected_at <= cutoff
                    )
                )
            ).scalars()
            lost_ids = list(lost)
            if not lost_ids:
                return None, Effects()
            conn.execute(
                update(AGENTS).where(AGENTS.c.agent_id.in_(lost_ids)).values(disconnected_at=None)
            )
            held = (
                conn.execute(
                    select(TASKS.c.task_id)
                    .where(
                        TASKS.c.agent_id.in_(lost_ids),
                        TASK_IS_ASSIGNED,
                    )
                    .order_by(TASKS.c.assigned_at)
                )
            ).scalars()
            return None, _abandon(self._shared, conn, list(held), self._rules.lose, now)[0]

        await self._shared.write_moving(op, on_commit)


def _abandon(
    shared: Shared, conn: Connection, task_ids: list[str], why: Abandon, now: datetime
) -> tuple[Effects, Counter[str]]:
    """End the current attempt of each of these tasks still assigned without a result, as
    `why` decides (an expired lease, a lost agent); and how many each agent had."""
    effects = Effects()
    agents: Counter[str] = Counter()
    shared.lock_runs_of(conn, task_ids)
    for task_id in task_ids:
        row = conn.execute(_ASSIGNED_FOR_UPDATE, {"b_task_id": task_id}).first()
        if row is None:
            continue
        policy = rows.retry_from_json(row.retry_policy)
        effects.merge(record(conn, why(run_now(conn, row.run_id), row.name, policy, now), now))
        agents[row.agent_id] += 1
    return effects, agents


def _aware(value: datetime | None) -> datetime | None:
    """Aggregates bypass the column type on SQLite: give a bare MIN() its time zone back."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
