"""Agents that never read their task stream, and agents whose attempts keep expiring: bounded
buffers, stalled streams closed, quarantine, and a quiet log when such an agent goes away."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import grpc
import pytest
from conftest import ServerFactory, serve
from helpers import WAIT, Agent, Client, connect, definition, status_of, task
from opscore.v1 import agent_lifecycle_pb2, agent_pb2, workflow_service_pb2

from opscore.streams import StreamLimits

BIG = {"blob": "x" * 200_000}
"""An input large enough that a few assignments fill a client's flow-control window."""


async def _silent(client: Client, agent_id: str, slots: int) -> Any:
    """Register an agent and open its task stream without ever reading it; the call."""
    await client.agent(agent_id, capabilities=["work"], max_concurrent_tasks=slots, connect=False)
    call = client.workflows.StreamTasks(workflow_service_pb2.StreamTasksRequest(agent_id=agent_id))
    async with asyncio.timeout(WAIT):
        while not (await _agent(client, agent_id)).connected:
            await asyncio.sleep(0.01)
    return call


async def _agent(client: Client, agent_id: str) -> agent_pb2.Agent:
    response = await client.lifecycle.GetAgent(
        agent_lifecycle_pb2.GetAgentRequest(agent_id=agent_id)
    )
    return response.agent


async def _read_to_end(call: Any) -> None:
    async for _ in call:
        pass


async def _trigger(client: Client, runs: int, **spec: Any) -> list[str]:
    created = await client.create(definition("work", task("t", capability="work", **spec)))
    return [(await client.trigger(definition_id=created.definition_id)).run_id for _ in range(runs)]


async def test_an_agent_whose_stream_does_not_drain_gets_no_more_work(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    limits = StreamLimits(max_messages=4, max_bytes=1 << 30, stall_timeout=60)
    async with start_server(sqlite_url, streams=limits) as server, connect(server.port) as client:
        await _silent(client, "silent", slots=100)
        run_ids = await _trigger(client, 40, input=BIG)
        engine = server.engine
        assert engine is not None
        async with asyncio.timeout(WAIT):
            while not (stream := engine.streams.get("silent")) or not stream.backlogged:
                await asyncio.sleep(0.01)
        # Over its bound, the silent agent is not idle: a reading agent gets the rest.
        worker = await client.agent("reader", capabilities=["work"], max_concurrent_tasks=100)
        taken = 0
        while taken < 5:
            await worker.complete(await worker.next_assignment())
            taken += 1
        held = (await _agent(client, "silent")).running_tasks
        assert stream.buffered_messages <= limits.max_messages
        assert held < len(run_ids)


async def test_a_stalled_stream_is_closed_with_stream_stalled(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    limits = StreamLimits(max_messages=1000, max_bytes=1 << 30, stall_timeout=0.5)
    async with (
        start_server(sqlite_url, streams=limits, agent_grace=timedelta(seconds=60)) as server,
        connect(server.port) as client,
    ):
        call = await _silent(client, "stalled", slots=100)
        await _trigger(client, 60, input=BIG)
        async with asyncio.timeout(WAIT):
            while (await _agent(client, "stalled")).connected:
                await asyncio.sleep(0.05)
        seen = await _agent(client, "stalled")
        # Disconnected: its tasks wait out the grace period, as when any stream closes.
        assert seen.state == agent_pb2.AGENT_STATE_OFFLINE
        assert seen.running_tasks > 0
        # Once it reads again it is given what was in flight, then the status.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(_read_to_end(call), WAIT)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        status = status_of(ended.value)
        assert status is not None
        assert any(b"STREAM_STALLED" in detail.value for detail in status.details)


async def test_an_agent_whose_leases_keep_expiring_is_quarantined_until_idle_or_registered(
    start_server: ServerFactory, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="opscore.engine")
    async with serve(
        start_server,
        db_url,
        quarantine_after=2,
        default_task_timeout=timedelta(seconds=0.3),
    ) as client:
        agent = await client.agent("sleepy", capabilities=["work"], max_concurrent_tasks=2)
        await _trigger(client, 2)
        quarantined = await agent.wait_until(lambda a: a.state == agent_pb2.AGENT_STATE_ERROR)
        assert "2 task leases expired in a row" in quarantined.state_detail
        listed = await client.lifecycle.ListAgents(
            agent_lifecycle_pb2.ListAgentsRequest(state=agent_pb2.AGENT_STATE_ERROR)
        )
        assert [a.agent_id for a in listed.agents] == ["sleepy"]
        [warning] = [r for r in caplog.records if r.getMessage() == "agent quarantined"]
        assert (warning.levelname, warning.agent_id) == ("WARNING", "sleepy")
        # Quarantined, it takes no new work, not even its own tasks' retries.
        await _drain(agent)
        await agent.expect_nothing()

        # Reporting IDLE lifts it: the retries come to it.
        assert (await agent.report(agent_pb2.AGENT_STATE_IDLE)).state_detail == ""
        retried = await agent.next_assignment()
        assert retried.attempt == 2
        await agent.complete(retried)

        # Expiring again from zero after that success; registering again lifts it too.
        await agent.wait_until(lambda a: a.state == agent_pb2.AGENT_STATE_ERROR)
        registered = await client.lifecycle.RegisterAgent(
            agent_lifecycle_pb2.RegisterAgentRequest(
                agent_id="sleepy", capabilities=["work"], max_concurrent_tasks=2
            )
        )
        assert registered.agent.state != agent_pb2.AGENT_STATE_ERROR
        assert registered.agent.state_detail == ""


async def _drain(agent: Agent) -> None:
    """Take the events already on the stream (assignments and their cancellations)."""
    while not agent.events.empty():
        agent.events.get_nowait()


async def test_an_agent_leaving_with_a_blocked_stream_leaves_no_error_in_the_log(
    start_server: ServerFactory, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with start_server(sqlite_url) as server, connect(server.port) as client:
        call = await _silent(client, "leaving", slots=100)
        await _trigger(client, 40, input=BIG)
        # 8 MB of assignments: more than the client's window takes, so a write is waiting.
        async with asyncio.timeout(WAIT):
            while (await _agent(client, "leaving")).running_tasks < 40:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        call.cancel()
        async with asyncio.timeout(WAIT):
            while (await _agent(client, "leaving")).connected:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # room for gRPC to log what it would
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_success_breaks_the_row_and_the_count_survives_a_restart(
    start_server: ServerFactory, db_url: str
) -> None:
    short = {"quarantine_after": 2, "default_task_timeout": timedelta(seconds=0.3)}
    async with serve(start_server, db_url, **short) as client:
        agent = await client.agent("flaky", capabilities=["work"])
        await _trigger(client, 1)
        assert (await agent.next_assignment()).attempt == 1
        await agent.next_cancellation()  # expired: one in a row
        retried = await agent.next_assignment()
        await agent.complete(retried)  # a success: the row starts again
        await _trigger(client, 1)
        await agent.next_assignment()
        await agent.next_cancellation()  # one in a row again, not two
        assert (await agent.get()).state != agent_pb2.AGENT_STATE_ERROR
    async with serve(start_server, db_url, **short) as client:
        # The retry of that attempt, redelivered or sent anew, expires too: two in a row,
        # counted across the restart.
        agent = Agent(client, "flaky")
        await agent.connect()
        quarantined = await agent.wait_until(lambda a: a.state == agent_pb2.AGENT_STATE_ERROR)
        assert "2 task leases expired in a row" in quarantined.state_detail
