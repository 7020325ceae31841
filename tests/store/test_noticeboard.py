"""The noticeboard of replicas on PostgreSQL (`store/notices.py`): notices posted by one replica
reach the others and not itself, a replica announces itself when it first listens, and one whose
listening connection was lost listens again and is told that it may have missed notices."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from conftest import POSTGRES_URL, asyncpg_dsn, blocking, postgres_database

from opscore.domain.notices import Notice
from opscore.store import notices
from opscore.store.notices import PostgresNoticeboard

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set")

WAIT = 10.0


@pytest.fixture
def url(migrated_postgres: str) -> Iterator[str]:
    with blocking(postgres_database(migrated_postgres)) as made:
        yield made


class Listener:
    """One replica's side of the board: what it received, and how often it missed some."""

    def __init__(self, url: str, name: str) -> None:
        self.board = PostgresNoticeboard(url, lambda: name)
        self.received: asyncio.Queue[Notice] = asyncio.Queue()
        self.missed = 0
        self.missed_event = asyncio.Event()

    def _missed(self) -> None:
        self.missed += 1
        self.missed_event.set()

    async def next(self) -> Notice:
        """The next notice another replica posted (probes and announcements passed over)."""
        async with asyncio.timeout(WAIT):
            while True:
                got = await self.received.get()
                if got.sender != PROBE and not got.joined:
                    return got


PROBE = "probe"
"""The sender of the notices `until_listening` sends."""


@contextlib.asynccontextmanager
async def listening(url: str, name: str) -> AsyncIterator[Listener]:
    listener = Listener(url, name)
    task = asyncio.create_task(listener.board.run(listener.received.put_nowait, listener._missed))
    try:
        yield listener
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until_listening(url: str, *listeners: Listener) -> None:
    """Notify the board's channel until every listener hears it: they all listen."""
    admin = await asyncpg.connect(asyncpg_dsn(url))
    heard: set[int] = set()
    try:
        async with asyncio.timeout(WAIT):
            while len(heard) < len(listeners):
                for payload in notices.encode(Notice(PROBE, agents={PROBE})):
                    await admin.execute("SELECT pg_notify($1, $2)", notices.CHANNEL, payload)
                await asyncio.sleep(0.05)
                for index, listener in enumerate(listeners):
                    waiting = listener.received
                    kept = [waiting.get_nowait() for _ in range(waiting.qsize())]
                    if any(notice.sender == PROBE for notice in kept):
                        heard.add(index)
                    for notice in kept:
                        if notice.sender != PROBE:
                            waiting.put_nowait(notice)
    finally:
        await admin.close()


async def test_a_notice_reaches_the_other_replicas_and_not_its_sender(url: str) -> None:
    async with listening(url, "a") as a, listening(url, "b") as b:
        await until_listening(url, a, b)
        a.board.post(Notice("a", ready={"gpu"}, agents={"w"}))
        got = await b.next()
        assert (got.sender, got.ready, got.agents) == ("a", {"gpu"}, {"w"})
        b.board.post(Notice("b", ready={"cpu"}))
        got = await a.next()
        assert (got.sender, got.ready) == ("b", {"cpu"})
        await asyncio.sleep(0.1)
        assert all(notice.joined for notice in drained(a) + drained(b)), "a notice came back"
        assert (a.missed, b.missed) == (0, 0)


async def test_a_replica_that_lost_its_connection_listens_again_and_hears_it_missed_some(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notices, "RECONNECT_EVERY", 0.05)
    monkeypatch.setattr(notices, "PROBE_EVERY", 60.0)  # the loss is noticed, not probed for
    async with listening(url, "a") as a, listening(url, "b") as b:
        await until_listening(url, a, b)
        admin = await asyncpg.connect(asyncpg_dsn(url))
        try:
            # Their backends go away (a restart of PostgreSQL, a proxy's idle timeout).
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        async with asyncio.timeout(WAIT):
            await a.missed_event.wait()
            await b.missed_event.wait()
        await until_listening(url, a, b)
        a.board.post(Notice("a", ready={"gpu"}))
        assert (await b.next()).ready == {"gpu"}
        assert (a.missed, b.missed) == (1, 1)


def drained(listener: Listener) -> list[Notice]:
    """What the listener received and nobody took yet."""
    waiting = listener.received
    return [waiting.get_nowait() for _ in range(waiting.qsize())]
