"""What makes a repeated request the same request (AIP-155), and a repeated result the same
result: a repeat returns what the first did, anything else reusing its identity is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from opscore.domain.errors import RequestIdReused, ResultConflict
from opscore.domain.models import JsonObject, TriggerRequest


def trigger_fingerprint(request: TriggerRequest) -> str:
    """A digest of what a trigger asks for (its definition, input and pin; not its request_id),
    stored with the run so that a repeat of its request_id can be told from a reuse. Computed
    only for triggers that carry a request_id."""
    asked = {
        "definition_id": request.definition_id,
        "workflow_name": request.workflow_name,
        "definition": (
            None if request.definition is None else dataclasses.asdict(request.definition)
        ),
        "agent_id": request.agent_id,
        "input": request.input,
    }
    # Durations (timedelta) print the same for the same value; keys are sorted.
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_repeated_trigger(
    request_id: str, fingerprint: str, run_id: str, stored: str | None
) -> None:
    """Raise `RequestIdReused` unless the trigger repeats the one that started `run_id`. A run
    stored without a fingerprint (before they were kept) is taken as the same request, as it
    was before."""
    if stored is not None and stored != fingerprint:
        raise RequestIdReused(request_id, run_id)


def check_repeated_output(task_id: str, recorded: JsonObject | None, output: JsonObject) -> None:
    """Raise `ResultConflict` unless a repeated completion reports the output recorded."""
    if recorded != output:
        raise ResultConflict(task_id, "succeeded with another output")
