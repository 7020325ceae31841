"""How the operator commands print what the server answered: as the protobuf JSON form of the
messages (field names as in the protos, enums by name), or as tables (rich)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from opscore.v1 import agent_pb2, workflow_pb2

STATE_STYLES = {
    "SUCCEEDED": "green",
    "FAILED": "red",
    "CANCELLED": "yellow",
    "SKIPPED": "dim",
    "RUNNING": "cyan",
    "ASSIGNED": "cyan",
    "IDLE": "green",
    "BUSY": "cyan",
    "ERROR": "red",
    "OFFLINE": "dim",
}
"""The colour of each state's name in a table."""


def as_json(message: Message) -> dict[str, Any]:
    """A message in its protobuf JSON form, every field present (so scripts find each key),
    with the field names of the protos."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def listing(key: str, items: Iterable[Message], next_page_token: str) -> dict[str, Any]:
    """A page as one JSON document, shaped as the List RPC's response."""
    return {key: [as_json(item) for item in items], "next_page_token": next_page_token}


def state_name(prefix: str, name: str) -> Text:
    """An enum value's name without its prefix (`RUN_STATE_`), coloured by state."""
    short = name.removeprefix(prefix)
    return Text(short, style=STATE_STYLES.get(short, ""))


def run_state(state: workflow_pb2.RunState.ValueType) -> Text:
    """A run's state, for a table."""
    return state_name("RUN_STATE_", workflow_pb2.RunState.Name(state))


def task_state(state: workflow_pb2.TaskState.ValueType) -> Text:
    """A task's state, for a table."""
    return state_name("TASK_STATE_", workflow_pb2.TaskState.Name(state))


def agent_state(state: agent_pb2.AgentState.ValueType) -> Text:
    """An agent's state, for a table."""
    return state_name("AGENT_STATE_", agent_pb2.AgentState.Name(state))


def moment(stamp: Timestamp) -> str:
    """A timestamp as UTC to the second; empty when unset."""
    if not stamp.seconds and not stamp.nanos:
        return ""
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def compact(value: Struct) -> str:
    """A Struct as compact JSON, for a cell (its whole numbers written as such: a Struct holds
    every number as a double), its keys sorted (a Struct's map has no order)."""
    if not value:
        return ""
    return json.dumps(
        _whole(json_format.MessageToDict(value)), separators=(",", ":"), sort_keys=True
    )


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole(item) for item in value]
    return value


def table(*columns: str) -> Table:
    """A table of `columns`, its cells folded rather than cut (ids stay whole)."""
    shown = Table(header_style="bold", box=None, pad_edge=False)
    for column in columns:
        shown.add_column(column, overflow="fold")
    return shown


def fields(rows: Sequence[tuple[str, RenderableType]]) -> Table:
    """A two-column table of one thing's fields."""
    shown = Table.grid(padding=(0, 2))
    shown.add_column(style="bold")
    shown.add_column(overflow="fold")
    for name, value in rows:
        shown.add_row(name, value)
    return shown


def agents_table(agents: Iterable[agent_pb2.Agent]) -> Table:
    """Agents, one a row."""
    shown = table("AGENT", "NAME", "STATE", "CAPABILITIES", "TASKS", "LAST SEEN")
    for agent in agents:
        shown.add_row(
            agent.agent_id,
            agent.name,
            agent_state(agent.state),
            ", ".join(agent.capabilities),
            f"{agent.running_tasks}/{agent.max_concurrent_tasks}",
            moment(agent.last_seen_at),
        )
    return shown


def agent_fields(agent: agent_pb2.Agent) -> Table:
    """One agent in full."""
    labels = ", ".join(f"{key}={value}" for key, value in sorted(agent.labels.items()))
    return fields(
        [
            ("agent", agent.agent_id),
            ("name", agent.name),
            ("version", agent.version),
            ("state", agent_state(agent.state)),
            ("detail", agent.state_detail),
            ("connected", "yes" if agent.connected else "no"),
            ("capabilities", ", ".join(agent.capabilities)),
            ("labels", labels),
            ("tasks", f"{agent.running_tasks} of {agent.max_concurrent_tasks}"),
            ("registered", moment(agent.registered_at)),
            ("last seen", moment(agent.last_seen_at)),
        ]
    )


def definitions_table(definitions: Iterable[workflow_pb2.WorkflowDefinition]) -> Table:
    """Definitions, one a row."""
    shown = table("DEFINITION", "WORKFLOW", "VERSION", "TASKS", "CREATED")
    for definition in definitions:
        shown.add_row(
            definition.definition_id,
            definition.workflow_name,
            str(definition.version),
            str(len(definition.tasks)),
            moment(definition.created_at),
        )
    return shown


def definition_view(definition: workflow_pb2.WorkflowDefinition) -> Group:
    """One definition: its fields, then its tasks."""
    tasks = table("TASK", "CAPABILITY", "DEPENDS ON", "TIMEOUT", "FALLBACK", "INPUT")
    for spec in definition.tasks:
        timeout = spec.timeout.ToTimedelta() if spec.HasField("timeout") else None
        tasks.add_row(
            spec.name,
            spec.capability,
            ", ".join(spec.depends_on),
            "" if timeout is None else f"{timeout.total_seconds():g}s",
            spec.fallback,
            compact(spec.input),
        )
    header = fields(
        [
            ("definition", definition.definition_id),
            ("workflow", f"{definition.workflow_name} (version {definition.version})"),
            ("description", definition.description),
            ("created", moment(definition.created_at)),
        ]
    )
    return Group(header, Text(""), tasks)


def counts(run: workflow_pb2.WorkflowRun) -> str:
    """A run's task counts: `2 SUCCEEDED, 1 QUEUED`."""
    return ", ".join(
        f"{each.count} {workflow_pb2.TaskState.Name(each.state).removeprefix('TASK_STATE_')}"
        for each in run.task_counts
    )


def runs_table(runs: Iterable[workflow_pb2.WorkflowRun]) -> Table:
    """Runs, one a row."""
    shown = table("RUN", "WORKFLOW", "STATE", "TASKS", "AGENT", "CREATED")
    for run in runs:
        shown.add_row(
            run.run_id,
            run.workflow_name,
            run_state(run.state),
            counts(run),
            run.agent_id,
            moment(run.created_at),
        )
    return shown


def tasks_table(tasks: Iterable[workflow_pb2.TaskRun]) -> Table:
    """A run's tasks, one a row: what each is doing, or why it waits, or how it ended."""
    shown = table("TASK", "STATE", "ATTEMPT", "AGENT", "DETAIL")
    for each in tasks:
        detail = each.error or each.waiting_reason or compact(each.output)
        shown.add_row(each.name, task_state(each.state), str(each.attempt), each.agent_id, detail)
    return shown


def run_view(run: workflow_pb2.WorkflowRun) -> Group:
    """One run: its fields, then its tasks."""
    header = fields(
        [
            ("run", run.run_id),
            ("workflow", run.workflow_name),
            ("definition", run.definition_id or "(inline)"),
            ("state", run_state(run.state)),
            ("agent", run.agent_id),
            ("input", compact(run.input)),
            ("created", moment(run.created_at)),
            ("started", moment(run.started_at)),
            ("finished", moment(run.finished_at)),
        ]
    )
    return Group(header, Text(""), tasks_table(run.tasks))


def next_page(token: str) -> Text:
    """The hint under a page that is not the last."""
    return Text(f"more: --page-token {token}", style="dim")
