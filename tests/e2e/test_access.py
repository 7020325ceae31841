"""Who may call what, over real channels: every method the server offers (found by reflection)
called with every kind of credential, each refusal answered with its code and changing nothing,
and the credentials each method accepts let through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import auth
import grpc
import pytest
from conftest import ServerFactory
from google.protobuf import descriptor_pb2, json_format
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import WAIT, definition, reason_of, seconds, task
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from opscore.api.access import RULES
from opscore.domain.access import Need

Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]


async def reflected_methods(channel: grpc.aio.Channel) -> set[str]:
    """Every method of every service the server lists by reflection, as `/service/method`."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
    listed = [response async for response in stub.ServerReflectionInfo(iter(requests))]
    services = [service.name for service in listed[0].list_services_response.service]
    methods = set()
    for service in services:
        asked = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=service)]
        async for response in stub.ServerReflectionInfo(iter(asked)):
            for raw in response.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                for described in proto.service:
                    full = f"{proto.package}.{described.name}" if proto.package else described.name
                    if full == service:
                        methods |= {f"/{full}/{method.name}" for method in described.method}
    return methods


async def test_every_reflected_method_has_a_rule(channel: grpc.aio.Channel) -> None:
    assert await reflected_methods(channel) == set(RULES)


@dataclass
class World:
    """What the calls act on: agents a and b with their tokens, a definition, runs."""

    lifecycle: agent_lifecycle_pb2_grpc.AgentLifecycleStub
    workflows: workflow_service_pb2_grpc.WorkflowServiceStub
    tokens: dict[str, str]
    definition_id: str
    run_id: str
    held: list[Any]
    queued_run_id: str


def operator() -> Metadata:
    return auth.bearer(auth.OPERATOR_TOKEN)


async def snapshot(world: World) -> dict[str, Any]:
    """Everything the calls could change, as the operator reads it."""
    agents = await world.lifecycle.ListAgents(
        agent_lifecycle_pb2.ListAgentsRequest(), metadata=operator()
    )
    definitions = await world.workflows.ListWorkflowDefinitions(
        workflow_service_pb2.ListWorkflowDefinitionsRequest(), metadata=operator()
    )
    runs = await world.workflows.ListWorkflowRuns(
        workflow_service_pb2.ListWorkflowRunsRequest(view=2), metadata=operator()
    )
    return {
        name: json_format.MessageToDict(message)
        for name, message in (("agents", agents), ("definitions", definitions), ("runs", runs))
    }


