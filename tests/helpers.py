"""Test helpers: a scripted agent over a real task stream, a client on a channel to a server, and
small builders for requests and checks of answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

import auth
import grpc
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    agent_pb2,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from opscore.server import OpsCoreServer

WAIT = 5.0
"""Seconds a helper waits for something that should happen at once, before failing the test."""

SERVER_FAULTS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
"""Statuses a server answers only when it fails: never a refusal the contract allows."""


def struct(value: Mapping[str, Any] | None = None) -> Struct:
    """A Struct from a dict."""
    message = Struct()
    message.update(dict(value or {}))
    return message


def as_dict(message: Struct) -> dict[str, Any]:
    """A Struct as a dict."""
    return json_format.MessageToDict(message)


def seconds(value: float) -> Duration:
    """A Duration of `value` seconds (negative allowed)."""
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=value))
    return duration


def task(
    name: str,
    *,
    capability: str = "",
    depends_on: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
    input: Mapping[str, Any] | None = None,  # noqa: A002 - the field's name
    fallback: str = "",
) -> workflow_pb2.TaskSpec:
    """A TaskSpec."""
    return workflow_pb2.TaskSpec(
        name=name,
        capability=capability,
        depends_on=list(depends_on),
        labels=dict(labels or {}),
        input=struct(input),
        fallback=fallback,
    )


def definition(name: str, *tasks: workflow_pb2.TaskSpec) -> workflow_pb2.WorkflowDefinition:
    """A WorkflowDefinition."""
    return workflow_pb2.WorkflowDefinition(workflow_name=name, tasks=list(tasks))


def tasks_of(run: workflow_pb2.WorkflowRun) -> dict[str, workflow_pb2.TaskRun]:
    """A run's tasks by name."""
    return {task_run.name: task_run for task_run in run.tasks}


def complete_request(
    assignment: workflow_pb2.TaskAssignment,
    agent_id: str,
    *,
    attempt: int | None = None,
    output: Mapping[str, Any] | None = None,
) -> workflow_service_pb2.CompleteTaskRequest:
    """A CompleteTaskRequest for an assignment, from any agent, for its attempt or another."""
    return workflow_service_pb2.CompleteTaskRequest(
        task_id=assignment.task_id,
        agent_id=agent_id,
        attempt=assignment.attempt if attempt is None else attempt,
        output=struct(output),
    )


async def refused(
    call: Awaitable[Any], code: grpc.StatusCode, what: str = "the call"
) -> grpc.aio.AioRpcError:
    """Await a call that must fail with `code` (and so never with a server fault); returns the
    error. `what` names the call in the test's failure message."""
    error: grpc.aio.AioRpcError | None = None
    try:
        await call
    except grpc.aio.AioRpcError as caught:
        error = caught
    assert error is not None, f"{what} returned OK; expected {code.name}"
    assert error.code() not in SERVER_FAULTS, f"{what}: {error.code()}: {error.details()}"
    assert error.code() == code, f"{what}: {error.code()}: {error.details()}"
    return error


