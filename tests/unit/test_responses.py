"""The arithmetic of cutting responses: with the default limits, the largest run and the largest
task each fit in one response to a default client, and pages cut by bytes stay within their
budget without losing or repeating an item."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

from opscore.api.convert import WireSizes, stream_event
from opscore.api.convert import assignment as assignment_message
from opscore.config import Settings
from opscore.domain.models import Assignment, JsonObject, RunState, TaskRun, TaskState, WorkflowRun
from opscore.domain.responses import (
    DEFAULT_CLIENT_MESSAGE_BYTES,
    Budget,
    fit_assignment,
    response_bytes,
)
from opscore.domain.validation import MAX_NAME_LENGTH, Limits
from opscore.store.queries.pages import read_by_bytes

NOW = datetime(2026, 12, 7, tzinfo=UTC)
ID = "0" * 128


def at_limit(limit: int) -> dict[str, str]:
    """A JSON object of exactly `limit` bytes as compact JSON."""
    value = {"v": "x" * (limit - len('{"v":""}'))}
    assert len(json.dumps(value, separators=(",", ":"))) == limit
    return value


def largest_run(limits: Limits) -> WorkflowRun:
    """A run with every field at its largest: ids, name, input at the payload limit, and a
    count for every task state."""
    return WorkflowRun(
        run_id=ID,
        definition_id=ID,
        workflow_name="n" * MAX_NAME_LENGTH,
        agent_id=ID,
        state=RunState.SUCCEEDED,
        input=at_limit(limits.max_payload_bytes),
        tasks=(),
        created_at=NOW,
        started_at=NOW,
        finished_at=NOW,
        task_counts=tuple((state, limits.max_tasks_per_definition) for state in TaskState),
        next_task_page_token="t" * 256,
    )


def largest_task(limits: Limits) -> TaskRun:
    """A task with every field at its largest: output at the payload limit, and an error at its
    own limit as well (a task that failed before it succeeded keeps both)."""
    return TaskRun(
        task_id=ID,
        run_id=ID,
        name="n" * MAX_NAME_LENGTH,
        position=limits.max_tasks_per_definition - 1,
        state=TaskState.QUEUED,
        attempt=limits.max_attempts,
        agent_id=ID,
        output=at_limit(limits.max_payload_bytes),
        error="e" * limits.max_error_bytes,
        queued_at=NOW,
        assigned_at=NOW,
        finished_at=NOW,
        deadline=NOW,
        not_before=NOW,
    )


def test_with_the_defaults_the_largest_run_and_task_fit_one_response_together() -> None:
    settings = Settings()
    budget = response_bytes(settings.max_message_bytes)
    sizes = WireSizes()
    run, one_task = largest_run(settings.limits), largest_task(settings.limits)

    assert budget <= DEFAULT_CLIENT_MESSAGE_BYTES
    # A run with one task: GetWorkflowRun of the largest run carries at least one task, and a
    # page of ListWorkflowRunTasks always has room for the largest task.
    assert sizes.run(run) + sizes.task(one_task) <= budget
    # Pages of runs hold a few of the largest, not one: paging moves on at a useful pace.
    assert budget // sizes.run(run) >= 3


def test_the_budget_is_within_the_server_limit_and_the_default_client_limit() -> None:
    assert response_bytes(4 * 1024 * 1024) == 4 * 1024 * 1024 - 16 * 1024
    assert response_bytes(64 * 1024 * 1024) == response_bytes(4 * 1024 * 1024)
    assert response_bytes(256 * 1024) == 256 * 1024 - 16 * 1024
    assert response_bytes(1000) == 750


def test_pages_cut_by_bytes_hold_every_item_once_within_their_budget() -> None:
    chooser = random.Random(7)
    sizes = [chooser.choice([1, 10, 100, 900, 2500]) for _ in range(500)]
    budget = 2000

    def fetch(start: int | None, limit: int) -> list[int]:
        begin = start or 0
        return list(range(begin, min(begin + limit, len(sizes))))

    seen: list[int] = []
    start: int | None = None
    while True:
        page, rest, used = read_by_bytes(
            lambda first, limit, origin=start: fetch(origin if first is None else first, limit),
            lambda item: item,
            lambda item: sizes[item],
            50,
            budget,
        )
        assert 1 <= len(page) <= 50
        assert used == sum(sizes[item] for item in page)
        assert used <= budget or len(page) == 1  # a single item too large still moves on
        if rest is not None:
            assert len(page) == 50 or used + sizes[rest] > budget
        seen.extend(page)
        if rest is None:
            break
        start = rest
    assert seen == list(range(len(sizes)))


def test_a_page_that_need_not_hold_an_item_holds_none_that_does_not_fit() -> None:
    page, rest, used = read_by_bytes(
        lambda start, limit: [5, 6][:limit],
        lambda item: item,
        lambda item: 100,
        10,
        50,
        at_least_one=False,
    )
    assert (page, rest, used) == ([], 5, 0)


def assignment_with(input_: JsonObject, outputs: dict[str, JsonObject]) -> Assignment:
    """An assignment with every id at its largest, `input_` and `outputs` (in that order)."""
    return Assignment(
        task_id=ID,
        run_id=ID,
        task_name="n" * MAX_NAME_LENGTH,
        capability="c" * MAX_NAME_LENGTH,
        attempt=1,
        agent_id=ID,
        input=input_,
        dependency_outputs=outputs,
        deadline=NOW,
    )


def test_an_assignment_keeps_its_outputs_in_dependency_order_while_they_fit() -> None:
    budget = Budget(8_000, WireSizes())
    outputs = {name: at_limit(size) for name, size in [("z", 3000), ("a", 3000), ("m", 3000)]}
    outputs["small"] = {"v": 1}

    fitted = fit_assignment(assignment_with({"in": 1}, outputs), budget)

    # "m" does not fit; "small" would, but comes after it: the cut keeps a prefix, as pages do.
    assert list(fitted.dependency_outputs) == ["z", "a"]
    assert fitted.dependency_outputs["z"] == outputs["z"]
    assert fitted.omitted_outputs == ("m", "small")
    assert fitted.input == {"in": 1}
    assert WireSizes().assignment(fitted) <= budget.bytes
    assert assignment_message(fitted).omitted_dependency_outputs == ["m", "small"]


def test_an_assignment_that_fits_is_left_as_it_is() -> None:
    outputs: dict[str, JsonObject] = {"a": {"v": 1}, "b": {"v": 2}}
    fitted = fit_assignment(assignment_with({}, outputs), Budget(10_000, WireSizes()))
    assert fitted.dependency_outputs == outputs
    assert fitted.omitted_outputs == ()


def test_an_input_over_the_budget_alone_is_sent_whole_without_outputs() -> None:
    """The input is never cut (see docs/api.md): every output is left out instead."""
    big_input = at_limit(20_000)
    fitted = fit_assignment(
        assignment_with(big_input, {"a": {"v": 1}}), Budget(10_000, WireSizes())
    )
    assert fitted.input == big_input
    assert fitted.dependency_outputs == {}
    assert fitted.omitted_outputs == ("a",)


def test_with_the_defaults_an_assignment_carries_two_outputs_at_the_limit() -> None:
    """An input and outputs at the payload limit: two outputs fit beside the input in one
    message to a default client, and the third is named for the agent to read."""
    settings = Settings()
    limit = settings.limits.max_payload_bytes
    outputs = {f"d{index}": at_limit(limit) for index in range(4)}
    budget = Budget(response_bytes(settings.max_message_bytes), WireSizes())

    fitted = fit_assignment(assignment_with(at_limit(limit), outputs), budget)

    assert list(fitted.dependency_outputs) == ["d0", "d1"]
    assert fitted.omitted_outputs == ("d2", "d3")
    assert stream_event(fitted)[1] <= DEFAULT_CLIENT_MESSAGE_BYTES
