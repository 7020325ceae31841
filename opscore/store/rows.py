"""Rows in, domain objects out (and specs to JSON and back): the only code that knows both the
column layout and the domain's dataclasses, so the rest of the code never sees a row.
"""

from __future__ import annotations

import functools
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import Row

from opscore.domain.models import (
    Agent,
    ReadyTask,
    ReportedState,
    RetryPolicy,
    RunState,
    TaskRun,
    TaskSpec,
    TaskState,
    WorkflowDefinition,
    WorkflowRun,
)
from opscore.domain.responses import count_states
from opscore.domain.state import QueuedTask, RunShape, TaskNow, TaskShape

TASK_STATES: dict[str, TaskState] = {state.value: state for state in TaskState}
"""Stored task states to the enum: a dictionary lookup, where calling the enum costs a
microsecond, on every task of every run a completion reads."""


def millis(value: timedelta | None) -> int | None:
    """A duration as stored: whole milliseconds."""
    return None if value is None else round(value.total_seconds() * 1000)


def _delta(value: int | None) -> timedelta | None:
    return None if value is None else timedelta(milliseconds=value)


def retry_to_json(policy: RetryPolicy | None) -> dict[str, Any] | None:
    """A retry policy as stored: durations in milliseconds, unset fields omitted."""
    if policy is None:
        return None
    stored = {
        "max_attempts": policy.max_attempts,
        "initial_backoff_ms": millis(policy.initial_backoff),
        "backoff_multiplier": policy.backoff_multiplier,
        "max_backoff_ms": millis(policy.max_backoff),
    }
    return {key: value for key, value in stored.items() if value is not None}


def retry_from_json(stored: dict[str, Any] | None) -> RetryPolicy | None:
    """The inverse of `retry_to_json`."""
    if stored is None:
        return None
    return RetryPolicy(
        max_attempts=stored.get("max_attempts"),
        initial_backoff=_delta(stored.get("initial_backoff_ms")),
        backoff_multiplier=stored.get("backoff_multiplier"),
        max_backoff=_delta(stored.get("max_backoff_ms")),
    )


def spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    """A task spec as stored inside a definition's JSON document."""
    return {
        "name": spec.name,
        "capability": spec.capability,
        "labels": spec.labels,
        "input": spec.input,
        "depends_on": list(spec.depends_on),
        "timeout_ms": millis(spec.timeout),
        "retry_policy": retry_to_json(spec.retry_policy),
        "fallback": spec.fallback,
    }


def spec_from_json(stored: dict[str, Any]) -> TaskSpec:
    """The inverse of `spec_to_json`."""
    return TaskSpec(
        name=stored["name"],
        capability=stored["capability"],
        labels=dict(stored["labels"]),
        input=dict(stored["input"]),
        depends_on=tuple(stored["depends_on"]),
        timeout=_delta(stored["timeout_ms"]),
        retry_policy=retry_from_json(stored["retry_policy"]),
        fallback=stored["fallback"],
    )


def definition(row: Row[Any]) -> WorkflowDefinition:
    """A `definitions` row as a domain definition."""
    return WorkflowDefinition(
        definition_id=row.definition_id,
        workflow_name=row.name,
        version=row.version,
        description=row.description,
        tasks=tuple(spec_from_json(task) for task in row.tasks),
        created_at=row.created_at,
    )


def agent(row: Row[Any], capabilities: tuple[str, ...], running_tasks: int) -> Agent:
    """An `agents` row, its capabilities and its running-task count as a domain agent."""
    return Agent(
        agent_id=row.agent_id,
        name=row.name,
        version=row.version,
        capabilities=capabilities,
        labels=dict(row.labels),
        max_concurrent_tasks=row.max_concurrent_tasks,
        reported_state=ReportedState(row.reported_state),
        state_detail=row.state_detail,
        connected=row.connected,
        running_tasks=running_tasks,
        registered_at=row.registered_at,
        last_seen_at=row.last_seen_at,
    )


def task_run(row: Row[Any]) -> TaskRun:
    """A whole `tasks` row as a domain task run."""
    values = row._mapping
    return TaskRun(
        task_id=values["task_id"],
        run_id=values["run_id"],
        name=values["name"],
        position=values["position"],
        state=TASK_STATES[values["state"]],
        attempt=values["attempt"],
        agent_id=values["agent_id"] or "",
        output=values["output"],
        error=values["error"],
        queued_at=values["queued_at"],
        assigned_at=values["assigned_at"],
        finished_at=values["finished_at"],
        deadline=values["deadline"],
        capability=values["capability"],
        labels=dict(values["labels"]),
        depends_on=tuple(values["depends_on"]),
        fallback=values["fallback"],
        pinned_agent_id=values["pinned_agent_id"] or "",
        not_before=values["not_before"],
    )


def task_shape(row: Any) -> TaskShape:
    """A row of the columns of `TaskShape`, `depends_on` and `labels` read as JSON text (runs
    of one definition repeat the same few values, decoded once through a cache)."""
    return TaskShape(
        task_id=row.task_id,
        depends_on=_json_names(row.depends_on),
        fallback=row.fallback,
        capability=row.capability,
        labels=_json_labels(row.labels),
        pinned_agent_id=row.pinned_agent_id or "",
    )


@functools.lru_cache(maxsize=4096)
def _json_names(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


@functools.lru_cache(maxsize=4096)
def _json_labels(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(json.loads(text).items()))


def held_task(row: Any, shape: RunShape) -> QueuedTask:
    """A whole row of a task an agent holds, as its assignment is composed again."""
    return QueuedTask(
        row.task_id,
        row.run_id,
        row.name,
        row.capability,
        row.input,
        tuple(row.depends_on),
        row.attempt,
        row.timeout_ms,
        row.name in shape.fallbacks,
    )


def task_now(row: Any) -> TaskNow:
    """The changing part of a task, from a row with its columns."""
    return TaskNow(
        row.task_id,
        row.name,
        TASK_STATES[row.state],
        row.attempt,
        row.agent_id or "",
        row.error,
        row.error_reported,
    )


def ready_task(row: Any) -> ReadyTask:
    """The dispatcher's view of a `tasks` row of `queries.base.READY_TASK_COLUMNS` (labels read
    as JSON text, decoded once through the cache)."""
    return ReadyTask(
        task_id=row.task_id,
        run_id=row.run_id,
        capability=row.capability,
        labels=_json_labels(row.labels),
        pinned_agent_id=row.pinned_agent_id or "",
        not_before=row.not_before,
    )


def workflow_run(
    row: Row[Any],
    tasks: list[TaskRun],
    task_counts: tuple[tuple[TaskState, int], ...] | None = None,
) -> WorkflowRun:
    """A `runs` row and its tasks as a domain run, tasks in definition order; its task counts
    are counted from `tasks` unless given."""
    return WorkflowRun(
        run_id=row.run_id,
        definition_id=row.definition_id or "",
        workflow_name=row.workflow_name,
        agent_id=row.agent_id or "",
        state=RunState(row.state),
        input=dict(row.input),
        tasks=tuple(sorted(tasks, key=lambda task: task.position)),
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        task_counts=count_states(tasks) if task_counts is None else task_counts,
    )
