"""Limits no client can exhaust, over real channels: per-caller rates on triggers and
registrations (RESOURCE_EXHAUSTED with a RetryInfo saying when), the streams and calls the
server takes at once, and a well-behaved agent served while another client floods."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import auth
import grpc
from conftest import ServerFactory
from google.rpc import error_details_pb2
from helpers import WAIT, definition, reason_of, refused, status_of, struct, task
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from opscore.domain.quotas import Rate

lc = agent_lifecycle_pb2
ws = workflow_service_pb2
Code = grpc.StatusCode

FLOODER = "flooder-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"


def retry_delay(error: grpc.aio.AioRpcError) -> timedelta:
    """The RetryInfo delay an error carries (failing the test without one)."""
    status = status_of(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta()
    raise AssertionError(f"no RetryInfo: {error.details()}")


async def test_triggers_beyond_a_callers_rate_are_refused_with_when_to_retry(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, trigger_rate=Rate(per_second=1, burst=3)) as server,
        auth.channel(f"127.0.0.1:{server.port}") as channel,
    ):
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        trigger = ws.TriggerWorkflowRequest(definition=definition("w", task("t")))
        for _ in range(3):
            await workflows.TriggerWorkflow(trigger)
        error = await refused(workflows.TriggerWorkflow(trigger), Code.RESOURCE_EXHAUSTED)
        assert reason_of(error) == "RATE_LIMITED"
        assert timedelta(0) < retry_delay(error) <= timedelta(seconds=1)
        # Another caller has a rate of its own.
        registered = await agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel).RegisterAgent(
            lc.RegisterAgentRequest(agent_id="a")
        )
        assert registered.agent_token


async def test_registrations_beyond_a_callers_rate_are_refused(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, register_rate=Rate(per_second=1, burst=2)) as server,
        auth.channel(f"127.0.0.1:{server.port}") as channel,
    ):
        lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        for agent_id in ("a", "b"):
            await lifecycle.RegisterAgent(lc.RegisterAgentRequest(agent_id=agent_id))
        error = await refused(
            lifecycle.RegisterAgent(lc.RegisterAgentRequest(agent_id="c")), Code.RESOURCE_EXHAUSTED
        )
        assert reason_of(error) == "RATE_LIMITED"
        assert retry_delay(error) > timedelta(0)


async def test_streams_beyond_the_servers_limit_are_refused_until_one_ends(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, max_streams=2) as server,
        auth.channel(f"127.0.0.1:{server.port}") as channel,
    ):
        lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        streams = []
        for agent_id in ("a", "b", "c"):
            await lifecycle.RegisterAgent(lc.RegisterAgentRequest(agent_id=agent_id))
            call = workflows.StreamTasks(ws.StreamTasksRequest(agent_id=agent_id))
            await asyncio.wait_for(call.initial_metadata(), WAIT)
            streams.append(call)
        assert [call.done() for call in streams] == [False, False, True]
        assert await streams[2].code() == Code.RESOURCE_EXHAUSTED
        streams[0].cancel()
        async with asyncio.timeout(WAIT):
            while True:  # the slot comes back once the server has seen the stream end
                again = workflows.StreamTasks(ws.StreamTasksRequest(agent_id="c"))
                await again.initial_metadata()
                if not again.done():
                    break
                await asyncio.sleep(0.01)
        again.cancel()
        streams[1].cancel()


async def test_calls_beyond_the_servers_limit_are_refused_with_when_to_retry(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, max_concurrent_calls=1) as server,
        auth.channel(f"127.0.0.1:{server.port}") as channel,
    ):
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        answers = await asyncio.gather(
            *(workflows.ListWorkflowRuns(ws.ListWorkflowRunsRequest()) for _ in range(50)),
            return_exceptions=True,
        )
        errors = [answer for answer in answers if isinstance(answer, grpc.aio.AioRpcError)]
        assert errors, "50 calls at once never overlapped"
        assert len(errors) < len(answers)
        for error in errors:
            assert error.code() == Code.RESOURCE_EXHAUSTED
            assert reason_of(error) == "OVERLOADED"
            assert retry_delay(error) > timedelta(0)


async def flood(workflows: Any, token: str, stop: asyncio.Event, refusals: list[Any]) -> int:
    """Trigger as fast as one connection allows until `stop`; the triggers accepted."""
    request = ws.TriggerWorkflowRequest(
        definition=definition("flood", task("t", capability="nobody-has-this"))
    )
    accepted = 0
    while not stop.is_set():
        try:
            await workflows.TriggerWorkflow(request, metadata=auth.bearer(token))
            accepted += 1
        except grpc.aio.AioRpcError as error:
            refusals.append(error)
    return accepted


async def test_a_flooding_client_does_not_starve_a_well_behaved_agent(
    start_server: ServerFactory, sqlite_url: str, tmp_path: Path
) -> None:
    tokens = tmp_path / "operators"
    tokens.write_text(f"flooder {FLOODER}\noperator {OPERATOR}\n")
    async with (
        start_server(
            sqlite_url,
            operator_token="",
            operator_token_file=str(tokens),
            trigger_rate=Rate(per_second=20, burst=20),
        ) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as flooding,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        operator = auth.bearer(OPERATOR)
        registered = await lifecycle.RegisterAgent(
            lc.RegisterAgentRequest(agent_id="good", capabilities=["work"]), metadata=operator
        )
        agent = auth.bearer(registered.agent_token)
        stream = workflows.StreamTasks(ws.StreamTasksRequest(agent_id="good"), metadata=agent)
        await asyncio.wait_for(stream.initial_metadata(), WAIT)

        stop = asyncio.Event()
        refusals: list[Any] = []
        flooders = [
            asyncio.create_task(
                flood(
                    workflow_service_pb2_grpc.WorkflowServiceStub(flooding), FLOODER, stop, refusals
                )
            )
            for _ in range(16)
        ]
        try:
            work = ws.TriggerWorkflowRequest(
                definition=definition("work", task("t", capability="work")), input=struct({})
            )
            for _ in range(15):  # within the operator's own rate: none is refused
                run = (await workflows.TriggerWorkflow(work, metadata=operator)).run
                assignment = (await asyncio.wait_for(stream.read(), WAIT)).assignment
                assert assignment.run_id == run.run_id
                await workflows.CompleteTask(
                    ws.CompleteTaskRequest(
                        task_id=assignment.task_id, agent_id="good", attempt=assignment.attempt
                    ),
                    metadata=agent,
                )
                done = await workflows.GetWorkflowRun(
                    ws.GetWorkflowRunRequest(run_id=run.run_id), metadata=operator
                )
                assert done.run.state == workflow_pb2.RUN_STATE_SUCCEEDED
        finally:
            stop.set()
            accepted = sum(await asyncio.gather(*flooders))
            stream.cancel()
        assert refusals, "the flood was never limited"
        assert {error.code() for error in refusals} == {Code.RESOURCE_EXHAUSTED}
        assert {reason_of(error) for error in refusals} == {"RATE_LIMITED"}
        assert accepted >= 20  # its burst, at least
