"""One server owns a database, and a port. A second `opscore serve` (or `opscore db upgrade`) on
what a running server holds exits at once with one CRITICAL log line naming it and its holder,
and leaves the first server's work alone. Other start-up failures the world causes (a read-only
database, an unreachable one, a refused migration) are one CRITICAL line as well.

Most tests run the server as operators do, a separate process (tests/processes.py); those that
look inside a start run it in the test's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import auth
import pytest
from conftest import POSTGRES_URL, ServerFactory, asyncpg_dsn, postgres_database
from helpers import WAIT, connect, definition, task
from opscore.v1 import agent_lifecycle_pb2, agent_pb2
from processes import (
    OPSCORE,
    ServerProcess,
    clean_environment,
    free_port,
    log_records,
    run_async,
)

from opscore import server as server_module
from opscore.config import Settings
from opscore.server import OpsCoreServer
from opscore.startup import StartupError
from opscore.store import ownership

REFUSAL_WAIT = 15.0
"""Seconds a refused start may take: an interpreter's start-up and a check, on a busy machine."""

postgres_only = pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set")


def serve(port: int, url: str) -> list[str]:
    return [str(OPSCORE), "serve", "--listen", f"127.0.0.1:{port}", "--db", url]


def authenticated() -> dict[str, str]:
    """A clean environment with authentication on: a server's refusal is then its only line."""
    return clean_environment(**auth.ENVIRONMENT)


def upgrade(url: str) -> list[str]:
    return [str(OPSCORE), "db", "upgrade", "--db", url]


async def refused(args: list[str], cwd: Path) -> dict[str, Any]:
    """Run a command that must be refused at once: exit status 1, and nothing on standard error
    but one JSON line at CRITICAL, which is returned."""
    code, stderr = await run_async(args, authenticated(), cwd, timeout=REFUSAL_WAIT)
    assert code == 1, stderr
    assert len(stderr.splitlines()) == 1, stderr
    [record] = log_records(stderr)
    assert record["level"] == "CRITICAL", record
    return record


def name(url: str) -> str:
    """How the refusal names a database: a SQLite file's path, or the URL (the tests' URLs have
    no password to hide)."""
    return url.removeprefix("sqlite:///")


async def test_a_second_server_on_a_taken_address_exits_naming_it(tmp_path: Path) -> None:
    port = free_port()
    first = ServerProcess.on_sqlite(tmp_path / "first.db", port, tmp_path / "first.log")
    async with first, connect(port) as client:
        await client.agent("first-agent", connect=False)

        record = await refused(serve(port, f"sqlite:///{tmp_path / 'second.db'}"), tmp_path)

        assert f"127.0.0.1:{port}" in record["event"], record
        assert record["address"] == f"127.0.0.1:{port}"
        assert "in use" in record["cause"], record
        assert not (tmp_path / "second.db").exists(), "the refused server opened its database"
        # Every connection reaches the first server (a shared port split them between the two).
        for _ in range(8):
            async with connect(port) as fresh:
                response = await fresh.lifecycle.GetAgent(
                    agent_lifecycle_pb2.GetAgentRequest(agent_id="first-agent")
                )
            assert response.agent.agent_id == "first-agent"
        assert first.returncode is None


