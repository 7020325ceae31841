"""A trigger's fingerprint covers everything it asks for: every field of the request (but its
request_id), of an inline definition, of its tasks and of their retry policies."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from opscore.domain.idempotency import trigger_fingerprint
from opscore.domain.models import DefinitionDraft, RetryPolicy, TaskSpec, TriggerRequest

POLICY = RetryPolicy(3, timedelta(seconds=1), 2.0, timedelta(seconds=60))
TASK = TaskSpec(
    "a",
    capability="c",
    labels={"zone": "eu"},
    input={"k": 1},
    depends_on=("b",),
    timeout=timedelta(seconds=5),
    retry_policy=POLICY,
    fallback="f",
)
DRAFT = DefinitionDraft("wf", "about", (TASK,))
REQUEST = TriggerRequest("d-1", "wf", DRAFT, "a-1", {"n": 1}, "r-1")

OTHER: dict[str, Any] = {
    "definition_id": "d-2",
    "workflow_name": "other",
    "definition": None,
    "agent_id": "a-2",
    "input": {"n": 2},
    "description": "else",
    "tasks": (),
    "name": "z",
    "capability": "gpu",
    "labels": {"zone": "us"},
    "depends_on": ("c",),
    "timeout": timedelta(seconds=6),
    "retry_policy": None,
    "fallback": "g",
    "max_attempts": 4,
    "initial_backoff": timedelta(seconds=2),
    "backoff_multiplier": 3.0,
    "max_backoff": timedelta(seconds=61),
}
"""Another value for each field (a field added to a model needs one here)."""


def variants() -> list[tuple[str, TriggerRequest]]:
    """The request with one field changed, for every field that counts."""
    found = []
    for field in dataclasses.fields(RetryPolicy):
        policy = dataclasses.replace(POLICY, **{field.name: OTHER[field.name]})
        task = dataclasses.replace(TASK, retry_policy=policy)
        found.append((f"retry_policy.{field.name}", with_task(task)))
    for field in dataclasses.fields(TaskSpec):
        found.append(
            (
                f"task.{field.name}",
                with_task(dataclasses.replace(TASK, **{field.name: OTHER[field.name]})),
            )
        )
    for field in dataclasses.fields(DefinitionDraft):
        draft = dataclasses.replace(DRAFT, **{field.name: OTHER[field.name]})
        found.append((f"definition.{field.name}", dataclasses.replace(REQUEST, definition=draft)))
    for field in dataclasses.fields(TriggerRequest):
        if field.name != "request_id":
            changed = dataclasses.replace(REQUEST, **{field.name: OTHER[field.name]})
            found.append((field.name, changed))
    return found


def with_task(task: TaskSpec) -> TriggerRequest:
    return dataclasses.replace(REQUEST, definition=dataclasses.replace(DRAFT, tasks=(task,)))


def test_the_same_request_has_the_same_fingerprint_whatever_its_request_id() -> None:
    again = dataclasses.replace(REQUEST, request_id="r-2", input={"n": 1})
    assert trigger_fingerprint(again) == trigger_fingerprint(REQUEST)


@pytest.mark.parametrize(("field", "changed"), variants(), ids=[name for name, _ in variants()])
def test_every_field_changes_the_fingerprint(field: str, changed: TriggerRequest) -> None:
    assert trigger_fingerprint(changed) != trigger_fingerprint(REQUEST), field
