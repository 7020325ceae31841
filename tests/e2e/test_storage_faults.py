"""Storage that fails while the server runs: a full disk, a database outage, connections killed,
a file system turned read-only, a database dropped. Each refused call is answered with a status a
client can act on (a reason and a delay to retry after), health turns NOT_SERVING and back, the
server stays up and recovers by itself, and nothing it acknowledged is lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
from conftest import POSTGRES_URL, ServerFactory, asyncpg_dsn, postgres_database
from helpers import WAIT, Agent, Client, connect, definition, seconds, task
from opscore.v1 import agent_lifecycle_pb2, workflow_pb2, workflow_service_pb2
from outages import (
    NOT_SERVING,
    SERVING,
    HealthWatch,
    Refusal,
    ext4_image,
    fill,
    outcome,
    proxy,
    refusal,
    tmpfs,
    watching,
)
from processes import ServerProcess, clean_environment, free_port
from sqlalchemy.engine import make_url

from opscore.config import Settings
from opscore.domain.ports import NewRun
from opscore.server import OpsCoreServer
from opscore.store.database import open_database
from opscore.store.queries import Store
from opscore.store.writer import Writer

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def quick_retry(name: str) -> workflow_pb2.TaskSpec:
    """A task of capability "work" retried 0.15-0.3 s after a failure."""
    spec = task(name, capability="work")
    spec.retry_policy.initial_backoff.CopyFrom(seconds(0.3))
    return spec


@asynccontextmanager
async def on_disk(
    start_server: ServerFactory, disk: Path, **overrides: object
) -> AsyncIterator[tuple[OpsCoreServer, Client, HealthWatch]]:
    """A server whose SQLite file is on `disk`, a client, and a watch of its overall health."""
    url = f"sqlite:///{disk / 'opscore.db'}"
    async with (
        start_server(url, **overrides) as server,
        connect(server.port) as client,
        watching(client.channel) as health,
    ):
        yield server, client, health


class Ledger:
    """The runs a server acknowledged, to check afterwards that each is still there."""

    def __init__(self, client: Client, run_ids: list[str] | None = None) -> None:
        self.client = client
        self.run_ids: list[str] = [] if run_ids is None else run_ids

    async def trigger(self, workflow: str) -> Refusal | None:
        """Trigger a run of `workflow`: None if acknowledged (and noted), else the refusal."""
        try:
            response = await self.client.workflows.TriggerWorkflow(
                workflow_service_pb2.TriggerWorkflowRequest(workflow_name=workflow)
            )
        except grpc.aio.AioRpcError as error:
            return refusal(error)
        self.run_ids.append(response.run.run_id)
        return None

    async def check_all_kept(self) -> None:
        """Every acknowledged run exists, and no other."""
        listed = await self.client.workflows.ListWorkflowRuns(
            workflow_service_pb2.ListWorkflowRunsRequest(page_size=1000)
        )
        assert sorted(run.run_id for run in listed.runs) == sorted(self.run_ids)


def storage_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("opscore")]


def assert_no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR or CRITICAL record, and no traceback: storage faults are told as an outage."""
    loud = [
        r for r in storage_records(caplog) if r.levelno >= logging.ERROR or r.exc_info is not None
    ]
    assert loud == [], [r.getMessage() for r in loud]


def told(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in storage_records(caplog) if r.getMessage() == event]


async def held_by(agent: Agent, ledger: Ledger) -> workflow_pb2.TaskAssignment:
    """Trigger a run of "one" and wait for its task to reach `agent`."""
    assert await ledger.trigger("one") is None
    return await agent.next_assignment()


def complete(agent: Agent, assignment: workflow_pb2.TaskAssignment) -> object:
    return agent.client.workflows.CompleteTask(
        workflow_service_pb2.CompleteTaskRequest(
            task_id=assignment.task_id, agent_id=agent.agent_id, attempt=assignment.attempt
        )
    )