def bad_request(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations in an error's status details, field -> description."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status details"
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            found = error_details_pb2.BadRequest()
            detail.Unpack(found)
            violations.update({v.field: v.description for v in found.field_violations})
    return violations


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The google.rpc.Status an error carries, if any."""
    return rpc_status.from_call(error)  # type: ignore[arg-type]


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The `ErrorInfo` reason an error carries (failing the test if it carries none)."""
    status = status_of(error)
    assert status is not None, f"no google.rpc.Status details: {error.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "opscore.v1", info
            return info.reason
    raise AssertionError(f"no ErrorInfo in the details: {error.details()}")


def resource_of(error: grpc.aio.AioRpcError) -> tuple[str, str] | None:
    """The (resource_type, resource_name) of the `ResourceInfo` an error carries, if any."""
    status = status_of(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            return info.resource_type, info.resource_name
    return None


class Agent:
    """A scripted agent: registered, with an open task stream whose events are collected."""

    def __init__(self, client: Client, agent_id: str) -> None:
        self.client = client
        self.agent_id = agent_id
        self.events: asyncio.Queue[workflow_service_pb2.StreamTasksResponse] = asyncio.Queue()
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.stream_error: grpc.aio.AioRpcError | None = None
        self.stream_ended = asyncio.Event()
        self.received = 0
        """Events received on the current stream (the one `connect` opened last)."""
        self._arrived = asyncio.Event()

    async def connect(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        """Open the task stream (with `metadata`'s credentials instead of the channel's, if it
        has some) and wait until the server counts the agent as connected."""
        self.stream_ended.clear()
        self.received = 0
        self._call = self.client.workflows.StreamTasks(
            workflow_service_pb2.StreamTasksRequest(agent_id=self.agent_id), metadata=metadata
        )
        self._reader = asyncio.create_task(self._read(self._call))
        async with asyncio.timeout(WAIT):
            while not (await self.get()).connected:
                await asyncio.sleep(0.01)

    async def _read(self, call: Any) -> None:
        try:
            async for event in call:
                await self.events.put(event)
                if call is self._call:
                    self.received += 1
                    self._arrived.set()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.stream_error = error
        finally:
            self.stream_ended.set()
            self._arrived.set()

    async def disconnect(self) -> None:
        """Close the task stream from the agent's side."""
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def wait_stream_ended(self, timeout: float = WAIT) -> grpc.StatusCode:
        """Wait (bounded) until the task stream has ended; the status it ended with."""
        await asyncio.wait_for(self.stream_ended.wait(), timeout)
        assert self.stream_error is not None, f"{self.agent_id}: the stream ended without status"
        return self.stream_error.code()

    async def get(self) -> agent_pb2.Agent:
        """The agent as the server sees it."""
        response = await self.client.lifecycle.GetAgent(
            agent_lifecycle_pb2.GetAgentRequest(agent_id=self.agent_id)
        )
        return response.agent

    async def next_event(self, timeout: float = WAIT) -> workflow_service_pb2.StreamTasksResponse:
        """The next event on the stream; fails the test if none comes in time."""
        return await asyncio.wait_for(self.events.get(), timeout)

    async def next_assignment(self, timeout: float = WAIT) -> workflow_pb2.TaskAssignment:
        """The next event, which must be an assignment."""
        event = await self.next_event(timeout)
        assert event.WhichOneof("event") == "assignment", event
        return event.assignment

    async def next_cancellation(self, timeout: float = WAIT) -> workflow_pb2.TaskCancellation:
        """The next event, which must be a cancellation."""
        event = await self.next_event(timeout)
        assert event.WhichOneof("event") == "cancellation", event
        return event.cancellation

    async def wait_until(
        self, predicate: Callable[[agent_pb2.Agent], bool], timeout: float = WAIT
    ) -> agent_pb2.Agent:
        """Poll GetAgent until `predicate` holds of the agent; fails the test after `timeout`."""
        async with asyncio.timeout(timeout):
            while True:
                seen = await self.get()
                if predicate(seen):
                    return seen
                await asyncio.sleep(0.02)

    async def expect_nothing(self) -> None:
        """Assert that the server has sent this agent nothing it has not read (see
        `expect_quiet`)."""
        await expect_quiet(self)

    async def caught_up(self, server: OpsCoreServer) -> None:
        """Wait until the agent has received every event the server queued on its stream (the
        server's current stream for this agent, if it is the one this agent opened last)."""
        stream = None if server.engine is None else server.engine.streams.get(self.agent_id)
        if stream is None or self._call is None:
            return
        while self.received < stream.pushed and not self.stream_ended.is_set():
            self._arrived.clear()
            await self._arrived.wait()

    async def complete(
        self, assignment: workflow_pb2.TaskAssignment, output: Mapping[str, Any] | None = None
    ) -> None:
        """Report the assignment's success."""
        await self.client.workflows.CompleteTask(
            complete_request(assignment, self.agent_id, output=output)
        )

    async def fail(
        self, assignment: workflow_pb2.TaskAssignment, error: str, *, retryable: bool = False
    ) -> None:
        """Report the assignment's failure."""
        await self.client.workflows.FailTask(
            workflow_service_pb2.FailTaskRequest(
                task_id=assignment.task_id,
                agent_id=self.agent_id,
                attempt=assignment.attempt,
                error=error,
                retryable=retryable,
            )
        )

    async def report(self, state: int, detail: str = "") -> agent_pb2.Agent:
        """Report a state (an agent_pb2.AGENT_STATE_* value)."""
        response = await self.client.lifecycle.ReportState(
            agent_lifecycle_pb2.ReportStateRequest(
                agent_id=self.agent_id, state=state, detail=detail
            )
        )
        return response.agent


class Client:
    """Both service stubs on one channel, and factories for agents, definitions and runs."""

    def __init__(self, channel: grpc.aio.Channel, server: OpsCoreServer | None = None) -> None:
        self.channel = channel
        self.server = server
        """The server on the other end, when it runs in this process (`expect_quiet` asks it
        whether it has settled)."""
        self.lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        self._agents: list[Agent] = []

    async def agent(
        self,
        agent_id: str,
        *,
        capabilities: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        max_concurrent_tasks: int = 0,
        connect: bool = True,
    ) -> Agent:
        """Register an agent and (by default) open its task stream."""
        await self.lifecycle.RegisterAgent(
            agent_lifecycle_pb2.RegisterAgentRequest(
                agent_id=agent_id,
                name=agent_id,
                version="1.0",
                capabilities=list(capabilities),
                labels=dict(labels or {}),
                max_concurrent_tasks=max_concurrent_tasks,
            )
        )
        agent = Agent(self, agent_id)
        self._agents.append(agent)
        if connect:
            await agent.connect()
        return agent

    async def create(
        self, definition: workflow_pb2.WorkflowDefinition, request_id: str = ""
    ) -> workflow_pb2.WorkflowDefinition:
        """Create a workflow definition."""
        response = await self.workflows.CreateWorkflowDefinition(
            workflow_service_pb2.CreateWorkflowDefinitionRequest(
                definition=definition, request_id=request_id
            )
        )
        return response.definition

    async def trigger(self, **fields: Any) -> workflow_pb2.WorkflowRun:
        """Trigger a run (fields of TriggerWorkflowRequest; `input` may be a dict)."""
        if isinstance(fields.get("input"), dict):
            fields["input"] = struct(fields["input"])
        response = await self.workflows.TriggerWorkflow(
            workflow_service_pb2.TriggerWorkflowRequest(**fields)
        )
        return response.run

    async def run(self, run_id: str) -> workflow_pb2.WorkflowRun:
        """Get a run."""
        response = await self.workflows.GetWorkflowRun(
            workflow_service_pb2.GetWorkflowRunRequest(run_id=run_id)
        )
        return response.run

    async def wait_run(
        self, run_id: str, state: int, timeout: float = WAIT
    ) -> workflow_pb2.WorkflowRun:
        """Poll a run until it reaches `state` (a workflow_pb2.RUN_STATE_* value)."""
        async with asyncio.timeout(timeout):
            while True:
                run = await self.run(run_id)
                if run.state == state:
                    return run
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Close every agent's stream."""
        for agent in self._agents:
            await agent.disconnect()


async def expect_quiet(*agents: Agent) -> None:
    """Assert that none of the agents is sent anything it has not read: once the server (in this
    process) has settled, with nothing queued, running or due, each agent has received all that
    the server queued on its stream, and has read all of it. Nothing is waited out: a task that
    would reach an agent now is on its stream by then, and one due later (a retry's backoff, a
    lease) is not "now"."""
    servers = {id(agent.client.server): agent.client.server for agent in agents}
    assert len(servers) == 1, "the agents talk to one server"
    [server] = servers.values()
    assert server is not None, "expect_quiet needs the server in this process (Client.server)"
    async with asyncio.timeout(WAIT):
        await server.settle()
        for agent in agents:
            await agent.caught_up(server)
    for agent in agents:
        if not agent.events.empty():
            raise AssertionError(f"{agent.agent_id}: unexpected event: {agent.events.get_nowait()}")


@contextlib.asynccontextmanager
async def connect(port: int, server: OpsCoreServer | None = None) -> AsyncIterator[Client]:
    """A Client on a new channel to the server on `port` (in this process or not: give the
    `server` if it is, for `expect_quiet`); its streams and the channel are closed after."""
    async with auth.channel(f"127.0.0.1:{port}") as channel:
        client = Client(channel, server)
        try:
            yield client
        finally:
            await client.close()
