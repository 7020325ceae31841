"""Protobuf messages to domain objects and back: the only module that knows both.

Decoding refuses what the wire allows but the domain cannot hold (unknown enum numbers), naming
the field, so servicers hand the engine only well-typed values.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from opscore.domain import models
from opscore.domain.errors import InvalidArgument
from opscore.v1 import agent_pb2, workflow_pb2, workflow_service_pb2

_AGENT_STATES = {
    models.AgentState.IDLE: agent_pb2.AGENT_STATE_IDLE,
    models.AgentState.BUSY: agent_pb2.AGENT_STATE_BUSY,
    models.AgentState.ERROR: agent_pb2.AGENT_STATE_ERROR,
    models.AgentState.OFFLINE: agent_pb2.AGENT_STATE_OFFLINE,
}
_AGENT_STATES_IN = {wire: state for state, wire in _AGENT_STATES.items()}

_REPORTED_STATES_IN = {
    agent_pb2.REPORTED_AGENT_STATE_IDLE: models.ReportedState.IDLE,
    agent_pb2.REPORTED_AGENT_STATE_BUSY: models.ReportedState.BUSY,
    agent_pb2.REPORTED_AGENT_STATE_ERROR: models.ReportedState.ERROR,
}

_RUN_STATES = {
    models.RunState.PENDING: workflow_pb2.RUN_STATE_PENDING,
    models.RunState.RUNNING: workflow_pb2.RUN_STATE_RUNNING,
    models.RunState.SUCCEEDED: workflow_pb2.RUN_STATE_SUCCEEDED,
    models.RunState.FAILED: workflow_pb2.RUN_STATE_FAILED,
    models.RunState.CANCELLED: workflow_pb2.RUN_STATE_CANCELLED,
}
_RUN_STATES_IN = {wire: state for state, wire in _RUN_STATES.items()}

_TASK_STATES = {
    models.TaskState.PENDING: workflow_pb2.TASK_STATE_PENDING,
    models.TaskState.QUEUED: workflow_pb2.TASK_STATE_QUEUED,
    models.TaskState.ASSIGNED: workflow_pb2.TASK_STATE_ASSIGNED,
    models.TaskState.SUCCEEDED: workflow_pb2.TASK_STATE_SUCCEEDED,
    models.TaskState.FAILED: workflow_pb2.TASK_STATE_FAILED,
    models.TaskState.CANCELLED: workflow_pb2.TASK_STATE_CANCELLED,
    models.TaskState.SKIPPED: workflow_pb2.TASK_STATE_SKIPPED,
}


_RUN_VIEWS_IN = {
    workflow_pb2.WORKFLOW_RUN_VIEW_BASIC: models.RunView.BASIC,
    workflow_pb2.WORKFLOW_RUN_VIEW_FULL: models.RunView.FULL,
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

FRAMING_BYTES = 6
"""Bytes a message takes beyond its own as an element of a repeated field: a one-byte tag and
a length of at most five."""


# Scalars -------------------------------------------------------------------------------------


def timestamp(value: datetime | None) -> Timestamp | None:
    """A datetime as a Timestamp; None stays unset. Computed here rather than with
    `Timestamp.FromDatetime`, which is written in Python and costs several times as much; every
    datetime of the domain is timezone-aware."""
    if value is None:
        return None
    since = value - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1_000)


def timestamp_in(message: Timestamp, field: str) -> datetime:
    """A Timestamp as a timezone-aware datetime; one outside 0001-9999 is INVALID_ARGUMENT."""
    if not 0 <= message.nanos <= 999_999_999:
        raise InvalidArgument.single(field, "is not a valid timestamp")
    try:
        return message.ToDatetime(tzinfo=UTC)
    except (OverflowError, ValueError):
        raise InvalidArgument.single(field, "is out of range") from None


def optional_timestamp_in(message: Any, name: str) -> datetime | None:
    """The Timestamp field `name` of `message` as a datetime (see `timestamp_in`); unset is
    None."""
    return timestamp_in(getattr(message, name), name) if message.HasField(name) else None


def struct(value: models.JsonObject | None) -> Struct | None:
    """A JSON object as a Struct; None stays unset."""
    return None if value is None else _struct(value)


def _struct(value: models.JsonObject) -> Struct:
    message = Struct()
    message.update(value)
    return message


def json_object(message: Struct) -> models.JsonObject:
    """A Struct as a plain JSON object. Converted by hand, not with json_format, which raises
    on NaN and infinities: those are the validation's to refuse, naming the field."""
    return {key: _plain(value) for key, value in message.fields.items()}


