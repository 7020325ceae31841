"""One fixed request per rule of "Hostile input" that must be refused, plus Structs nested too
deep for protobuf to parse: random examples may miss a rule on a given run, these never do.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from helpers import definition, task
from opscore.v1 import (
    agent_lifecycle_pb2,
    workflow_pb2,
    workflow_service_pb2,
)

from hostile.contract import MAX_DURATION_SECONDS
from hostile.strategies import fill_struct
from hostile.world import LIVE, World


def _deep(depth: int) -> dict[str, Any]:
    """Objects nested `depth` deep: past protobuf's default parse limit of 100 at 33."""
    value: dict[str, Any] = {"x": 1}
    for _ in range(depth):
        value = {"k": value}
    return value


def _with_struct(request: Message, name: str, value: dict[str, Any]) -> Message:
    fill_struct(getattr(request, name), value)
    return request


def _definition_with(**fields: Any) -> workflow_service_pb2.CreateWorkflowDefinitionRequest:
    request = workflow_service_pb2.CreateWorkflowDefinitionRequest()
    request.definition.workflow_name = "rule"
    spec = request.definition.tasks.add(name="a")
    for name, value in fields.items():
        if name == "input":
            fill_struct(spec.input, value)
        elif isinstance(value, Message):
            getattr(spec, name).CopyFrom(value)
        elif isinstance(value, list):
            getattr(spec, name).extend(value)
        else:
            setattr(spec, name, value)
    return request


BAD_STRUCTS = {
    "NaN": {"k": math.nan},
    "Infinity": {"k": math.inf},
    "-Infinity": {"k": [1, {"x": -math.inf}]},
    "NUL in a key": {"a\x00b": 1},
    "NUL in a value": {"k": ["ok", "a\x00b"]},
    "nested 33 deep": _deep(33),
    "nested 60 deep": _deep(60),
}


