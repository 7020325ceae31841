"""One strategy of hostile requests per RPC (TriggerWorkflow once per source), drawn against a
live world so that requests reach real agents, definitions, runs and tasks as well as ones that
do not exist.
"""

from __future__ import annotations

from typing import Any, cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from hypothesis import strategies as st
from opscore.v1 import (
    agent_lifecycle_pb2,
    workflow_service_pb2,
)

from hostile.contract import RUN_ORDERS
from hostile.strategies import (
    capabilities,
    enum_numbers,
    fill_definition,
    fill_struct,
    hostile_text,
    ids,
    int32,
    labels,
    optional_durations,
    optional_ids,
    page_sizes,
    payloads,
)
from hostile.world import LIVE, LIVE_TASK, World


def page_tokens(world: World) -> st.SearchStrategy[str]:
    """Empty, issued, and forged page tokens."""
    forged = st.binary(max_size=40).map(lambda raw: raw.hex())
    return st.one_of(st.just(""), st.sampled_from(world.page_tokens), forged, hostile_text)


@st.composite
def register_requests(draw: st.DrawFn, world: World) -> Message:
    """RegisterAgent with any id, name, version, capabilities, labels and slot count."""
    return agent_lifecycle_pb2.RegisterAgentRequest(
        agent_id=draw(optional_ids(world.agents)),
        name=draw(st.one_of(st.just("agent"), hostile_text)),
        version=draw(st.one_of(st.just("1.0"), hostile_text)),
        capabilities=draw(st.lists(capabilities, max_size=5)),
        labels=draw(labels),
        max_concurrent_tasks=draw(st.one_of(st.integers(-2, 5), int32)),
    )


@st.composite
def create_requests(draw: st.DrawFn, world: World) -> Message:
    """CreateWorkflowDefinition with any definition and request id."""
    request = workflow_service_pb2.CreateWorkflowDefinitionRequest(
        request_id=draw(optional_ids(world.request_ids))
    )
    fill_definition(draw, request.definition)
    return request


@st.composite
def trigger_requests(draw: st.DrawFn, world: World, source: str) -> Message:
    """TriggerWorkflow from one source (or none), with any pin, input and request id."""
    request = workflow_service_pb2.TriggerWorkflowRequest(
        agent_id=draw(optional_ids(world.agents)),
        request_id=draw(optional_ids(world.request_ids)),
    )
    if source == "definition_id":
        chosen = draw(st.one_of(st.none(), ids(world.definitions)))
        if chosen is not None:
            request.definition_id = chosen
    elif source == "workflow_name":
        request.workflow_name = draw(st.one_of(st.sampled_from(world.names), hostile_text))
    else:
        fill_definition(draw, request.definition)
    fill_struct(request.input, draw(payloads))
    return request


@st.composite
def result_requests(draw: st.DrawFn, world: World, rpc: str) -> Message:
    """CompleteTask, FailTask or ExtendTaskLease: aimed at a held attempt, at a real task with
    a wrong agent or attempt, or at anything at all."""
    task_id = draw(
        st.one_of(
            st.integers(0, 1000).map(lambda index: f"{LIVE}{index}"),
            st.integers(0, 1000).map(lambda index: f"{LIVE_TASK}{index}"),
            ids(world.tasks),
        )
    )
    common: dict[str, Any] = {
        "task_id": task_id,
        "agent_id": draw(ids(world.agents)),
        "attempt": draw(st.one_of(st.integers(-1, 3), int32)),
    }
    if rpc == "CompleteTask":
        request: Message = workflow_service_pb2.CompleteTaskRequest(**common)
        fill_struct(cast(workflow_service_pb2.CompleteTaskRequest, request).output, draw(payloads))
    elif rpc == "FailTask":
        request = workflow_service_pb2.FailTaskRequest(
            **common, error=draw(hostile_text), retryable=draw(st.booleans())
        )
    else:
        request = workflow_service_pb2.ExtendTaskLeaseRequest(**common)
        extend_by = draw(st.one_of(optional_durations, st.just(Duration(seconds=30))))
        if extend_by is not None:
            request.extend_by.CopyFrom(extend_by)
    return request