def calls(world: World) -> dict[str, Callable[[Metadata], Awaitable[Any]]]:
    """A call of every method of Ops-Core's services, acting as agent a where a method acts as
    an agent, which the operator may make."""
    lifecycle, workflows = world.lifecycle, world.workflows
    lc, ws = agent_lifecycle_pb2, workflow_service_pb2
    first, second = world.held
    life = "/opscore.v1.AgentLifecycle/"
    flow = "/opscore.v1.WorkflowService/"
    return {
        life + "RegisterAgent": lambda md: register(world, md),
        life + "DeregisterAgent": lambda md: lifecycle.DeregisterAgent(
            lc.DeregisterAgentRequest(agent_id="a"), metadata=md
        ),
        life + "Heartbeat": lambda md: lifecycle.Heartbeat(
            lc.HeartbeatRequest(agent_id="a"), metadata=md
        ),
        life + "ReportState": lambda md: lifecycle.ReportState(
            lc.ReportStateRequest(agent_id="a", state=2, detail="busy"), metadata=md
        ),
        life + "GetAgent": lambda md: lifecycle.GetAgent(
            lc.GetAgentRequest(agent_id="a"), metadata=md
        ),
        life + "ListAgents": lambda md: lifecycle.ListAgents(lc.ListAgentsRequest(), metadata=md),
        flow + "CreateWorkflowDefinition": lambda md: workflows.CreateWorkflowDefinition(
            ws.CreateWorkflowDefinitionRequest(definition=definition("other", task("x"))),
            metadata=md,
        ),
        flow + "GetWorkflowDefinition": lambda md: workflows.GetWorkflowDefinition(
            ws.GetWorkflowDefinitionRequest(definition_id=world.definition_id), metadata=md
        ),
        flow + "ListWorkflowDefinitions": lambda md: workflows.ListWorkflowDefinitions(
            ws.ListWorkflowDefinitionsRequest(), metadata=md
        ),
        flow + "TriggerWorkflow": lambda md: workflows.TriggerWorkflow(
            ws.TriggerWorkflowRequest(workflow_name="other"), metadata=md
        ),
        flow + "GetWorkflowRun": lambda md: workflows.GetWorkflowRun(
            ws.GetWorkflowRunRequest(run_id=world.run_id), metadata=md
        ),
        flow + "ListWorkflowRuns": lambda md: workflows.ListWorkflowRuns(
            ws.ListWorkflowRunsRequest(), metadata=md
        ),
        flow + "ListWorkflowRunTasks": lambda md: workflows.ListWorkflowRunTasks(
            ws.ListWorkflowRunTasksRequest(run_id=world.run_id), metadata=md
        ),
        flow + "CancelWorkflowRun": lambda md: workflows.CancelWorkflowRun(
            ws.CancelWorkflowRunRequest(run_id=world.queued_run_id), metadata=md
        ),
        flow + "StreamTasks": lambda md: opened(
            workflows.StreamTasks(ws.StreamTasksRequest(agent_id="a"), metadata=md)
        ),
        flow + "WatchWorkflowRun": lambda md: opened(
            workflows.WatchWorkflowRun(ws.WatchWorkflowRunRequest(run_id=world.run_id), metadata=md)
        ),
        flow + "ExtendTaskLease": lambda md: workflows.ExtendTaskLease(
            ws.ExtendTaskLeaseRequest(
                task_id=first.task_id, agent_id="a", attempt=first.attempt, extend_by=seconds(60)
            ),
            metadata=md,
        ),
        flow + "CompleteTask": lambda md: workflows.CompleteTask(
            ws.CompleteTaskRequest(task_id=first.task_id, agent_id="a", attempt=first.attempt),
            metadata=md,
        ),
        flow + "FailTask": lambda md: workflows.FailTask(
            ws.FailTaskRequest(
                task_id=second.task_id, agent_id="a", attempt=second.attempt, error="no"
            ),
            metadata=md,
        ),
    }


async def register(world: World, metadata: Metadata) -> None:
    """Register agent a again, keeping the token this issues (the earlier one is revoked)."""
    registered = await world.lifecycle.RegisterAgent(
        agent_lifecycle_pb2.RegisterAgentRequest(
            agent_id="a", capabilities=["work"], max_concurrent_tasks=2
        ),
        metadata=metadata,
    )
    world.tokens["a"] = registered.agent_token


async def opened(call: Any) -> None:
    """A stream's call: open once its headers come (the server sends them as soon as the
    stream is open), else refused with the status it ended with; closed after."""
    try:
        await asyncio.wait_for(call.initial_metadata(), WAIT)
        if call.done() and await call.code() != Code.OK:
            raise grpc.aio.AioRpcError(
                await call.code(),
                await call.initial_metadata(),
                await call.trailing_metadata(),
                await call.details(),
            )
    finally:
        call.cancel()


