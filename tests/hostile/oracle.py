"""The oracle, written from the contract alone: `problems` says why a request must be refused
(empty when the contract predicts no refusal), and `judge` asserts that an answer has an allowed
status, names a field when it is INVALID_ARGUMENT, and refuses what the oracle says it must.
"""

from __future__ import annotations

import graphlib
import json
import math
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct, Value
from helpers import bad_request
from opscore.v1 import (
    agent_lifecycle_pb2,
    workflow_pb2,
    workflow_service_pb2,
)

from hostile.contract import (
    ACCEPTABLE,
    ID_ALPHABET,
    MAX_ATTEMPTS,
    MAX_BACKOFF,
    MAX_ID,
    MAX_MULTIPLIER,
    MAX_NAME,
    MAX_TIMEOUT,
    REFUSALS,
    RUN_ORDERS,
    Code,
)
from opscore.domain.validation import Limits

SERVER_SET = ("definition.definition_id", "definition.version", "definition.created_at")
"""Paths of fields a client may send but the server ignores."""

REQUIRED_IDS = {
    "DeregisterAgentRequest": ("agent_id",),
    "HeartbeatRequest": ("agent_id",),
    "ReportStateRequest": ("agent_id",),
    "GetAgentRequest": ("agent_id",),
    "StreamTasksRequest": ("agent_id",),
    "GetWorkflowDefinitionRequest": ("definition_id",),
    "GetWorkflowRunRequest": ("run_id",),
    "WatchWorkflowRunRequest": ("run_id",),
    "ListWorkflowRunTasksRequest": ("run_id",),
    "CancelWorkflowRunRequest": ("run_id",),
    "CompleteTaskRequest": ("task_id", "agent_id"),
    "FailTaskRequest": ("task_id", "agent_id"),
    "ExtendTaskLeaseRequest": ("task_id", "agent_id"),
}
OPTIONAL_IDS = {
    "RegisterAgentRequest": ("agent_id",),
    "CreateWorkflowDefinitionRequest": ("request_id",),
    "TriggerWorkflowRequest": ("definition_id", "agent_id", "request_id"),
    "ListWorkflowRunsRequest": ("definition_id", "agent_id"),
}


def walk(message: Message, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) in a message: scalars, map keys (as `path{key}`), submessages."""
    for descriptor, value in message.ListFields():
        here = f"{path}.{descriptor.name}" if path else descriptor.name
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            for key in value:
                yield f"{here}{{key}}", key
                entry = value[key]
                if isinstance(entry, Message):
                    yield from _walk_value(entry, f"{here}[{key!r}]")
                else:
                    yield f"{here}[{key!r}]", entry
        elif descriptor.is_repeated:
            for index, item in enumerate(value):
                yield from _walk_value(item, f"{here}[{index}]")
        else:
            yield from _walk_value(value, here)


def _walk_value(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, Message):
        yield from walk(value, path)


def is_id(value: str) -> bool:
    """The contract's id shape."""
    return 1 <= len(value) <= MAX_ID and all(character in ID_ALPHABET for character in value)


def bad_name(value: str) -> bool:
    """Longer than a name may be, or holding a character that is not printable."""
    return len(value) > MAX_NAME or not value.isprintable()


def duration_value(message: Duration) -> timedelta | None:
    """A Duration's length, or None when it is not a valid Duration (mixed signs)."""
    if (message.seconds > 0 > message.nanos) or (message.seconds < 0 < message.nanos):
        return None
    return timedelta(seconds=message.seconds, microseconds=message.nanos / 1000)


