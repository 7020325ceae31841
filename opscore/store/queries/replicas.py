"""The replicas' rows: the servers sharing one database, each under a lease it renews, and the
agents whose streams they held when they died."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from opscore.domain.ports import Beat
from opscore.store.queries.base import Shared
from opscore.store.tables import AGENTS, REPLICAS

_ORPHANED = or_(
    AGENTS.c.replica_id.is_(None),
    AGENTS.c.replica_id.not_in(select(REPLICAS.c.replica_id).scalar_subquery()),
)
"""A connected agent whose stream no live replica holds."""


class Replicas:
    """The store's repository of replicas: joining, renewing the lease, declaring the lapsed
    ones dead, leaving."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    async def join(
        self, replica_id: str, address: str, now: datetime, lease: timedelta, *, alone: bool
    ) -> Beat:
        """Record this replica as `replica_id` (from now the store's `Shared.replica_id`) under
        a lease that ends `lease` from now.
        With `alone`, the database has one server (SQLite's owner): every other replica's row
        is gone, and every agent is disconnected (see `Agents.reset_connections`). Otherwise
        the lapsed replicas are declared dead as `beat` does, and so, if no replica is alive but
        this one, is everything a previous life of the deployment left (the same reset)."""
        self._shared.replica_id = replica_id

        def op(conn: Connection) -> Beat:
            conn.execute(
                insert(REPLICAS).values(
                    replica_id=replica_id,
                    address=address[:300],
                    started_at=now,
                    renewed_at=now,
                    expires_at=now + lease,
                )
            )
            if not alone:
                beat = _beat(conn, replica_id, now, lease)
                if beat.peers:
                    return beat
            conn.execute(delete(REPLICAS).where(REPLICAS.c.replica_id != replica_id))
            self._shared.reset_connections(conn, now)
            return Beat(registered=True, peers=0, lost_streams=0)

        return await self._shared.write(op)

    async def beat(self, now: datetime, lease: timedelta) -> Beat:
        """Renew this replica's lease, declare dead every replica whose lease has lapsed, and
        disconnect the agents whose streams no live replica holds: their grace periods start
        now. Several replicas may do it at once: each dead replica, and each agent, is handled
        by one (the first to lock its row)."""
        replica_id = self._shared.replica_id
        return await self._shared.write(lambda conn: _beat(conn, replica_id, now, lease))

    async def leave(self, now: datetime) -> None:
        """Leave: this replica stops, its row goes, and the agents it still shows connected are
        disconnected (their grace periods start now)."""
        replica_id = self._shared.replica_id

        def op(conn: Connection) -> None:
            conn.execute(delete(REPLICAS).where(REPLICAS.c.replica_id == replica_id))
            _disconnect(conn, AGENTS.c.replica_id == replica_id, now)

        await self._shared.write(op)


def _beat(conn: Connection, replica_id: str, now: datetime, lease: timedelta) -> Beat:
    renewed = conn.execute(
        update(REPLICAS)
        .where(REPLICAS.c.replica_id == replica_id)
        .values(renewed_at=now, expires_at=now + lease)
    ).rowcount
    conn.execute(delete(REPLICAS).where(REPLICAS.c.expires_at < now))
    lost = _disconnect(conn, _ORPHANED, now)
    peers = conn.execute(
        select(func.count()).select_from(REPLICAS).where(REPLICAS.c.replica_id != replica_id)
    ).scalar_one()
    return Beat(registered=renewed == 1, peers=peers, lost_streams=lost)


def _disconnect(conn: Connection, which: ColumnElement[bool], now: datetime) -> int:
    """Disconnect the connected agents `which` selects: their grace periods start now."""
    return conn.execute(
        update(AGENTS)
        .where(AGENTS.c.connected.is_(True), which)
        .values(connected=False, replica_id=None, disconnected_at=now)
    ).rowcount