def contract_cases(world: World) -> list[tuple[str, str, Message]]:
    """(name, rpc, request): one request per rule of "Hostile input" that must be refused, and
    Structs nested too deep for protobuf to parse, which must at least not be a server fault."""
    lifecycle = agent_lifecycle_pb2
    service = workflow_service_pb2
    live = f"{LIVE}0"
    cases: list[tuple[str, str, Message]] = [
        ("id too long", "GetAgent", lifecycle.GetAgentRequest(agent_id="a" * 129)),
        ("id with a space", "Heartbeat", lifecycle.HeartbeatRequest(agent_id="a b")),
        ("id with NUL", "StreamTasks", service.StreamTasksRequest(agent_id="a\x00")),
        ("empty id", "DeregisterAgent", lifecycle.DeregisterAgentRequest()),
        ("run id shape", "CancelWorkflowRun", service.CancelWorkflowRunRequest(run_id="r/1")),
        ("run id shape", "GetWorkflowRun", service.GetWorkflowRunRequest(run_id="\u00e9")),
        (
            "definition id shape",
            "GetWorkflowDefinition",
            service.GetWorkflowDefinitionRequest(definition_id="d" * 200),
        ),
        ("agent name NUL", "RegisterAgent", lifecycle.RegisterAgentRequest(name="a\x00")),
        ("agent name long", "RegisterAgent", lifecycle.RegisterAgentRequest(name="n" * 201)),
        ("agent name control", "RegisterAgent", lifecycle.RegisterAgentRequest(name="a\x1fb")),
        ("version NUL", "RegisterAgent", lifecycle.RegisterAgentRequest(version="\x00")),
        (
            "empty capability",
            "RegisterAgent",
            lifecycle.RegisterAgentRequest(agent_id="c", capabilities=[""]),
        ),
        (
            "long capability",
            "RegisterAgent",
            lifecycle.RegisterAgentRequest(agent_id="c", capabilities=["c" * 201]),
        ),
        ("empty label key", "RegisterAgent", lifecycle.RegisterAgentRequest(labels={"": "v"})),
        (
            "long label value",
            "RegisterAgent",
            lifecycle.RegisterAgentRequest(labels={"k": "v" * 201}),
        ),
        (
            "negative slots",
            "RegisterAgent",
            lifecycle.RegisterAgentRequest(max_concurrent_tasks=-1),
        ),
        (
            "state OFFLINE",
            "ReportState",
            lifecycle.ReportStateRequest(agent_id="worker-1", state=4),
        ),
        (
            "unknown state",
            "ReportState",
            lifecycle.ReportStateRequest(agent_id="worker-1", state=99),
        ),
        (
            "detail NUL",
            "ReportState",
            lifecycle.ReportStateRequest(agent_id="worker-1", state=1, detail="\x00"),
        ),
        ("unknown filter", "ListAgents", lifecycle.ListAgentsRequest(state=-1)),
        ("negative page", "ListAgents", lifecycle.ListAgentsRequest(page_size=-1)),
        ("capability NUL", "ListAgents", lifecycle.ListAgentsRequest(capability="\x00")),
        ("unknown filter", "ListWorkflowRuns", service.ListWorkflowRunsRequest(state=6)),
        (
            "filter id shape",
            "ListWorkflowRuns",
            service.ListWorkflowRunsRequest(agent_id="a" * 129),
        ),
        (
            "name NUL",
            "ListWorkflowDefinitions",
            service.ListWorkflowDefinitionsRequest(workflow_name="\x00"),
        ),
        (
            "name NUL",
            "TriggerWorkflow[workflow_name]",
            service.TriggerWorkflowRequest(workflow_name="a\x00"),
        ),
        ("no source", "TriggerWorkflow[definition_id]", service.TriggerWorkflowRequest()),
        (
            "request id shape",
            "CreateWorkflowDefinition",
            service.CreateWorkflowDefinitionRequest(
                definition=definition("rule", task("a")), request_id="r" * 129
            ),
        ),
        (
            "error NUL",
            "FailTask",
            service.FailTaskRequest(task_id=live, agent_id="worker-1", attempt=1, error="\x00"),
        ),
        ("task name NUL", "CreateWorkflowDefinition", _definition_with(name="a\x00")),
        ("task name long", "CreateWorkflowDefinition", _definition_with(name="t" * 201)),
        ("capability long", "CreateWorkflowDefinition", _definition_with(capability="c" * 201)),
        ("unknown dependency", "CreateWorkflowDefinition", _definition_with(depends_on=["zz"])),
        ("self dependency", "CreateWorkflowDefinition", _definition_with(depends_on=["a"])),
        ("own fallback", "CreateWorkflowDefinition", _definition_with(fallback="a")),
        (
            "negative timeout",
            "CreateWorkflowDefinition",
            _definition_with(timeout=Duration(seconds=-1)),
        ),
        (
            "zero timeout",
            "CreateWorkflowDefinition",
            _definition_with(timeout=Duration()),
        ),
        (
            "timeout over 7 days",
            "CreateWorkflowDefinition",
            _definition_with(timeout=Duration(seconds=MAX_DURATION_SECONDS)),
        ),
        (
            "mixed-sign timeout",
            "CreateWorkflowDefinition",
            _definition_with(timeout=Duration(seconds=5, nanos=-1)),
        ),
        (
            "101 attempts",
            "CreateWorkflowDefinition",
            _definition_with(retry_policy=workflow_pb2.RetryPolicy(max_attempts=101)),
        ),
        (
            "negative attempts",
            "CreateWorkflowDefinition",
            _definition_with(retry_policy=workflow_pb2.RetryPolicy(max_attempts=-1)),
        ),
        (
            "NaN multiplier",
            "CreateWorkflowDefinition",
            _definition_with(retry_policy=workflow_pb2.RetryPolicy(backoff_multiplier=math.nan)),
        ),
        (
            "multiplier over 100",
            "CreateWorkflowDefinition",
            _definition_with(retry_policy=workflow_pb2.RetryPolicy(backoff_multiplier=101.0)),
        ),
        (
            "negative backoff",
            "CreateWorkflowDefinition",
            _definition_with(
                retry_policy=workflow_pb2.RetryPolicy(initial_backoff=Duration(seconds=-1))
            ),
        ),
        (
            "backoff over a day",
            "CreateWorkflowDefinition",
            _definition_with(
                retry_policy=workflow_pb2.RetryPolicy(max_backoff=Duration(seconds=86_401))
            ),
        ),
    ]
    for kind, value in BAD_STRUCTS.items():
        cases.append(
            (f"task input {kind}", "CreateWorkflowDefinition", _definition_with(input=value))
        )
        inline = service.TriggerWorkflowRequest()
        inline.definition.workflow_name = "rule"
        fill_struct(inline.definition.tasks.add(name="a").input, value)
        cases.append((f"inline task input {kind}", "TriggerWorkflow[definition]", inline))
        by_id = service.TriggerWorkflowRequest(definition_id=world.definitions[0])
        cases.append(
            (
                f"run input {kind}",
                "TriggerWorkflow[definition_id]",
                _with_struct(by_id, "input", value),
            )
        )
        by_name = service.TriggerWorkflowRequest(workflow_name=world.names[0])
        cases.append(
            (
                f"run input {kind}",
                "TriggerWorkflow[workflow_name]",
                _with_struct(by_name, "input", value),
            )
        )
        output = service.CompleteTaskRequest(task_id=live)
        cases.append((f"output {kind}", "CompleteTask", _with_struct(output, "output", value)))
    for kind, extend_by in {
        "unset": None,
        "zero": Duration(),
        "negative": Duration(seconds=-30),
        "mixed-sign": Duration(seconds=30, nanos=-5),
    }.items():
        request = service.ExtendTaskLeaseRequest(task_id=live)
        if extend_by is not None:
            request.extend_by.CopyFrom(extend_by)
        cases.append((f"extend_by {kind}", "ExtendTaskLease", request))
    return cases