def plain(value: Value) -> Any:
    """A Struct Value as plain Python (NaN and the infinities kept)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return plain_struct(value.struct_value)
    if kind == "list_value":
        return [plain(item) for item in value.list_value.values]
    return None if kind in (None, "null_value") else getattr(value, kind)


def plain_struct(message: Struct) -> dict[str, Any]:
    """A Struct as a dict."""
    return {key: plain(item) for key, item in message.fields.items()}


def payload_bytes(message: Struct) -> int:
    """Size of a Struct as compact JSON (UTF-8), the measure of max_payload_bytes."""
    compact = json.dumps(plain_struct(message), separators=(",", ":"), ensure_ascii=False)
    return len(compact.encode())


def _label_problems(values: dict[str, str], path: str) -> Iterator[str]:
    for key, value in values.items():
        if not key or len(key) > MAX_NAME:
            yield f"{path} has a key that is empty or over {MAX_NAME} characters"
        if len(value) > MAX_NAME:
            yield f"{path}[{key!r}] is over {MAX_NAME} characters"


def _duration_problems(
    message: Any, name: str, path: str, *, low: timedelta, high: timedelta, zero: bool
) -> Iterator[str]:
    if not message.HasField(name):
        return
    value = duration_value(getattr(message, name))
    if value is None:
        yield f"{path}.{name} has seconds and nanos of different signs"
    elif value < low or value > high or (value == low and not zero):
        yield f"{path}.{name} is out of range: {value}"


def _task_problems(spec: workflow_pb2.TaskSpec, path: str, names: set[str]) -> Iterator[str]:
    for index, dependency in enumerate(spec.depends_on):
        if dependency not in names or dependency == spec.name:
            yield f"{path}.depends_on[{index}] names no other task: {dependency!r}"
    if spec.fallback and (spec.fallback not in names or spec.fallback == spec.name):
        yield f"{path}.fallback names no other task: {spec.fallback!r}"
    if len(spec.capability) > MAX_NAME:
        yield f"{path}.capability is over {MAX_NAME} characters"
    yield from _label_problems(dict(spec.labels), f"{path}.labels")
    yield from _duration_problems(
        spec, "timeout", path, low=timedelta(0), high=MAX_TIMEOUT, zero=False
    )
    if spec.HasField("retry_policy"):
        policy = spec.retry_policy
        here = f"{path}.retry_policy"
        if not 0 <= policy.max_attempts <= MAX_ATTEMPTS:
            yield f"{here}.max_attempts is out of range: {policy.max_attempts}"
        if not 0 <= policy.backoff_multiplier <= MAX_MULTIPLIER:  # NaN fails this too
            yield f"{here}.backoff_multiplier is out of range: {policy.backoff_multiplier}"
        for name in ("initial_backoff", "max_backoff"):
            yield from _duration_problems(
                policy, name, here, low=timedelta(0), high=MAX_BACKOFF, zero=True
            )


def _graph_problems(tasks: Sequence[workflow_pb2.TaskSpec]) -> Iterator[str]:
    by_name = {spec.name: spec for spec in tasks}
    targets = [spec.fallback for spec in tasks if spec.fallback in by_name]
    for target in sorted(set(targets)):
        fallback = by_name[target]
        if targets.count(target) > 1:
            yield f"task {target!r} is the fallback of two tasks"
        if fallback.depends_on or fallback.fallback:
            yield f"fallback task {target!r} has dependencies or a fallback of its own"
        if any(target in spec.depends_on for spec in tasks):
            yield f"fallback task {target!r} is depended on"
    sorter = graphlib.TopologicalSorter(
        {
            spec.name: [dep for dep in spec.depends_on if dep in by_name and dep != spec.name]
            for spec in tasks
        }
    )
    try:
        sorter.prepare()
    except graphlib.CycleError as cycle:
        yield f"dependency cycle: {cycle.args[1]}"


def definition_problems(message: workflow_pb2.WorkflowDefinition, limits: Limits) -> list[str]:
    """Why the contract refuses a definition (empty when it does not)."""
    found = []
    if not message.workflow_name or bad_name(message.workflow_name):
        found.append("definition.workflow_name is empty, too long or not printable")
    if not message.tasks or len(message.tasks) > limits.max_tasks_per_definition:
        found.append(f"definition.tasks holds {len(message.tasks)} tasks")
        return found
    names = [spec.name for spec in message.tasks]
    if len(set(names)) != len(names) or any(not name or bad_name(name) for name in names):
        found.append("task names are duplicated, empty, too long or not printable")
    for index, spec in enumerate(message.tasks):
        found.extend(_task_problems(spec, f"definition.tasks[{index}]", set(names)))
    found.extend(_graph_problems(message.tasks))
    return found


def _run_listing_problems(request: workflow_service_pb2.ListWorkflowRunsRequest) -> Iterator[str]:
    if not 0 <= request.view <= 2:
        yield f"view {request.view} is unknown"
    if " ".join(request.order_by.split()) not in RUN_ORDERS:
        yield f"order_by {request.order_by[:40]!r} is not an order"
    if len(request.workflow_name) > MAX_NAME or "\x00" in request.workflow_name:
        yield "workflow_name is too long or holds a NUL"


def _request_rules(request: Message, limits: Limits) -> Iterator[str]:  # noqa: PLR0912
    """The rules specific to each request type."""
    kind = type(request).__name__
    if isinstance(request, agent_lifecycle_pb2.RegisterAgentRequest):
        if bad_name(request.name):
            yield "name is too long or not printable"
        if any(not item or len(item) > MAX_NAME for item in request.capabilities):
            yield "a capability is empty or too long"
        yield from _label_problems(dict(request.labels), "labels")
        if request.max_concurrent_tasks < 0:
            yield "max_concurrent_tasks is negative"
    elif isinstance(request, agent_lifecycle_pb2.ReportStateRequest):
        if request.state not in (1, 2, 3):
            yield f"state {request.state} is not IDLE, BUSY or ERROR"
    elif kind in (
        "ListAgentsRequest",
        "ListWorkflowRunsRequest",
        "ListWorkflowDefinitionsRequest",
        "ListWorkflowRunTasksRequest",
    ):
        if request.page_size < 0:  # type: ignore[attr-defined]
            yield "page_size is negative"
        states = {"ListAgentsRequest": 4, "ListWorkflowRunsRequest": 5}
        if kind in states and not 0 <= request.state <= states[kind]:  # type: ignore[attr-defined]
            yield f"state {request.state} is unknown"  # type: ignore[attr-defined]
        if isinstance(request, workflow_service_pb2.ListWorkflowRunsRequest):
            yield from _run_listing_problems(request)
    elif isinstance(request, workflow_service_pb2.CreateWorkflowDefinitionRequest):
        yield from definition_problems(request.definition, limits)
    elif isinstance(request, workflow_service_pb2.TriggerWorkflowRequest):
        source = request.WhichOneof("source")
        if source is None or (source != "definition" and not getattr(request, source)):
            yield "no source"
        if source == "definition":
            yield from definition_problems(request.definition, limits)
    elif isinstance(request, workflow_service_pb2.ExtendTaskLeaseRequest):
        value = duration_value(request.extend_by)
        if not request.HasField("extend_by") or value is None or value <= timedelta(0):
            yield "extend_by is unset, zero, negative or not a valid duration"


def problems(request: Message, limits: Limits) -> list[str]:
    """Why the contract refuses a request (empty when it does not predict a refusal)."""
    kind = type(request).__name__
    found = []
    for path, value in walk(request):
        if path.startswith(SERVER_SET):
            continue
        if isinstance(value, str) and "\x00" in value:
            found.append(f"{path} holds a NUL character")
        if (
            isinstance(value, Value)
            and value.WhichOneof("kind") == "number_value"
            and not math.isfinite(value.number_value)
        ):
            found.append(f"{path} is {value.number_value}")
        if isinstance(value, Struct) and payload_bytes(value) > limits.max_payload_bytes:
            found.append(f"{path} is over max_payload_bytes as JSON")
    for name in REQUIRED_IDS.get(kind, ()):
        if not is_id(getattr(request, name)):
            found.append(f"{name} {getattr(request, name)[:40]!r} is not an id")
    for name in OPTIONAL_IDS.get(kind, ()):
        value = getattr(request, name)
        if value and not is_id(value):
            found.append(f"{name} {value[:40]!r} is not an id")
    found.extend(_request_rules(request, limits))
    return found


def to_plain(message: Message) -> dict[str, Any]:
    """A message as plain Python, Structs as JSON (text_format cannot print a deep Struct: it
    copies map entries, which re-parses them)."""
    if isinstance(message, Struct):
        return plain_struct(message)
    found: dict[str, Any] = {}
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            found[descriptor.name] = {
                key: to_plain(value[key]) if isinstance(value[key], Message) else value[key]
                for key in value
            }
        elif descriptor.is_repeated:
            found[descriptor.name] = [
                to_plain(item) if isinstance(item, Message) else item for item in value
            ]
        else:
            found[descriptor.name] = to_plain(value) if isinstance(value, Message) else value
    return found


def brief(request: Message) -> str:
    """A request in one line, cut short."""
    text = json.dumps(to_plain(request), default=repr)
    return text if len(text) <= 1500 else f"{text[:1500]}... ({len(text)} characters)"


def judge(rpc: str, request: Message, code: grpc.StatusCode, error: Any, limits: Limits) -> None:
    """Assert the properties of one answer."""
    details = "" if error is None else (error.details() or "")
    where = f"{rpc} answered {code.name} ({details[:300]!r}) to {brief(request)}"
    # One line per kind of fault, so that Hypothesis reports each as a distinct failure.
    assert code != Code.UNKNOWN, where
    assert code != Code.INTERNAL, where
    assert code in ACCEPTABLE, where
    if code == Code.INVALID_ARGUMENT:
        violations = bad_request(error)
        assert any(name.strip() for name in violations), f"no field named in BadRequest: {where}"
    reasons = problems(request, limits)
    if reasons:
        assert code in REFUSALS, f"{where}\nbut the contract refuses it: {reasons[:5]}"
