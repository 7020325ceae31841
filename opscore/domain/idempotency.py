"""What makes a repeated request the same request (AIP-155), and a repeated result the same
result: a repeat returns what the first did, anything else reusing its identity is refused."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from opscore.domain.errors import RequestIdReused, Resource, ResultConflict
from opscore.domain.models import (
    DefinitionDraft,
    JsonObject,
    TaskSpec,
    TriggerRequest,
    WorkflowDefinition,
)


def trigger_fingerprint(request: TriggerRequest) -> str:
    """A digest of what a trigger asks for (its definition, input and pin; not its request_id),
    stored with the run so that a repeat of its request_id can be told from a reuse. Computed
    only for triggers that carry a request_id."""
    inline = request.definition
    asked = (
        request.definition_id,
        request.workflow_name,
        None if inline is None else _definition(inline),
        request.agent_id,
        request.input,
    )
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _definition(draft: DefinitionDraft) -> tuple[object, ...]:
    """An inline definition as JSON can hold it, field by field, because `dataclasses.asdict`
    costs an order of magnitude more on the trigger path (docs/requests.md). Every field counts
    (a test holds this true as fields are added)."""
    return (draft.workflow_name, draft.description, [_task(task) for task in draft.tasks])


def _task(task: TaskSpec) -> tuple[object, ...]:
    policy = task.retry_policy
    return (
        task.name,
        task.capability,
        task.labels,
        task.input,
        task.depends_on,
        _seconds(task.timeout),
        None
        if policy is None
        else (
            policy.max_attempts,
            _seconds(policy.initial_backoff),
            policy.backoff_multiplier,
            _seconds(policy.max_backoff),
        ),
        task.fallback,
    )


def _seconds(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def check_repeated_trigger(
    request_id: str, fingerprint: str, run_id: str, stored: str | None
) -> None:
    """Raise `RequestIdReused` unless the trigger repeats the one that started `run_id`. A run
    stored without a fingerprint (before they were kept) is taken as the same request, as it
    was before."""
    if stored is not None and stored != fingerprint:
        raise RequestIdReused(request_id, Resource.RUN, run_id)


def check_repeated_definition(
    request_id: str, draft: DefinitionDraft, stored: WorkflowDefinition
) -> None:
    """Raise `RequestIdReused` unless `draft` is the definition `request_id` created. The
    stored definition keeps every field of its draft, so they are compared whole."""
    created = DefinitionDraft(stored.workflow_name, stored.description, stored.tasks)
    if _definition(created) != _definition(draft):
        raise RequestIdReused(request_id, Resource.DEFINITION, stored.definition_id)


def check_repeated_output(task_id: str, recorded: JsonObject | None, output: JsonObject) -> None:
    """Raise `ResultConflict` unless a repeated completion reports the output recorded."""
    if recorded != output:
        raise ResultConflict(task_id, "succeeded with another output")
