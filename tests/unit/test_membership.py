"""A replica's lease, on a virtual clock: renewed every third of it, fenced when it may have
lapsed unseen, serving again once renewed, under a new id if it was declared dead."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from dispatching import T0

from opscore.domain.clock import VirtualClock
from opscore.domain.errors import StorageUnavailable
from opscore.domain.membership import Membership, MembershipSettings
from opscore.domain.ports import Beat

LEASE = timedelta(seconds=9)


class Registry:
    """The replicas table as one replica sees it: renewals that fail while `down`, a row
    another replica may delete (`declared_dead`), agents lost with dead replicas."""

    def __init__(self) -> None:
        self.down = False
        self.declared_dead = False
        self.lost = 0
        self.joined: list[str] = []
        self.left: list[datetime] = []

    def _fail_if_down(self) -> None:
        if self.down:
            raise StorageUnavailable("the database is down", timedelta(seconds=1))

    async def join(
        self, replica_id: str, address: str, now: datetime, lease: timedelta, *, alone: bool
    ) -> Beat:
        self._fail_if_down()
        self.joined.append(replica_id)
        self.declared_dead = False
        return Beat(registered=True, peers=1, lost_streams=0)

    async def beat(self, now: datetime, lease: timedelta) -> Beat:
        self._fail_if_down()
        lost, self.lost = self.lost, 0
        return Beat(registered=not self.declared_dead, peers=1, lost_streams=lost)

    async def leave(self, now: datetime) -> None:
        self._fail_if_down()
        self.left.append(now)


class Replica:
    def __init__(self) -> None:
        self.clock = VirtualClock(T0)
        self.registry = Registry()
        self.fenced: list[str] = []
        self.lost_at: list[datetime] = []
        self.membership = Membership(
            self.registry,
            MembershipSettings(address="here", lease=LEASE, shared=True),
            self.clock,
            fenced=self.fenced.append,
            streams_lost=self.lost_at.append,
        )

    async def renew_later(self) -> None:
        self.clock.advance(LEASE / 3)
        await self.membership.renew()


@pytest.fixture
async def replica() -> Replica:
    made = Replica()
    await made.membership.join()
    return made


async def test_one_failed_renewal_is_survived_two_fence_the_replica(replica: Replica) -> None:
    replica.registry.down = True
    await replica.renew_later()
    assert replica.membership.serving
    assert replica.fenced == []
    await replica.renew_later()  # two thirds of the lease without a renewal
    assert not replica.membership.serving
    assert replica.fenced == ["its lease could not be renewed"]
    await replica.renew_later()
    assert len(replica.fenced) == 1
    replica.registry.down = False
    first = replica.membership.replica_id
    await replica.renew_later()
    assert replica.membership.serving
    assert replica.membership.replica_id == first  # nobody declared it dead: the same id


async def test_a_replica_declared_dead_is_fenced_and_joins_again_anew(replica: Replica) -> None:
    first = replica.membership.replica_id
    replica.registry.declared_dead = True
    await replica.renew_later()
    assert replica.fenced == ["it was declared dead by another replica"]
    assert replica.membership.serving
    assert replica.registry.joined == [first, replica.membership.replica_id]
    assert replica.membership.replica_id != first


async def test_agents_of_a_dead_replica_start_their_grace_when_it_is_declared(
    replica: Replica,
) -> None:
    replica.registry.lost = 2
    await replica.renew_later()
    assert replica.lost_at == [T0 + LEASE / 3]
    assert replica.membership.peers == 1


async def test_leaving_on_a_database_that_is_down_is_left_to_the_lease(replica: Replica) -> None:
    replica.registry.down = True
    await replica.membership.leave()
    assert not replica.membership.serving
    replica.registry.down = False
    await replica.membership.leave()  # once only
    assert replica.registry.left == []