def _plain(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return json_object(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def duration(message: Duration, field: str) -> timedelta:
    """A Duration as a timedelta; an out-of-range or mixed-sign one is INVALID_ARGUMENT."""
    if (
        not -315_576_000_000 <= message.seconds <= 315_576_000_000
        or not (-999_999_999 <= message.nanos <= 999_999_999)
        or (message.seconds > 0 > message.nanos)
        or (message.seconds < 0 < message.nanos)
    ):
        raise InvalidArgument.single(field, "is not a valid duration")
    try:
        return message.ToTimedelta()
    except OverflowError:
        raise InvalidArgument.single(field, "is out of range") from None


def reported_state_in(value: int, field: str) -> models.ReportedState | None:
    """A wire ReportedAgentState as the domain's; UNSPECIFIED is None, unknown numbers are
    refused."""
    if value == agent_pb2.REPORTED_AGENT_STATE_UNSPECIFIED:
        return None
    if value not in _REPORTED_STATES_IN:
        raise InvalidArgument.single(field, f"unknown reported state {value}")
    return _REPORTED_STATES_IN[value]  # type: ignore[index]


def agent_state_in(value: int, field: str) -> models.AgentState | None:
    """A wire AgentState as the domain's; UNSPECIFIED is None, unknown numbers are refused."""
    if value == agent_pb2.AGENT_STATE_UNSPECIFIED:
        return None
    if value not in _AGENT_STATES_IN:
        raise InvalidArgument.single(field, f"unknown agent state {value}")
    return _AGENT_STATES_IN[value]  # type: ignore[index]


def run_state_in(value: int, field: str) -> models.RunState | None:
    """A wire RunState as the domain's; UNSPECIFIED is None, unknown numbers are refused."""
    if value == workflow_pb2.RUN_STATE_UNSPECIFIED:
        return None
    if value not in _RUN_STATES_IN:
        raise InvalidArgument.single(field, f"unknown run state {value}")
    return _RUN_STATES_IN[value]  # type: ignore[index]


def run_view_in(value: int, field: str) -> models.RunView | None:
    """A wire WorkflowRunView as the domain's; UNSPECIFIED is None (the RPC's default),
    unknown numbers are refused."""
    if value == workflow_pb2.WORKFLOW_RUN_VIEW_UNSPECIFIED:
        return None
    if value not in _RUN_VIEWS_IN:
        raise InvalidArgument.single(field, f"unknown view {value}")
    return _RUN_VIEWS_IN[value]  # type: ignore[index]


# Agents --------------------------------------------------------------------------------------


def agent(value: models.Agent) -> agent_pb2.Agent:
    """A domain agent on the wire."""
    return agent_pb2.Agent(
        agent_id=value.agent_id,
        name=value.name,
        version=value.version,
        capabilities=value.capabilities,
        labels=value.labels,
        max_concurrent_tasks=value.max_concurrent_tasks,
        state=_AGENT_STATES[value.state],
        state_detail=value.state_detail,
        connected=value.connected,
        running_tasks=value.running_tasks,
        registered_at=timestamp(value.registered_at),
        last_seen_at=timestamp(value.last_seen_at),
    )


# Definitions ---------------------------------------------------------------------------------


def _optional_duration(message: Any, name: str, field: str) -> timedelta | None:
    return duration(getattr(message, name), f"{field}.{name}") if message.HasField(name) else None


def retry_policy_in(message: workflow_pb2.RetryPolicy, field: str) -> models.RetryPolicy:
    """A wire retry policy; zero numbers and unset durations mean the server's defaults."""
    return models.RetryPolicy(
        max_attempts=message.max_attempts or None,
        initial_backoff=_optional_duration(message, "initial_backoff", field),
        backoff_multiplier=message.backoff_multiplier or None,
        max_backoff=_optional_duration(message, "max_backoff", field),
    )


def task_spec_in(message: workflow_pb2.TaskSpec, field: str) -> models.TaskSpec:
    """A wire task spec."""
    return models.TaskSpec(
        name=message.name,
        capability=message.capability,
        labels=dict(message.labels),
        input=json_object(message.input),
        depends_on=tuple(message.depends_on),
        timeout=_optional_duration(message, "timeout", field),
        retry_policy=(
            retry_policy_in(message.retry_policy, f"{field}.retry_policy")
            if message.HasField("retry_policy")
            else None
        ),
        fallback=message.fallback,
    )


def definition_in(message: workflow_pb2.WorkflowDefinition, field: str) -> models.DefinitionDraft:
    """A wire definition as a draft: server-set fields are ignored."""
    return models.DefinitionDraft(
        workflow_name=message.workflow_name,
        description=message.description,
        tasks=tuple(
            task_spec_in(task, f"{field}tasks[{index}]") for index, task in enumerate(message.tasks)
        ),
    )


def _duration_out(value: timedelta | None) -> Duration | None:
    if value is None:
        return None
    message = Duration()
    message.FromTimedelta(value)
    return message


def task_spec(value: models.TaskSpec) -> workflow_pb2.TaskSpec:
    """A domain task spec on the wire."""
    policy = value.retry_policy
    return workflow_pb2.TaskSpec(
        name=value.name,
        capability=value.capability,
        labels=value.labels,
        input=struct(value.input),
        depends_on=value.depends_on,
        timeout=_duration_out(value.timeout),
        retry_policy=None
        if policy is None
        else workflow_pb2.RetryPolicy(
            max_attempts=policy.max_attempts or 0,
            initial_backoff=_duration_out(policy.initial_backoff),
            backoff_multiplier=policy.backoff_multiplier or 0.0,
            max_backoff=_duration_out(policy.max_backoff),
        ),
        fallback=value.fallback,
    )


def definition(value: models.WorkflowDefinition) -> workflow_pb2.WorkflowDefinition:
    """A domain definition on the wire."""
    return workflow_pb2.WorkflowDefinition(
        definition_id=value.definition_id,
        workflow_name=value.workflow_name,
        version=value.version,
        description=value.description,
        tasks=[task_spec(task) for task in value.tasks],
        created_at=timestamp(value.created_at),
    )


# Runs ----------------------------------------------------------------------------------------


def task_run(value: models.TaskRun) -> workflow_pb2.TaskRun:
    """A domain task run on the wire."""
    return workflow_pb2.TaskRun(
        task_id=value.task_id,
        name=value.name,
        state=_TASK_STATES[value.state],
        attempt=value.attempt,
        agent_id=value.agent_id,
        output=struct(value.output),
        error=value.error,
        queued_at=timestamp(value.queued_at),
        assigned_at=timestamp(value.assigned_at),
        finished_at=timestamp(value.finished_at),
        not_before=timestamp(value.not_before if value.state is models.TaskState.QUEUED else None),
        deadline=timestamp(value.deadline if value.state is models.TaskState.ASSIGNED else None),
        waiting_reason=value.waiting_reason,
    )


def run(value: models.WorkflowRun) -> workflow_pb2.WorkflowRun:
    """A domain run on the wire."""
    return workflow_pb2.WorkflowRun(
        run_id=value.run_id,
        definition_id=value.definition_id,
        workflow_name=value.workflow_name,
        agent_id=value.agent_id,
        state=_RUN_STATES[value.state],
        input=struct(value.input),
        tasks=[task_run(task) for task in value.tasks],
        created_at=timestamp(value.created_at),
        started_at=timestamp(value.started_at),
        finished_at=timestamp(value.finished_at),
        task_counts=[
            workflow_pb2.TaskStateCount(state=_TASK_STATES[state], count=count)
            for state, count in value.task_counts
        ],
        next_task_page_token=value.next_task_page_token,
    )


class WireSizes:
    """Sizes of the items of responses (runs, tasks, definitions, agents) as responses carry
    them, for cutting responses to fit (see `domain.responses`): measured on the encoded
    message itself."""

    def run(self, value: models.WorkflowRun) -> int:
        """Bytes of a run, with the tasks it holds, as an element of a response."""
        return run(value).ByteSize() + FRAMING_BYTES

    def task(self, value: models.TaskRun) -> int:
        """Bytes of a task as an element of a response."""
        return task_run(value).ByteSize() + FRAMING_BYTES

    def definition(self, value: models.WorkflowDefinition) -> int:
        """Bytes of a definition as an element of a response."""
        return definition(value).ByteSize() + FRAMING_BYTES

    def agent(self, value: models.Agent) -> int:
        """Bytes of an agent as an element of a response."""
        return agent(value).ByteSize() + FRAMING_BYTES

    def assignment(self, value: models.Assignment) -> int:
        """Bytes of an assignment as its stream's message carries it."""
        return assignment(value).ByteSize() + FRAMING_BYTES

    def dependency_output(self, name: str, output: models.JsonObject) -> int:
        """Bytes one entry of `dependency_outputs` adds to an assignment: measured on an
        assignment holding that entry alone, which is the entry and its framing."""
        entry = workflow_pb2.TaskAssignment(dependency_outputs={name: _struct(output)})
        return entry.ByteSize()


def assignment(value: models.Assignment) -> workflow_pb2.TaskAssignment:
    """A domain assignment on the wire."""
    return workflow_pb2.TaskAssignment(
        task_id=value.task_id,
        run_id=value.run_id,
        task_name=value.task_name,
        attempt=value.attempt,
        input=struct(value.input),
        dependency_outputs={
            name: _struct(output) for name, output in value.dependency_outputs.items()
        },
        deadline=timestamp(value.deadline),
        redelivered=value.redelivered,
        capability=value.capability,
        fallback_for=value.fallback_for,
        fallback_error=value.fallback_error,
        omitted_dependency_outputs=value.omitted_outputs,
    )


def cancellation(value: models.Cancellation) -> workflow_pb2.TaskCancellation:
    """A domain cancellation on the wire."""
    return workflow_pb2.TaskCancellation(
        task_id=value.task_id, run_id=value.run_id, attempt=value.attempt, reason=value.reason
    )


def stream_event(value: models.StreamEvent) -> tuple[workflow_service_pb2.StreamTasksResponse, int]:
    """An event of a task stream on the wire, and its size in bytes (what the stream's buffer
    counts): encoded once, when it is queued."""
    if isinstance(value, models.Assignment):
        message = workflow_service_pb2.StreamTasksResponse(assignment=assignment(value))
    else:
        message = workflow_service_pb2.StreamTasksResponse(cancellation=cancellation(value))
    return message, message.ByteSize()
