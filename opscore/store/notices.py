"""The noticeboard of replicas on PostgreSQL: LISTEN/NOTIFY on one connection of each replica's
own (see `domain.notices`). No broker: the database every replica already uses carries them.

Each notice goes out as one or more JSON payloads under PostgreSQL's limit of 8,000 bytes. A
replica's own notices come back to it and are dropped. If the connection is lost, notices sent
meanwhile are lost with it: once it is back (tried again every second), `missed` tells the
replica to reread what they would have said.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from opscore.domain.models import Cancellation
from opscore.domain.notices import Notice
from opscore.store.database import normalize_url

CHANNEL = "opscore_notices"

PAYLOAD_BYTES = 7_500
"""At most this many bytes a payload, under PostgreSQL's 8,000."""

RECONNECT_EVERY = 1.0
"""Seconds between two attempts to listen again after the connection was lost."""

PROBE_EVERY = 5.0
"""Seconds between two checks that an idle connection still answers."""

log = logging.getLogger("opscore.replicas")


def encode(notice: Notice) -> list[str]:
    """`notice` as payloads of at most `PAYLOAD_BYTES` each (split as often as needed)."""
    payload = json.dumps(
        {
            "s": notice.sender,
            "r": sorted(notice.ready),
            "l": notice.released,
            "c": [[c.agent_id, c.task_id, c.run_id, c.attempt, c.reason] for c in notice.cancelled],
            "a": sorted(notice.agents),
            "j": notice.joined,
            "w": sorted(notice.watching),
            "g": sorted(notice.changed_runs),
        },
        separators=(",", ":"),
    )
    if len(payload.encode()) <= PAYLOAD_BYTES:
        return [payload]
    halves = [Notice(notice.sender, joined=notice.joined), Notice(notice.sender)]
    for index, capability in enumerate(sorted(notice.ready)):
        halves[index % 2].ready.add(capability)
    for index, hold in enumerate(notice.released):
        halves[index % 2].released.append(hold)
    for index, cancellation in enumerate(notice.cancelled):
        halves[index % 2].cancelled.append(cancellation)
    for index, agent_id in enumerate(sorted(notice.agents)):
        halves[index % 2].agents.add(agent_id)
    for index, run_id in enumerate(sorted(notice.watching)):
        halves[index % 2].watching.add(run_id)
    for index, run_id in enumerate(sorted(notice.changed_runs)):
        halves[index % 2].changed_runs.add(run_id)
    return [part for half in halves for part in encode(half)]


def decode(payload: str) -> Notice:
    """A payload back as a notice."""
    fields: dict[str, Any] = json.loads(payload)
    return Notice(
        sender=fields["s"],
        ready=set(fields["r"]),
        released=[(agent_id, task_id) for agent_id, task_id in fields["l"]],
        cancelled=[Cancellation(*cancelled) for cancelled in fields["c"]],
        agents=set(fields["a"]),
        joined=fields["j"],
        watching=set(fields["w"]),
        changed_runs=set(fields["g"]),
    )


def merge(notices: list[Notice]) -> Notice:
    """Several notices of one sender as one."""
    merged = Notice(notices[0].sender)
    for notice in notices:
        merged.ready |= notice.ready
        merged.released.extend(notice.released)
        merged.cancelled.extend(notice.cancelled)
        merged.agents |= notice.agents
        merged.joined |= notice.joined
        merged.watching |= notice.watching
        merged.changed_runs |= notice.changed_runs
    return merged


class PostgresNoticeboard:
    """LISTEN/NOTIFY on a connection of this replica's own (see the module docstring)."""

    def __init__(self, url: str, sender: Callable[[], str]) -> None:
        self._engine = create_async_engine(
            normalize_url(url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        self._sender = sender
        self._outgoing: list[Notice] = []
        self._wake = asyncio.Event()

    def post(self, notice: Notice) -> None:
        """Send `notice` soon, with whatever else is posted meanwhile."""
        self._outgoing.append(notice)
        self._wake.set()

    async def run(self, received: Callable[[Notice], None], missed: Callable[[], None]) -> None:
        """Listen and send until cancelled, connecting again whenever the connection is lost
        (asyncpg's own connection: SQLAlchemy has no LISTEN)."""
        first = True
        try:
            while True:
                try:
                    async with self._engine.connect() as connection:
                        raw = await connection.get_raw_connection()
                        await self._serve(
                            raw.driver_connection, received, None if first else missed
                        )
                except (OSError, DBAPIError) as error:
                    log.warning("replica notices interrupted", extra={"cause": str(error)})
                except Exception as error:  # noqa: BLE001 - the driver's own errors, unwrapped
                    log.warning("replica notices interrupted", extra={"cause": repr(error)})
                first = False
                await asyncio.sleep(RECONNECT_EVERY)
        finally:
            await self._engine.dispose()

    async def _serve(
        self,
        connection: Any,
        received: Callable[[Notice], None],
        missed: Callable[[], None] | None,
    ) -> None:
        closed = asyncio.Event()

        def close(_: object) -> None:
            closed.set()
            self._wake.set()  # noticed now, not at the next probe

        connection.add_termination_listener(close)

        def deliver(_: object, __: int, ___: str, payload: str) -> None:
            notice = decode(payload)
            if notice.sender != self._sender():
                received(notice)

        await connection.add_listener(CHANNEL, deliver)
        if missed is None:
            self.post(Notice(self._sender(), joined=True))
        else:
            missed()
        while not closed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_EVERY):
                    await self._wake.wait()
            if closed.is_set():
                break
            if not self._wake.is_set():
                await connection.fetchval("SELECT 1")  # a dead socket fails here
                continue
            self._wake.clear()
            outgoing, self._outgoing = self._outgoing, []
            if outgoing:
                await connection.executemany(
                    "SELECT pg_notify($1, $2)",
                    [(CHANNEL, payload) for payload in encode(merge(outgoing))],
                )
        raise OSError("the connection closed")