async def test_a_second_server_on_an_owned_database_exits_and_leaves_its_agents_alone(
    db_url: str, tmp_path: Path
) -> None:
    """On SQLite one server owns the database, and `db upgrade` waits for it; on PostgreSQL a
    second server joins the first as a replica, and `db upgrade` waits for both."""
    replicas = db_url.startswith("postgresql")
    port = free_port()
    first = ServerProcess.on_url(db_url, port, tmp_path / "first.log", tmp_path)
    second = ServerProcess.on_url(db_url, free_port(), tmp_path / "second.log", tmp_path)
    async with first, connect(port) as client:
        agent = await client.agent("worker", capabilities=["work"])
        job = await client.create(definition("job", task("only", capability="work")))

        # Another server on another port, and a migration, both at once.
        if replicas:
            await second.start()
            records = [await refused(upgrade(db_url), tmp_path)]
        else:
            records = await asyncio.gather(
                refused(serve(free_port(), db_url), tmp_path), refused(upgrade(db_url), tmp_path)
            )

        for record in records:
            assert name(db_url) in record["event"], record
            assert "opscore serve" in record["event"], record
        assert f"pid {first.process.pid}" in records[-1]["event"] or replicas, records
        # The first server's agent is still connected, and work triggered now reaches it.
        seen = await agent.get()
        assert seen.connected, seen
        assert seen.state == agent_pb2.AGENT_STATE_IDLE, seen
        run = await client.trigger(definition_id=job.definition_id)
        assert (await agent.next_assignment()).run_id == run.run_id
        first.terminate()
        assert await first.wait() == 0, first.log_text()
        if replicas:
            second.terminate()
            assert await second.wait() == 0, second.log_text()

    # Its holders gone, the database is free.
    code, stderr = await run_async(upgrade(db_url), clean_environment(), tmp_path)
    assert code == 0, stderr


async def test_a_killed_server_leaves_its_database_to_the_next_at_once(
    db_url: str, tmp_path: Path
) -> None:
    first = ServerProcess.on_url(db_url, free_port(), tmp_path / "first.log", tmp_path)
    async with first:
        first.kill()
        assert await first.wait() == -signal.SIGKILL

    second = ServerProcess.on_url(db_url, free_port(), tmp_path / "second.log", tmp_path)
    async with second:  # it answers SERVING: nothing held the database
        with pytest.raises(ownership.DatabaseOwned) as refusal:  # and it holds it now
            await ownership.claim(db_url, ownership.Holder("db upgrade"))
        assert f"pid {second.process.pid}" in refusal.value.holder


@contextlib.contextmanager
def tmpfs(where: Path) -> Iterator[Path]:
    """A small tmpfs mounted at `where` for the block (skips the test where mounting is not
    permitted): the one way to make a file read-only for root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], timeout=WAIT, check=True)


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], timeout=WAIT, check=True)


async def test_a_read_only_database_is_one_critical_line(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        database = disk / "opscore.db"
        first = ServerProcess.on_sqlite(database, free_port(), tmp_path / "first.log")
        async with first:
            first.terminate()
            assert await first.wait() == 0, first.log_text()
        remount_read_only(disk)

        record = await refused(serve(free_port(), f"sqlite:///{database}"), tmp_path)

    assert record["database"] == str(database)
    assert str(database) in record["event"], record
    assert "Read-only file system" in record["cause"], record


async def test_an_unknown_revision_or_an_unreachable_database_is_one_critical_line(
    tmp_path: Path,
) -> None:
    later = tmp_path / "later.db"  # migrated by a later release, which this one does not know
    with sqlite3.connect(later) as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.execute("INSERT INTO alembic_version VALUES ('from-a-later-release')")
    connection.close()
    unreachable = f"postgresql://opscore:secret@127.0.0.1:{free_port()}/opscore"

    (migrated, migrated_log), (reached, reached_log) = await asyncio.gather(
        run_async(serve(free_port(), f"sqlite:///{later}"), authenticated(), tmp_path),
        run_async(serve(free_port(), unreachable), authenticated(), tmp_path),
    )

    assert migrated == 1, migrated_log
    # Alembic logs what it does first; then the one CRITICAL line.
    *_, record = log_records(migrated_log)
    assert record["level"] == "CRITICAL", migrated_log
    assert "from-a-later-release" in record["cause"], record
    assert str(later) in record["event"], record
    assert reached == 1, reached_log
    [record] = log_records(reached_log)
    assert record["level"] == "CRITICAL", reached_log
    assert "secret" not in reached_log
    assert unreachable.replace("secret", "***") in record["event"], record
    assert "refused" in record["cause"], record


async def test_localhost_is_refused_where_a_server_holds_127_0_0_1(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """gRPC binds both loopback addresses for `localhost`, and starts when either is free."""
    port = free_port()
    async with start_server(f"sqlite:///{tmp_path / 'first.db'}", listen=f"127.0.0.1:{port}"):
        second = OpsCoreServer(
            Settings(listen=f"localhost:{port}", db_url=f"sqlite:///{tmp_path / 'second.db'}")
        )
        with pytest.raises(StartupError) as refusal:
            await second.start()
    assert refusal.value.subject == {"address": f"localhost:{port}"}
    assert refusal.value.failed == f"cannot listen on localhost:{port}"
    assert "127.0.0.1" in refusal.value.cause
    assert not (tmp_path / "second.db").exists()


async def test_grpc_refuses_a_taken_port_and_the_failed_start_frees_its_database(
    start_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the check of the address first (two servers starting at the same moment both
    find it free), gRPC itself refuses the port: it is not shared. What the refused start took
    is given back."""
    monkeypatch.setattr(server_module, "refuse_taken", lambda _listen: None)
    port = free_port()
    second_url = f"sqlite:///{tmp_path / 'second.db'}"
    async with start_server(f"sqlite:///{tmp_path / 'first.db'}", listen=f"127.0.0.1:{port}"):
        second = OpsCoreServer(Settings(listen=f"127.0.0.1:{port}", db_url=second_url))
        with pytest.raises(StartupError) as refusal:
            await second.start()
        assert refusal.value.subject == {"address": f"127.0.0.1:{port}"}
        async with start_server(second_url):  # its database is free again
            pass


