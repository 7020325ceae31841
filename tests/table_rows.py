"""Rows of the `definitions`, `runs` and `tasks` tables as the store inserts them, for tests that
write rows directly: every column a new row names, with values a test can override."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def a_definition(definition_id: str, created: datetime, description: str = "") -> dict[str, Any]:
    """A new definition's row, of no tasks, named by its id."""
    return {
        "definition_id": definition_id,
        "name": definition_id,
        "version": 1,
        "description": description,
        "tasks": [],
        "request_id": None,
        "created_at": created,
    }


def a_run(run_id: str, created: datetime, run_input: dict[str, Any]) -> dict[str, Any]:
    """A new run's row."""
    return {
        "run_id": run_id,
        "definition_id": None,
        "workflow_name": "flow",
        "agent_id": None,
        "state": "pending",
        "input": run_input,
        "request_id": f"req-{run_id}",
        "created_at": created,
    }


def a_task(task_id: str, run_id: str, position: int, **values: Any) -> dict[str, Any]:
    """A new task's row: task `t{position}` of a chain, queued, unless `values` say otherwise."""
    task = {
        "task_id": task_id,
        "run_id": run_id,
        "position": position,
        "name": f"t{position}",
        "capability": "work",
        "labels": {"zone": "ü"},
        "depends_on": [f"t{position - 1}"] if position else [],
        "fallback": "",
        "timeout_ms": None,
        "retry_policy": None,
        "pinned_agent_id": None,
        "input": {},
        "state": "queued",
        "attempt": 0,
        "agent_id": None,
        "output": None,
        "error": "",
        "queued_at": None,
    }
    task.update(values)
    return task