async def ride_out(
    server: OpsCoreServer,
    client: Client,
    health: HealthWatch,
    refused: Refusal,
    fault: Callable[[], Awaitable[object]],
    mend: Callable[[], Awaitable[object]],
    *,
    reads: Refusal | None,
) -> None:
    """The common course of an outage. Before it, one agent holds a task and another has just
    failed one, to be retried from the dispatcher's own commit while storage fails; a third
    closes its stream during the outage, and its disconnection is written after. During it,
    triggers and completions are `refused`, reads get `reads` (None: they are answered), health
    turns NOT_SERVING, the server stays up.
    Once storage is mended, health turns SERVING by itself, the retry is assigned, everything
    completes, and every acknowledged run is there."""
    ledger = Ledger(client)
    await client.create(definition("one", quick_retry("t")))
    holder = await client.agent("holder", capabilities=["work"])
    held = await held_by(holder, ledger)
    retrier = await client.agent("retrier", capabilities=["work"])
    failing = await held_by(retrier, ledger)
    leaver = await client.agent("leaver", capabilities=["elsewhere"])
    await retrier.fail(failing, "try again", retryable=True)
    await fault()
    await leaver.disconnect()

    assert [await ledger.trigger("one") for _ in range(3)] == [refused] * 3
    await health.until(NOT_SERVING)
    assert await outcome(complete(holder, held)) == refused
    await asyncio.sleep(1.0)  # the retry comes due: the dispatcher's assignment is refused
    assert not server.failed
    assert await outcome(holder.get()) == reads

    await mend()
    await health.until(SERVING, timeout=5)
    await leaver.wait_until(lambda seen: not seen.connected)
    retried = await retrier.next_assignment(timeout=5)
    assert (retried.task_id, retried.attempt) == (failing.task_id, 2)
    await holder.complete(held)
    await retrier.complete(retried)
    assert await ledger.trigger("one") is None
    await ledger.check_all_kept()
    for run_id in ledger.run_ids[:2]:
        await client.wait_run(run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    assert not server.failed


OUTAGE = ("storage unavailable: health NOT_SERVING", "storage recovered")


def assert_told_once(caplog: pytest.LogCaptureFixture, *events: str) -> None:
    """Each of `events` logged once, and nothing at ERROR or with a traceback."""
    assert [len(told(caplog, event)) for event in events] == [1] * len(events)
    assert_no_error_logged(caplog)


async def test_a_full_disk_refuses_writes_then_recovers_by_itself(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opscore")
    with tmpfs(tmp_path / "disk", "8m") as disk:
        async with on_disk(start_server, disk, sqlite_free_space_reserve=0) as (
            server,
            client,
            health,
        ):
            filler: list[Path] = []

            async def fill_disk() -> None:
                filler.append(fill(disk))

            async def free_disk() -> None:
                filler.pop().unlink()

            full = Refusal(RESOURCE_EXHAUSTED, "STORAGE_FULL", 5.0)
            await ride_out(server, client, health, full, fill_disk, free_disk, reads=None)
    assert_told_once(caplog, *OUTAGE)


async def until_trigger(ledger: Ledger, refused: bool) -> Refusal | None:
    """Trigger until a trigger is refused (or accepted), bounded: the free space is looked at
    about once a second."""
    async with asyncio.timeout(WAIT):
        while ((found := await ledger.trigger("one")) is not None) != refused:
            await asyncio.sleep(0.05)
    return found


async def test_below_the_free_space_reserve_new_work_is_refused_and_results_go_through(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opscore")
    reserve = 4 << 20
    with tmpfs(tmp_path / "disk", "16m") as disk:
        async with on_disk(start_server, disk, sqlite_free_space_reserve=reserve) as (
            server,
            client,
            health,
        ):
            ledger = Ledger(client)
            await client.create(definition("one", quick_retry("t")))
            holder = await client.agent("holder", capabilities=["work"])
            held = await held_by(holder, ledger)
            assert await ledger.trigger("one") is None  # queued: no agent is free for it
            filler = fill(disk, leave=reserve // 2)

            below = Refusal(RESOURCE_EXHAUSTED, "STORAGE_RESERVE", 5.0)
            assert await until_trigger(ledger, refused=True) == below
            new_definition = client.workflows.CreateWorkflowDefinition(
                workflow_service_pb2.CreateWorkflowDefinitionRequest(
                    definition=definition("two", task("t"))
                )
            )
            assert await outcome(new_definition) == below
            # What finishes work, or keeps agents in touch, still goes through.
            await holder.complete(held)
            await client.wait_run(ledger.run_ids[0], workflow_pb2.RUN_STATE_SUCCEEDED)
            newcomer = await client.agent("newcomer", capabilities=["work"])
            await client.lifecycle.Heartbeat(
                agent_lifecycle_pb2.HeartbeatRequest(agent_id="newcomer")
            )
            assert await newcomer.next_assignment()  # the run queued before the refusals

            filler.unlink()
            assert await until_trigger(ledger, refused=False) is None
            await ledger.check_all_kept()
            assert NOT_SERVING not in health.seen
            assert not server.failed
    assert_told_once(
        caplog,
        "free space below the reserve: refusing new work",
        "free space above the reserve again: accepting new work",
    )


async def test_a_file_system_turned_read_only_refuses_writes_and_keeps_what_it_acknowledged(
    start_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file system under the database turns read-only (ext4 does so on a disk error):
    writes are refused as unavailable while reads are answered. Such a file system stays
    read-only until it is mounted again, so the server cannot recover by itself; a server
    started once it is writable finds everything the first acknowledged."""
    caplog.set_level(logging.INFO, logger="opscore")
    with ext4_image(tmp_path / "disk") as disk:
        async with on_disk(start_server, disk.mountpoint, sqlite_free_space_reserve=0) as (
            server,
            client,
            health,
        ):
            ledger = Ledger(client)
            await client.create(definition("one", task("t")))
            holder = await client.agent("holder")
            held = await held_by(holder, ledger)
            disk.turn_read_only()

            unavailable = Refusal(UNAVAILABLE, "STORAGE_UNAVAILABLE", 1.0)
            assert [await ledger.trigger("one") for _ in range(3)] == [unavailable] * 3
            await health.until(NOT_SERVING)
            assert await outcome(complete(holder, held)) == unavailable
            assert (await client.run(ledger.run_ids[0])).state == workflow_pb2.RUN_STATE_RUNNING
            await asyncio.sleep(1.5)  # the probes find it still read-only
            assert health.seen[-1] == NOT_SERVING
            assert not server.failed
        disk.mount_again()
        async with on_disk(start_server, disk.mountpoint, sqlite_free_space_reserve=0) as (
            server,
            client,
            _,
        ):
            await Ledger(client, ledger.run_ids).check_all_kept()
            [kept] = (await client.run(ledger.run_ids[0])).tasks
            assert (kept.state, kept.attempt) == (workflow_pb2.TASK_STATE_ASSIGNED, 1)
    assert_told_once(caplog, OUTAGE[0])


postgres_only = pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set")


def through(url: str, port: int) -> str:
    """`url` with its host and port those of a proxy on loopback."""
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def target_of(url: str) -> tuple[str, int]:
    parsed = make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


@postgres_only
async def test_a_database_outage_gives_unavailable_then_recovers_by_itself(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opscore")
    async with (
        postgres_database() as url,
        proxy(target_of(url)) as cut_here,
        start_server(through(url, cut_here.port)) as server,
        connect(server.port) as client,
        watching(client.channel) as health,
    ):
        unavailable = Refusal(UNAVAILABLE, "STORAGE_UNAVAILABLE", 1.0)
        await ride_out(
            server, client, health, unavailable, cut_here.cut, cut_here.start, reads=unavailable
        )
    assert_told_once(caplog, *OUTAGE)


async def terminate_backends(url: str) -> int:
    """End every session of `url`'s database (its server's connections); how many."""
    admin = await asyncpg.connect(asyncpg_dsn(POSTGRES_URL))
    try:
        ended = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            make_url(url).database,
        )
    finally:
        await admin.close()
    return len(ended)


async def trigger_unseen(url: str, workflow: str) -> str:
    """Trigger a run through a store of its own, which the server does not hear of: as a write
    whose commit succeeded while its caller's connection died looks to the server."""
    database = open_database(url)
    writer = Writer(database)
    running = asyncio.create_task(writer.run())
    try:
        run = await Store(database, writer, Settings().rules()).runs.create_run(
            NewRun("", workflow, None, "", {}, "", datetime.now(UTC), lambda _: None)
        )
    finally:
        writer.close()
        await running
        await database.dispose()
    return run.run_id


@postgres_only
async def test_killed_connections_cost_callers_a_retry_and_nothing_else(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Every session of the server's is ended, three times: the calls that were on them are
    refused as unavailable, the next ones go through. After an outage the server also reads
    its queue again, and dispatches what it had not heard of."""
    caplog.set_level(logging.INFO, logger="opscore")
    async with (
        postgres_database() as url,
        start_server(url) as server,
        connect(server.port) as client,
        watching(client.channel) as health,
    ):
        ledger = Ledger(client)
        await client.create(definition("one", task("t", capability="work")))
        worker = await client.agent("worker", capabilities=["work"], max_concurrent_tasks=100)
        ledger.run_ids.append(await trigger_unseen(url, "one"))
        refusals: list[Refusal] = []
        for _ in range(3):
            assert await terminate_backends(url) > 0
            outcomes = await asyncio.gather(*(ledger.trigger("one") for _ in range(10)))
            refusals.extend(found for found in outcomes if found is not None)
        assert refusals
        assert set(refusals) == {Refusal(UNAVAILABLE, "STORAGE_UNAVAILABLE", 1.0)}
        assert await ledger.trigger("one") is None
        await ledger.check_all_kept()
        received = set()
        async with asyncio.timeout(WAIT):
            while len(received) < len(ledger.run_ids):
                received.add((await worker.next_assignment()).run_id)
        assert received == set(ledger.run_ids)
        assert health.seen[-1] == SERVING
        assert not server.failed
    assert told(caplog, "storage recovered")
    assert_no_error_logged(caplog)


@postgres_only
async def test_a_dropped_database_stops_the_server_with_one_critical_line(tmp_path: Path) -> None:
    """A database that is gone (dropped, corrupt, or refusing the server's credentials) will not
    come back by retrying: the server says so once, at CRITICAL, and exits with status 1."""
    async with postgres_database() as url:
        port = free_port()
        server = ServerProcess(
            ["--listen", f"127.0.0.1:{port}", "--db", url],
            port=port,
            log=tmp_path / "server.log",
            cwd=tmp_path,
            environment=clean_environment(OPSCORE_SHUTDOWN_GRACE="1"),
        )
        async with server, connect(port) as client:
            await client.agent("a", connect=False)
            admin = await asyncpg.connect(asyncpg_dsn(POSTGRES_URL))
            try:
                await admin.execute(f'DROP DATABASE "{make_url(url).database}" WITH (FORCE)')
            finally:
                await admin.close()
            refusals = set()
            async with asyncio.timeout(WAIT):
                while server.returncode is None:
                    refusals.add(await outcome(client.agent("b", connect=False)))
                    await asyncio.sleep(0.05)
            assert await server.wait() == 1
    assert refusals <= {
        Refusal(UNAVAILABLE, "STORAGE_UNAVAILABLE", 1.0),
        Refusal(UNAVAILABLE, "STORAGE_LOST", 5.0),
        Refusal(UNAVAILABLE, "", None),  # the server had stopped listening
    }
    records = server.log_records()
    [critical] = [r for r in records if r["level"] == "CRITICAL"]
    assert (critical["event"], critical["reason"]) == (
        "storage lost: the server stops",
        "STORAGE_LOST",
    )
    assert "does not exist" in critical["cause"]
    assert not [r for r in records if "exception" in r]