@pytest.fixture
async def world(start_server: ServerFactory, migrated_url: str) -> AsyncIterator[World]:
    async with (
        start_server(migrated_url, registration_token=auth.REGISTRATION_TOKEN) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        tokens = {}
        for agent_id in ("a", "b"):
            registered = await lifecycle.RegisterAgent(
                agent_lifecycle_pb2.RegisterAgentRequest(
                    agent_id=agent_id, capabilities=["work"], max_concurrent_tasks=2
                ),
                metadata=auth.bearer(auth.REGISTRATION_TOKEN),
            )
            tokens[agent_id] = registered.agent_token
        created = await workflows.CreateWorkflowDefinition(
            workflow_service_pb2.CreateWorkflowDefinitionRequest(
                definition=definition(
                    "pair", task("one", capability="work"), task("two", capability="work")
                )
            ),
            metadata=operator(),
        )
        run = await workflows.TriggerWorkflow(
            workflow_service_pb2.TriggerWorkflowRequest(
                definition_id=created.definition.definition_id, agent_id="a"
            ),
            metadata=operator(),
        )
        stream = workflows.StreamTasks(
            workflow_service_pb2.StreamTasksRequest(agent_id="a"), metadata=auth.bearer(tokens["a"])
        )
        held = [(await stream.read()).assignment for _ in range(2)]
        stream.cancel()
        queued = await workflows.TriggerWorkflow(
            workflow_service_pb2.TriggerWorkflowRequest(
                definition_id=created.definition.definition_id, agent_id="b"
            ),
            metadata=operator(),
        )
        yield World(
            lifecycle,
            workflows,
            tokens,
            created.definition.definition_id,
            run.run.run_id,
            held,
            queued.run.run_id,
        )


def refusals(world: World, method: str) -> dict[str, tuple[Metadata, Code]]:
    """Each credential a call of `method` (acting as agent a) must refuse, and its code."""
    need = RULES[method].need
    cases: dict[str, tuple[Metadata, Code]] = {
        "no credentials": ((), Code.UNAUTHENTICATED),
        "a bad token": (auth.bearer("not-a-token-of-this-server"), Code.UNAUTHENTICATED),
        "a malformed header": ((("authorization", auth.OPERATOR_TOKEN),), Code.UNAUTHENTICATED),
        "another agent's token": (auth.bearer(world.tokens["b"]), Code.PERMISSION_DENIED),
    }
    if need is Need.OPERATOR:
        cases["an agent token"] = (auth.bearer(world.tokens["a"]), Code.PERMISSION_DENIED)
    if need is not Need.REGISTRATION:
        cases["a registration token"] = (
            auth.bearer(auth.REGISTRATION_TOKEN),
            Code.PERMISSION_DENIED,
        )
    else:  # an agent's own token cannot register it again (see opscore.domain.access)
        cases["its own agent token"] = (auth.bearer(world.tokens["a"]), Code.PERMISSION_DENIED)
    return cases


def accepted(world: World, method: str) -> list[Metadata]:
    """The credentials a call of `method` acting as agent a accepts."""
    need = RULES[method].need
    if need is Need.OPERATOR:
        return [operator()]
    if need is Need.REGISTRATION:
        return [auth.bearer(auth.REGISTRATION_TOKEN), operator()]
    return [auth.bearer(world.tokens["a"]), operator()]


async def test_every_call_refuses_what_it_must_and_changes_nothing(world: World) -> None:
    table = calls(world)
    assert set(table) == {method for method, rule in RULES.items() if rule.need is not Need.NOTHING}
    for method, call in table.items():
        for credential, (metadata, code) in refusals(world, method).items():
            before = await snapshot(world)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(metadata)
            what = f"{method} with {credential}"
            assert refused.value.code() == code, f"{what}: {refused.value.code()}"
            assert reason_of(refused.value) == code.name, what
            assert auth.OPERATOR_TOKEN not in (refused.value.details() or ""), what
            assert await snapshot(world) == before, f"{what} changed the state"


# Each accepted call in an order where every one can succeed: reads, then writes, then the
# calls that end what the others act on.
ORDER = [
    "GetAgent",
    "ListAgents",
    "GetWorkflowDefinition",
    "ListWorkflowDefinitions",
    "GetWorkflowRun",
    "ListWorkflowRuns",
    "ListWorkflowRunTasks",
    "WatchWorkflowRun",
    "Heartbeat",
    "ReportState",
    "ExtendTaskLease",
    "CompleteTask",
    "FailTask",
    "CreateWorkflowDefinition",
    "TriggerWorkflow",
    "StreamTasks",
    "CancelWorkflowRun",
    "RegisterAgent",
    "DeregisterAgent",
]


async def test_every_call_accepts_its_callers(world: World) -> None:
    table = calls(world)
    by_name = {method.rpartition("/")[2]: method for method in table}
    assert set(ORDER) == set(by_name)
    for name in ORDER:
        method = by_name[name]
        for metadata in accepted(world, method):
            if name in ("CompleteTask", "FailTask", "DeregisterAgent") and metadata == operator():
                continue  # done once already: the agent's own token did it
            try:
                await table[method](metadata)
            except grpc.aio.AioRpcError as error:
                failure = f"{name} refused: {error.code()}: {error.details()}"
                raise AssertionError(failure) from error
