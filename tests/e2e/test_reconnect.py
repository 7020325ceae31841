"""An agent that reconnects while its old connection is being torn down stays connected: the
old stream's end must not undo the new stream's connection, nor start a grace period that
would take the agent's tasks away."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import auth
from conftest import ServerFactory
from helpers import WAIT, Agent, Client, definition, expect_quiet, task
from opscore.v1 import workflow_pb2


async def test_reconnect_racing_the_old_streams_end_keeps_the_agent(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    grace = timedelta(seconds=0.3)
    async with (
        start_server(sqlite_url, agent_grace=grace) as server,
        auth.channel(f"127.0.0.1:{server.port}") as channel,
    ):
        client = Client(channel, server)
        agent = await client.agent("racer", capabilities=["work"])
        marker = await client.agent("marker", capabilities=["mark"])
        run = await client.trigger(definition=definition("race", task("t", capability="work")))
        marked = await client.trigger(definition=definition("mark", task("m", capability="mark")))
        held = await agent.next_assignment()
        await marker.next_assignment()
        for attempt in range(24):
            old_call = agent._call
            fresh = Agent(client, "racer")
            # The new stream's request goes out, then the old stream's cancellation, a little
            # later each time, so that some land while the new stream's open is committing.
            opening = asyncio.create_task(fresh.connect())
            await asyncio.sleep((attempt % 8) * 0.0005)
            old_call.cancel()
            await opening
            agent = fresh
            redelivered = await agent.next_assignment()
            assert (redelivered.task_id, redelivered.attempt) == (held.task_id, held.attempt)
        # An old stream ending after its replacement opened writes nothing: once the server has
        # settled, what it holds of the racer is final.
        await expect_quiet(agent)
        assert (await agent.get()).connected

        # A grace that starts after every one the racer's old streams could have started:
        # once the marker has lost its task to it, the racer would have lost its own.
        await marker.disconnect()
        async with asyncio.timeout(WAIT):
            while (await client.run(marked.run_id)).tasks[0].state != (
                workflow_pb2.TASK_STATE_QUEUED
            ):
                await asyncio.sleep(0.02)
        seen = await agent.get()
        assert seen.connected
        current = await client.run(run.run_id)
        assert (current.tasks[0].state, current.tasks[0].attempt) == (
            workflow_pb2.TASK_STATE_ASSIGNED,
            1,
        )
        await agent.complete(held, {"done": True})
        await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        await agent.disconnect()
