"""A replica's place among the servers sharing one database: it joins under a lease, renews it,
declares dead the replicas whose leases lapsed (their agents' grace periods start then), and stops
serving streams once it cannot be sure its own lease holds.

A replica is fenced when its lease may have lapsed without its knowing: a renewal has failed for
two thirds of the lease (the others declare it dead at the end of the lease, by their clocks), or
a renewal found its row gone (another replica declared it dead). A fenced replica closes every
stream and opens none: its agents reconnect to a live replica, which redelivers what they hold.
Once a renewal succeeds again it serves streams again; if its row was gone, it joins anew under a
new id, since the streams the old id held are another replica's concern by then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from opscore.domain.clock import Clock
from opscore.domain.errors import StorageFault
from opscore.domain.ids import new_id
from opscore.domain.ports import Beat, ReplicaStore

log = logging.getLogger("opscore.replicas")

REPLICA_LEASE = timedelta(seconds=10)
"""How long a replica's lease lasts unrenewed, by default."""


@dataclass(frozen=True, slots=True)
class MembershipSettings:
    """How a replica keeps its place."""

    address: str = ""
    """Where it listens, recorded for operators."""
    lease: timedelta = REPLICA_LEASE
    shared: bool = False
    """Whether other servers may share the database (PostgreSQL); if not (SQLite), this one owns
    it alone and every agent is disconnected when it joins."""

    @property
    def renew_every(self) -> timedelta:
        """A third of the lease: a renewal may fail once and the lease still hold."""
        return self.lease / 3


class Membership:
    """The lease of this replica (see the module docstring)."""

    def __init__(
        self,
        store: ReplicaStore,
        settings: MembershipSettings,
        clock: Clock,
        *,
        fenced: Callable[[str], None],
        streams_lost: Callable[[datetime], None],
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._fenced = fenced
        """Told why, when this replica must stop serving streams."""
        self._streams_lost = streams_lost
        """Told when agents were disconnected for their replica's death: their grace starts."""
        self.replica_id = ""
        self.peers = 0
        """How many other replicas were alive at the last renewal."""
        self.serving = False
        """Whether this replica may hold streams: joined, and its lease known to hold."""
        self._renewed = clock.now()

    async def join(self) -> None:
        """Record this replica under a new id and lease."""
        settings = self._settings
        now = self._clock.now()
        self.replica_id = new_id()
        beat = await self._store.join(
            self.replica_id, settings.address, now, settings.lease, alone=not settings.shared
        )
        self._renewed = now
        self.serving = True
        self._note(beat, now)
        log.info(
            "replica joined",
            extra={"replica_id": self.replica_id, "peers": beat.peers, "address": settings.address},
        )

    async def run(self) -> None:
        """Renew the lease every third of it, until cancelled (nothing to do for a server that
        owns its database alone)."""
        if not self._settings.shared:
            return
        while True:
            await self._clock.sleep(self._settings.renew_every.total_seconds())
            await self.renew()

    async def renew(self) -> None:
        """One renewal: fenced if it fails for too long or finds this replica declared dead,
        serving again (under a new id if need be) once it succeeds."""
        now = self._clock.now()
        try:
            beat = await self._store.beat(now, self._settings.lease)
        except StorageFault:
            if self.serving and now - self._renewed >= 2 * self._settings.renew_every:
                self._fence("its lease could not be renewed")
            return
        if not beat.registered:
            self._fence("it was declared dead by another replica")
            await self.join()
            return
        self._renewed = now
        if not self.serving:
            self.serving = True
            log.warning("replica serving again", extra={"replica_id": self.replica_id})
        self._note(beat, now)

    async def leave(self) -> None:
        """Leave: this replica stops (its agents' grace periods start now)."""
        if not self.serving:
            return
        self.serving = False
        try:
            await self._store.leave(self._clock.now())
        except StorageFault:
            # Its lease lapses instead: another replica, or the next start, disconnects them.
            log.warning("replica left without a word", extra={"replica_id": self.replica_id})

    def _note(self, beat: Beat, now: datetime) -> None:
        self.peers = beat.peers
        if beat.lost_streams:
            log.warning(
                "agents of a dead replica disconnected",
                extra={"replica_id": self.replica_id, "agents": beat.lost_streams},
            )
            self._streams_lost(now)

    def _fence(self, why: str) -> None:
        if self.serving:
            self.serving = False
            log.error(
                "replica fenced: its streams close",
                extra={"replica_id": self.replica_id, "reason": why},
            )
            self._fenced(why)