LOCK_HOLDER = """
    SELECT l.pid FROM pg_locks AS l JOIN pg_database AS d ON d.oid = l.database
    WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1 AND d.datname = $2
"""
"""The backend holding a database's ownership lock, if any."""


async def lock_holder(admin: asyncpg.Connection, database: str) -> int | None:
    pid: int | None = await admin.fetchval(LOCK_HOLDER, ownership.LOCK_KEY, database)
    return pid


@postgres_only
async def test_a_lost_lock_is_taken_again(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its connection ended (as when PostgreSQL restarts), the server takes the lock again."""
    monkeypatch.setattr(ownership, "PROBE_EVERY", 0.05)  # probed meanwhile, and answering
    monkeypatch.setattr(ownership, "RETAKE_EVERY", 0.05)
    async with postgres_database() as url:
        database = url.rpartition("/")[2]
        admin = await asyncpg.connect(asyncpg_dsn(POSTGRES_URL))
        try:
            async with start_server(url) as server, connect(server.port) as client:
                before = await lock_holder(admin, database)
                assert before is not None
                await admin.execute("SELECT pg_terminate_backend($1)", before)
                async with asyncio.timeout(WAIT):
                    while (after := await lock_holder(admin, database)) in (None, before):
                        await asyncio.sleep(0.02)
                assert after != before
                await client.agent("still-served", connect=False)
                assert not server.failed
        finally:
            await admin.close()


@postgres_only
async def test_a_server_whose_lock_another_took_stops_loudly(
    start_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the lock's connection is down another session takes the lock: the server stops,
    naming the database and who took it."""
    monkeypatch.setattr(ownership, "RETAKE_EVERY", 0.05)
    async with postgres_database() as url:
        database = url.rpartition("/")[2]
        admin = await asyncpg.connect(asyncpg_dsn(POSTGRES_URL))
        usurper = await asyncpg.connect(
            asyncpg_dsn(url), server_settings={"application_name": "usurper"}
        )
        try:
            async with start_server(url) as server:
                holder = await lock_holder(admin, database)
                # No new connection can reach the database until the usurper holds the lock.
                await admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
                await admin.execute("SELECT pg_terminate_backend($1)", holder)
                async with asyncio.timeout(WAIT):
                    await usurper.execute(
                        "SELECT pg_advisory_lock($1, hashtext(current_schema()))",
                        ownership.LOCK_KEY,
                    )
                await admin.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
                await asyncio.wait_for(server.wait_for_failure(), WAIT)
        finally:
            await usurper.close()
            await admin.close()
    [record] = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert "usurper" in record.getMessage()
    assert database in record.getMessage()
    assert record.exc_info is None
