"""Agent tokens over real channels: issued by registration, rotated by registering again (the old
token stops at once, and a stream opened with it ends), revoked by deregistration; configured
tokens from files, named in audit lines, reread on reload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import auth
import grpc
import pytest
from conftest import ServerFactory
from helpers import WAIT, definition, refused, task
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

lc = agent_lifecycle_pb2
ws = workflow_service_pb2
Code = grpc.StatusCode


class Caller:
    """Both stubs on a channel without credentials of its own: each call names its token."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)

    async def register(self, agent_id: str, token: str) -> str:
        """Register `agent_id` with `token`; the agent token it is issued."""
        registered = await self.lifecycle.RegisterAgent(
            lc.RegisterAgentRequest(agent_id=agent_id, capabilities=["work"]),
            metadata=auth.bearer(token),
        )
        return registered.agent_token

    async def heartbeat(self, agent_id: str, token: str) -> Any:
        return await self.lifecycle.Heartbeat(
            lc.HeartbeatRequest(agent_id=agent_id), metadata=auth.bearer(token)
        )

    async def stream(self, agent_id: str, token: str) -> Any:
        """An open task stream of `agent_id`, opened with `token`."""
        call = self.workflows.StreamTasks(
            ws.StreamTasksRequest(agent_id=agent_id), metadata=auth.bearer(token)
        )
        await asyncio.wait_for(call.initial_metadata(), WAIT)
        assert not call.done(), f"the stream was refused: {await call.code()}"
        return call

    async def trigger_pinned(self, agent_id: str) -> str:
        operator = auth.bearer(auth.OPERATOR_TOKEN)
        created = await self.workflows.CreateWorkflowDefinition(
            ws.CreateWorkflowDefinitionRequest(
                definition=definition("one", task("t", capability="work"))
            ),
            metadata=operator,
        )
        run = await self.workflows.TriggerWorkflow(
            ws.TriggerWorkflowRequest(
                definition_id=created.definition.definition_id, agent_id=agent_id
            ),
            metadata=operator,
        )
        return run.run.run_id


@pytest.fixture
async def caller(start_server: ServerFactory, migrated_url: str) -> AsyncIterator[Caller]:
    async with (
        start_server(migrated_url, registration_token=auth.REGISTRATION_TOKEN) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        yield Caller(channel)


async def ended_with(call: Any) -> Code:
    """Read a stream to its end (bounded); the status it ended with."""
    async with asyncio.timeout(WAIT):
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass
    code: Code = await call.code()
    return code


async def test_registering_again_rotates_the_token_and_ends_its_stream(caller: Caller) -> None:
    first = await caller.register("a", auth.REGISTRATION_TOKEN)
    assert first.startswith("opscore_agent_")
    stream = await caller.stream("a", first)
    await caller.trigger_pinned("a")
    held = (await stream.read()).assignment

    second = await caller.register("a", auth.REGISTRATION_TOKEN)
    assert second != first
    assert await ended_with(stream) == Code.UNAUTHENTICATED
    await refused(caller.heartbeat("a", first), Code.UNAUTHENTICATED, "the rotated token")
    await caller.heartbeat("a", second)
    # The new token's stream is sent what the agent held: nothing was lost to the rotation.
    renewed = await caller.stream("a", second)
    redelivered = (await renewed.read()).assignment
    assert (redelivered.task_id, redelivered.attempt) == (held.task_id, held.attempt)
    assert redelivered.redelivered
    renewed.cancel()


async def test_a_stream_the_operator_opened_outlives_a_rotation(caller: Caller) -> None:
    await caller.register("a", auth.REGISTRATION_TOKEN)
    stream = await caller.stream("a", auth.OPERATOR_TOKEN)
    await caller.register("a", auth.OPERATOR_TOKEN)
    await caller.trigger_pinned("a")
    assert (await asyncio.wait_for(stream.read(), WAIT)).HasField("assignment")
    stream.cancel()


async def test_deregistering_revokes_the_token(caller: Caller) -> None:
    token = await caller.register("a", auth.REGISTRATION_TOKEN)
    await caller.lifecycle.DeregisterAgent(
        lc.DeregisterAgentRequest(agent_id="a"), metadata=auth.bearer(token)
    )
    await refused(caller.heartbeat("a", token), Code.UNAUTHENTICATED, "a deregistered agent")


async def test_tokens_survive_a_restart(start_server: ServerFactory, sqlite_url: str) -> None:
    async with (
        start_server(sqlite_url) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        token = await Caller(channel).register("a", auth.OPERATOR_TOKEN)
    async with (
        start_server(sqlite_url) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        await Caller(channel).heartbeat("a", token)


def token_file(path: Path, *lines: str) -> str:
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"


async def test_operator_actions_are_audited_by_name_never_by_secret(
    start_server: ServerFactory, sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = token_file(tmp_path / "operators", "# who may operate", f"alice {ALICE}", "", BOB)
    caplog.set_level(logging.DEBUG)
    async with (
        start_server(sqlite_url, operator_token="", operator_token_file=tokens) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        caller = Caller(channel)
        agent_token = await caller.register("a", ALICE)
        alice = auth.bearer(ALICE)
        created = await caller.workflows.CreateWorkflowDefinition(
            ws.CreateWorkflowDefinitionRequest(definition=definition("one", task("t"))),
            metadata=alice,
        )
        run = await caller.workflows.TriggerWorkflow(
            ws.TriggerWorkflowRequest(definition_id=created.definition.definition_id),
            metadata=alice,
        )
        await caller.workflows.CancelWorkflowRun(
            ws.CancelWorkflowRunRequest(run_id=run.run.run_id), metadata=auth.bearer(BOB)
        )
        await caller.lifecycle.DeregisterAgent(
            lc.DeregisterAgentRequest(agent_id="a"), metadata=alice
        )
    audited = [
        (record.getMessage(), record.__dict__.get("caller"))
        for record in caplog.records
        if record.name == "opscore.audit"
    ]
    bob = f"operator:token-{hashlib.sha256(BOB.encode()).hexdigest()[:8]}"
    assert audited == [
        ("agent token issued", "operator:alice"),
        ("definition created", "operator:alice"),
        ("run triggered", "operator:alice"),
        ("run cancelled", bob),
        ("agent deregistered", "operator:alice"),
    ]
    for record in caplog.records:
        text = f"{record.getMessage()} {record.__dict__}"
        for secret in (ALICE, BOB, agent_token):
            assert secret not in text, record


async def test_token_files_are_reread_on_reload(
    start_server: ServerFactory, sqlite_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "operators"
    tokens = token_file(path, ALICE)
    async with (
        start_server(sqlite_url, operator_token="", operator_token_file=tokens) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        caller = Caller(channel)
        await caller.register("a", ALICE)
        token_file(path, BOB)  # rotated: Bob's replaces Alice's
        server.reload()
        await caller.register("a", BOB)
        await refused(caller.register("a", ALICE), Code.UNAUTHENTICATED, "a removed token")
        token_file(path, "short")  # a bad file keeps what worked
        server.reload()
        await caller.register("a", BOB)