def rpc_requests(world: World) -> dict[str, st.SearchStrategy[Message]]:
    """For each RPC under test (TriggerWorkflow once per source), its hostile requests."""
    agent_ids = ids(world.agents)
    lifecycle = agent_lifecycle_pb2
    service = workflow_service_pb2
    return {
        "RegisterAgent": register_requests(world),
        "DeregisterAgent": st.builds(lifecycle.DeregisterAgentRequest, agent_id=agent_ids),
        "Heartbeat": st.builds(lifecycle.HeartbeatRequest, agent_id=agent_ids),
        "ReportState": st.builds(
            lifecycle.ReportStateRequest,
            agent_id=agent_ids,
            state=enum_numbers,
            detail=st.one_of(st.just(""), hostile_text),
        ),
        "GetAgent": st.builds(lifecycle.GetAgentRequest, agent_id=agent_ids),
        "ListAgents": st.builds(
            lifecycle.ListAgentsRequest,
            page_size=page_sizes,
            page_token=page_tokens(world),
            state=enum_numbers,
            capability=st.one_of(capabilities),
        ),
        "CreateWorkflowDefinition": create_requests(world),
        "GetWorkflowDefinition": st.builds(
            service.GetWorkflowDefinitionRequest, definition_id=ids(world.definitions)
        ),
        "ListWorkflowDefinitions": st.builds(
            service.ListWorkflowDefinitionsRequest,
            page_size=page_sizes,
            page_token=page_tokens(world),
            workflow_name=st.one_of(st.just(""), st.sampled_from(world.names), hostile_text),
        ),
        "TriggerWorkflow[definition_id]": trigger_requests(world, "definition_id"),
        "TriggerWorkflow[workflow_name]": trigger_requests(world, "workflow_name"),
        "TriggerWorkflow[definition]": trigger_requests(world, "definition"),
        "GetWorkflowRun": st.builds(service.GetWorkflowRunRequest, run_id=ids(world.runs)),
        "WatchWorkflowRun": st.builds(service.WatchWorkflowRunRequest, run_id=ids(world.runs)),
        "ListWorkflowRuns": st.builds(
            service.ListWorkflowRunsRequest,
            page_size=page_sizes,
            page_token=page_tokens(world),
            state=enum_numbers,
            definition_id=optional_ids(world.definitions),
            agent_id=optional_ids(world.agents),
            view=enum_numbers,
            workflow_name=st.one_of(st.just(""), st.sampled_from(world.names), hostile_text),
            order_by=st.one_of(st.sampled_from(sorted(RUN_ORDERS)), hostile_text),
        ),
        "ListWorkflowRunTasks": st.builds(
            service.ListWorkflowRunTasksRequest,
            run_id=ids(world.runs),
            page_size=page_sizes,
            page_token=page_tokens(world),
        ),
        "CancelWorkflowRun": st.builds(service.CancelWorkflowRunRequest, run_id=ids(world.runs)),
        "CompleteTask": result_requests(world, "CompleteTask"),
        "FailTask": result_requests(world, "FailTask"),
        "ExtendTaskLease": result_requests(world, "ExtendTaskLease"),
        "StreamTasks": st.builds(service.StreamTasksRequest, agent_id=agent_ids),
    }


RPCS = [
    "RegisterAgent",
    "DeregisterAgent",
    "Heartbeat",
    "ReportState",
    "GetAgent",
    "ListAgents",
    "CreateWorkflowDefinition",
    "GetWorkflowDefinition",
    "ListWorkflowDefinitions",
    "TriggerWorkflow[definition_id]",
    "TriggerWorkflow[workflow_name]",
    "TriggerWorkflow[definition]",
    "GetWorkflowRun",
    "ListWorkflowRuns",
    "ListWorkflowRunTasks",
    "CancelWorkflowRun",
    "CompleteTask",
    "FailTask",
    "ExtendTaskLease",
    "StreamTasks",
    "WatchWorkflowRun",
]
