"""Results and what follows from them, over a real gRPC channel: failures fail the run and skip
the rest, results from the wrong holder change nothing, repeated results are harmless,
cancellation stops holders, requests with a request_id are idempotent, listings page and filter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import pytest
from conftest import ServerFactory, serve
from helpers import (
    Client,
    as_dict,
    bad_request,
    complete_request,
    definition,
    refused,
    resource_of,
    task,
    tasks_of,
)
from opscore.v1 import workflow_pb2, workflow_service_pb2

from opscore.domain.validation import Limits

# Helpers -------------------------------------------------------------------------------------


async def list_runs(client: Client, **fields: Any) -> workflow_service_pb2.ListWorkflowRunsResponse:
    """One page of ListWorkflowRuns."""
    return await client.workflows.ListWorkflowRuns(
        workflow_service_pb2.ListWorkflowRunsRequest(**fields)
    )


class Page(Protocol):
    """A page of a listing: it names the next page, if any."""

    @property
    def next_page_token(self) -> str: ...


PageT = TypeVar("PageT", bound=Page)
ItemT = TypeVar("ItemT")


async def walk_pages(
    fetch: Callable[[str], Awaitable[PageT]],
    items: Callable[[PageT], Sequence[ItemT]],
    pages: int = 10,
) -> tuple[list[ItemT], list[int], str]:
    """Fetch the first page, then the page each token names, until a page carries no token or
    `pages` pages are fetched: every item in order, each page's size, and the last page's token
    ("" if it was the last page)."""
    found: list[ItemT] = []
    sizes: list[int] = []
    token = ""
    for _ in range(pages):
        page = await fetch(token)
        sizes.append(len(items(page)))
        found.extend(items(page))
        token = page.next_page_token
        if not token:
            break
    return found, sizes, token


async def all_runs(client: Client, **filters: Any) -> list[workflow_pb2.WorkflowRun]:
    """Every run matching the filters, following page tokens."""
    found, _, token = await walk_pages(
        lambda token: list_runs(client, page_size=1000, page_token=token, **filters),
        lambda page: page.runs,
        pages=100,
    )
    if token:
        raise AssertionError("ListWorkflowRuns never reached its last page")
    return found


async def run_ids(client: Client, **filters: Any) -> set[str]:
    """The ids of every run matching the filters."""
    return {run.run_id for run in await all_runs(client, **filters)}


async def list_definitions(
    client: Client, **fields: Any
) -> workflow_service_pb2.ListWorkflowDefinitionsResponse:
    """One page of ListWorkflowDefinitions."""
    return await client.workflows.ListWorkflowDefinitions(
        workflow_service_pb2.ListWorkflowDefinitionsRequest(**fields)
    )


async def cancel(client: Client, run_id: str) -> workflow_pb2.WorkflowRun:
    """Cancel a run; returns the run as the response carries it."""
    response = await client.workflows.CancelWorkflowRun(
        workflow_service_pb2.CancelWorkflowRunRequest(run_id=run_id)
    )
    return response.run


# FailTask ------------------------------------------------------------------------------------


async def test_fail_task_fails_run_skips_the_rest_and_cancels_other_holders(
    client: Client,
) -> None:
    left_agent = await client.agent("left-agent", capabilities=["left"])
    right_agent = await client.agent("right-agent", capabilities=["right"])
    run = await client.trigger(
        definition=definition(
            "fan-in",
            task("left", capability="left"),
            task("right", capability="right"),
            task("join", depends_on=["left", "right"]),
            task("after", depends_on=["join"]),
        )
    )
    left = await left_agent.next_assignment()
    right = await right_agent.next_assignment()
    assert (left.task_name, right.task_name) == ("left", "right")

    await left_agent.fail(left, "disk on fire")

    cancellation = await right_agent.next_cancellation()
    assert cancellation.task_id == right.task_id
    assert cancellation.run_id == run.run_id
    assert cancellation.attempt == right.attempt
    failed = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_FAILED)
    assert failed.HasField("finished_at")
    tasks = tasks_of(failed)
    assert tasks["left"].state == workflow_pb2.TASK_STATE_FAILED
    assert tasks["left"].error == "disk on fire"
    assert tasks["left"].agent_id == "left-agent"
    assert tasks["left"].HasField("finished_at")
    for name in ("right", "join", "after"):
        assert tasks[name].state == workflow_pb2.TASK_STATE_SKIPPED, name
        assert tasks[name].HasField("finished_at"), name
        assert not tasks[name].HasField("output"), name
    await left_agent.expect_nothing()

    # The skipped task's late result is refused and changes nothing.
    await refused(
        client.workflows.CompleteTask(complete_request(right, "right-agent", output={"x": 1})),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    after = await client.run(run.run_id)
    assert after.state == workflow_pb2.RUN_STATE_FAILED
    assert tasks_of(after)["right"].state == workflow_pb2.TASK_STATE_SKIPPED
    assert not tasks_of(after)["right"].HasField("output")
    assert (await right_agent.get()).running_tasks == 0


# CompleteTask from the wrong holder ----------------------------------------------------------


async def test_complete_from_wrong_agent_or_attempt_is_refused_and_changes_nothing(
    client: Client,
) -> None:
    worker = await client.agent("worker", capabilities=["work"])
    await client.agent("intruder", capabilities=["other"])
    run = await client.trigger(definition=definition("one", task("job", capability="work")))
    assignment = await worker.next_assignment()
    before = await client.run(run.run_id)

    wrong = [
        complete_request(assignment, "intruder", output={"stolen": True}),
        complete_request(assignment, "unregistered-agent", output={"stolen": True}),
        complete_request(assignment, "worker", attempt=assignment.attempt + 1, output={"x": 1}),
    ]
    for request in wrong:
        await refused(client.workflows.CompleteTask(request), grpc.StatusCode.FAILED_PRECONDITION)
    await refused(
        client.workflows.FailTask(
            workflow_service_pb2.FailTaskRequest(
                task_id=assignment.task_id, agent_id="intruder", attempt=1, error="sabotage"
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )

    after = await client.run(run.run_id)
    assert after == before
    job = tasks_of(after)["job"]
    assert job.state == workflow_pb2.TASK_STATE_ASSIGNED
    assert job.agent_id == "worker"
    assert job.attempt == assignment.attempt
    assert not job.HasField("output")
    assert not job.HasField("finished_at")
    assert job.error == ""
    assert after.state == workflow_pb2.RUN_STATE_RUNNING

    # The rightful holder still completes it.
    await worker.complete(assignment, {"done": True})
    done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    assert as_dict(tasks_of(done)["job"].output) == {"done": True}


async def test_complete_unknown_task_is_not_found(client: Client) -> None:
    await client.agent("worker")
    task_id = "0190d2c1-0000-7000-8000-000000000000"
    error = await refused(
        client.workflows.CompleteTask(
            workflow_service_pb2.CompleteTaskRequest(task_id=task_id, agent_id="worker", attempt=1)
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert resource_of(error) == ("opscore.v1.TaskRun", task_id)


@pytest.mark.parametrize("attempt", [0, -1])
async def test_complete_with_attempt_below_one_names_attempt(client: Client, attempt: int) -> None:
    worker = await client.agent("worker")
    run = await client.trigger(definition=definition("one", task("job")))
    assignment = await worker.next_assignment()
    error = await refused(
        client.workflows.CompleteTask(complete_request(assignment, "worker", attempt=attempt)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(bad_request(error)) == {"attempt"}
    assert "attempt" in (error.details() or "")
    assert tasks_of(await client.run(run.run_id))["job"].state == workflow_pb2.TASK_STATE_ASSIGNED


# Repeated results ----------------------------------------------------------------------------


async def test_repeated_complete_is_ok_and_records_nothing_new(client: Client) -> None:
    worker = await client.agent("worker", max_concurrent_tasks=4)
    run = await client.trigger(
        definition=definition(
            "chain", task("first"), task("second", depends_on=["first"]), task("other")
        )
    )
    assigned = {a.task_name: a for a in [await worker.next_assignment() for _ in range(2)]}
    first = assigned["first"]

    await worker.complete(first, {"n": 1})
    recorded = tasks_of(await client.run(run.run_id))["first"]
    await worker.complete(first, {"n": 1})
    await worker.complete(first, {"n": 1})

    second = await worker.next_assignment()
    assert second.task_name == "second"
    assert as_dict(second.dependency_outputs["first"]) == {"n": 1}
    await worker.expect_nothing()

    after = tasks_of(await client.run(run.run_id))
    assert after["first"] == recorded
    assert after["first"].state == workflow_pb2.TASK_STATE_SUCCEEDED
    assert as_dict(after["first"].output) == {"n": 1}
    assert after["second"].state == workflow_pb2.TASK_STATE_ASSIGNED
    assert after["second"].attempt == 1
    assert (await worker.get()).running_tasks == 2  # second and other, each once


async def test_repeated_fail_is_ok_and_records_nothing_new(client: Client) -> None:
    worker = await client.agent("worker")
    run = await client.trigger(
        definition=definition("one", task("job"), task("next", depends_on=["job"]))
    )
    assignment = await worker.next_assignment()
    await worker.fail(assignment, "broken")
    failed = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_FAILED)
    await worker.fail(assignment, "broken")
    assert await client.run(run.run_id) == failed
    await worker.expect_nothing()


# CancelWorkflowRun ---------------------------------------------------------------------------


async def test_cancel_run_cancels_tasks_and_tells_the_holder(client: Client) -> None:
    holder = await client.agent("holder", capabilities=["held"])
    run = await client.trigger(
        definition=definition(
            "to-cancel",
            task("held", capability="held"),
            task("queued", capability="nobody-has-this"),
            task("pending", depends_on=["held"]),
        )
    )
    assignment = await holder.next_assignment()
    await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_RUNNING)

    cancelled = await cancel(client, run.run_id)
    assert cancelled.state == workflow_pb2.RUN_STATE_CANCELLED
    assert cancelled.HasField("finished_at")
    for name, task_run in tasks_of(cancelled).items():
        assert task_run.state == workflow_pb2.TASK_STATE_CANCELLED, name
        assert task_run.HasField("finished_at"), name

    cancellation = await holder.next_cancellation()
    assert cancellation.task_id == assignment.task_id
    assert cancellation.run_id == run.run_id
    assert cancellation.attempt == assignment.attempt
    assert (await client.run(run.run_id)) == cancelled

    await refused(
        client.workflows.CompleteTask(complete_request(assignment, "holder", output={"late": 1})),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    after = await client.run(run.run_id)
    assert after == cancelled
    assert not tasks_of(after)["held"].HasField("output")
    assert (await holder.get()).running_tasks == 0
    await holder.expect_nothing()


async def _succeeded_run(client: Client) -> workflow_pb2.WorkflowRun:
    worker = await client.agent("worker")
    run = await client.trigger(definition=definition("quick", task("only")))
    await worker.complete(await worker.next_assignment())
    return await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)


async def _failed_run(client: Client) -> workflow_pb2.WorkflowRun:
    worker = await client.agent("worker")
    run = await client.trigger(definition=definition("quick", task("only")))
    await worker.fail(await worker.next_assignment(), "no")
    return await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_FAILED)


async def _cancelled_run(client: Client) -> workflow_pb2.WorkflowRun:
    run = await client.trigger(definition=definition("quick", task("only")))
    return await cancel(client, run.run_id)


@pytest.mark.parametrize("finish", [_succeeded_run, _failed_run, _cancelled_run])
async def test_cancel_finished_run_is_failed_precondition(
    client: Client, finish: Callable[[Client], Awaitable[workflow_pb2.WorkflowRun]]
) -> None:
    finished = await finish(client)
    await refused(cancel(client, finished.run_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert await client.run(finished.run_id) == finished


async def test_cancel_unknown_run_is_not_found(client: Client) -> None:
    await refused(cancel(client, "0190d2c1-0000-7000-8000-000000000000"), grpc.StatusCode.NOT_FOUND)


async def test_cancel_malformed_run_id_names_run_id(client: Client) -> None:
    error = await refused(cancel(client, "not a run id"), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(bad_request(error)) == {"run_id"}


# Idempotency and versions --------------------------------------------------------------------


async def test_create_definition_with_same_request_id_returns_the_first(client: Client) -> None:
    first = await client.create(definition("wf", task("a")), request_id="create-1")
    again = await client.create(definition("wf", task("a")), request_id="create-1")
    assert again == first
    assert first.version == 1
    listed = (await list_definitions(client)).definitions
    assert [d.definition_id for d in listed] == [first.definition_id]
    other = await client.create(definition("wf", task("a")), request_id="create-2")
    assert other.version == 2


async def test_trigger_with_same_request_id_returns_the_first_run(client: Client) -> None:
    worker = await client.agent("worker", max_concurrent_tasks=10)
    created = await client.create(definition("wf", task("a"), task("b")))
    first = await client.trigger(definition_id=created.definition_id, request_id="trigger-1")
    again = await client.trigger(definition_id=created.definition_id, request_id="trigger-1")
    assert again.run_id == first.run_id
    concurrent = await asyncio.gather(
        *(
            client.trigger(definition_id=created.definition_id, request_id="trigger-1")
            for _ in range(5)
        )
    )
    assert {run.run_id for run in concurrent} == {first.run_id}
    assert [run.run_id for run in await all_runs(client)] == [first.run_id]

    assignments = [await worker.next_assignment() for _ in range(2)]
    assert sorted(a.task_name for a in assignments) == ["a", "b"]
    assert {a.run_id for a in assignments} == {first.run_id}
    await worker.expect_nothing()
    assert (await worker.get()).running_tasks == 2


async def test_new_version_and_trigger_by_name_runs_the_latest(client: Client) -> None:
    v1 = await client.create(definition("wf", task("one")))
    v2 = await client.create(definition("wf", task("two"), task("three", depends_on=["two"])))
    other = await client.create(definition("other", task("x")))
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.definition_id != v2.definition_id

    by_name = await client.trigger(workflow_name="wf")
    assert by_name.definition_id == v2.definition_id
    assert by_name.workflow_name == "wf"
    assert [t.name for t in by_name.tasks] == ["two", "three"]
    by_id = await client.trigger(definition_id=v1.definition_id)
    assert by_id.definition_id == v1.definition_id
    assert [t.name for t in by_id.tasks] == ["one"]


# Pagination and filters ----------------------------------------------------------------------


async def test_runs_page_by_fifty_each_exactly_once(client: Client) -> None:
    created = await client.create(definition("many", task("a")))
    triggered = await asyncio.gather(
        *(client.trigger(definition_id=created.definition_id) for _ in range(120))
    )
    expected = {run.run_id for run in triggered}
    assert len(expected) == 120

    runs, sizes, token = await walk_pages(
        lambda token: list_runs(client, page_size=50, page_token=token), lambda page: page.runs
    )
    seen = [run.run_id for run in runs]
    assert sizes == [50, 50, 20]
    assert token == ""
    assert len(seen) == len(set(seen))
    assert set(seen) == expected

    default = await list_runs(client, page_size=0)
    assert len(default.runs) == 50
    assert default.next_page_token
    huge = await list_runs(client, page_size=2**31 - 1)
    assert {run.run_id for run in huge.runs} == expected
    assert huge.next_page_token == ""


async def test_huge_page_size_is_capped_not_refused(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """The cap (1000 by default) clamps larger page sizes instead of refusing them; shown with a
    cap of 30, since storing more than 1000 runs would take several seconds.
    """
    assert Limits().max_page_size == 1000
    limits = Limits(max_page_size=30, default_page_size=10)
    async with serve(start_server, f"sqlite:///{tmp_path / 'capped.db'}", limits=limits) as capped:
        created = await capped.create(definition("many", task("a")))
        await asyncio.gather(
            *(capped.trigger(definition_id=created.definition_id) for _ in range(45))
        )
        for size in (31, 1000, 2**31 - 1):
            page = await list_runs(capped, page_size=size)
            assert len(page.runs) == 30, size
            assert page.next_page_token, size
            rest = await list_runs(capped, page_size=size, page_token=page.next_page_token)
            assert len(rest.runs) == 15
            assert rest.next_page_token == ""
        assert len((await list_runs(capped)).runs) == 10


@pytest.fixture
async def mixed_runs(client: Client) -> dict[str, Any]:
    """Runs of two definitions, pinned to different agents, in different states."""
    runner = await client.agent("runner", max_concurrent_tasks=1)
    await client.agent("pin-a", connect=False)
    await client.agent("pin-b", connect=False)
    d1 = await client.create(definition("first", task("a")))
    d2 = await client.create(definition("second", task("b")))
    running = await client.trigger(definition_id=d1.definition_id, agent_id="runner")
    await runner.next_assignment()  # the runner's only slot is now taken
    await client.wait_run(running.run_id, workflow_pb2.RUN_STATE_RUNNING)
    runs = {
        "running": running,
        "d1-pin-a": await client.trigger(definition_id=d1.definition_id, agent_id="pin-a"),
        "d1-free": await client.trigger(definition_id=d1.definition_id),
        "d2-pin-b": await client.trigger(definition_id=d2.definition_id, agent_id="pin-b"),
        "d2-cancelled": await client.trigger(definition_id=d2.definition_id),
    }
    await cancel(client, runs["d2-cancelled"].run_id)
    return {"d1": d1, "d2": d2, **{name: run.run_id for name, run in runs.items()}}


async def test_list_runs_filters_by_state_definition_and_agent(
    client: Client, mixed_runs: dict[str, Any]
) -> None:
    r = mixed_runs
    d1, d2 = r["d1"].definition_id, r["d2"].definition_id
    everything = {r[n] for n in ("running", "d1-pin-a", "d1-free", "d2-pin-b", "d2-cancelled")}
    assert await run_ids(client) == everything

    assert await run_ids(client, state=workflow_pb2.RUN_STATE_PENDING) == {
        r["d1-pin-a"],
        r["d1-free"],
        r["d2-pin-b"],
    }
    assert await run_ids(client, state=workflow_pb2.RUN_STATE_RUNNING) == {r["running"]}
    assert await run_ids(client, state=workflow_pb2.RUN_STATE_CANCELLED) == {r["d2-cancelled"]}
    assert await run_ids(client, state=workflow_pb2.RUN_STATE_SUCCEEDED) == set()

    assert await run_ids(client, definition_id=d1) == {r["running"], r["d1-pin-a"], r["d1-free"]}
    assert await run_ids(client, definition_id=d2) == {r["d2-pin-b"], r["d2-cancelled"]}
    assert await run_ids(client, definition_id="0190d2c1-0000-7000-8000-000000000000") == set()

    assert await run_ids(client, agent_id="runner") == {r["running"]}
    assert await run_ids(client, agent_id="pin-a") == {r["d1-pin-a"]}
    assert await run_ids(client, agent_id="pin-b") == {r["d2-pin-b"]}
    assert await run_ids(client, agent_id="nobody") == set()

    assert await run_ids(client, definition_id=d1, state=workflow_pb2.RUN_STATE_PENDING) == {
        r["d1-pin-a"],
        r["d1-free"],
    }
    assert await run_ids(client, definition_id=d2, agent_id="pin-b") == {r["d2-pin-b"]}
    assert await run_ids(client, definition_id=d2, agent_id="pin-a") == set()

    filtered = await all_runs(client, definition_id=d1, agent_id="pin-a")
    assert [run.agent_id for run in filtered] == ["pin-a"]
    assert [run.definition_id for run in filtered] == [d1]


async def test_list_runs_filtered_pages(client: Client, mixed_runs: dict[str, Any]) -> None:
    runs, sizes, _ = await walk_pages(
        lambda token: list_runs(
            client, page_size=1, page_token=token, state=workflow_pb2.RUN_STATE_PENDING
        ),
        lambda page: page.runs,
    )
    assert all(size <= 1 for size in sizes), sizes
    seen = [run.run_id for run in runs]
    assert sorted(seen) == sorted(
        [mixed_runs["d1-pin-a"], mixed_runs["d1-free"], mixed_runs["d2-pin-b"]]
    )


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        pytest.param({"page_size": -1}, "page_size", id="negative-page-size"),
        pytest.param({"state": 99}, "state", id="unknown-state"),
        pytest.param({"page_token": "a"}, "page_token", id="forged-token"),
    ],
)
async def test_list_runs_refuses_bad_request(
    client: Client, fields: dict[str, Any], named: str
) -> None:
    error = await refused(list_runs(client, **fields), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(bad_request(error)) == {named}


async def test_list_definitions_pages_and_filters_by_name(client: Client) -> None:
    created = [
        await client.create(definition(name, task("a")))
        for name in ("alpha", "beta", "alpha", "gamma", "alpha", "beta")
    ]
    expected = {d.definition_id for d in created}

    listed, sizes, _ = await walk_pages(
        lambda token: list_definitions(client, page_size=4, page_token=token),
        lambda page: page.definitions,
    )
    seen = [d.definition_id for d in listed]
    assert sizes == [4, 2]
    assert len(seen) == len(set(seen))
    assert set(seen) == expected

    alphas, sizes, _ = await walk_pages(
        lambda token: list_definitions(
            client, page_size=2, page_token=token, workflow_name="alpha"
        ),
        lambda page: page.definitions,
    )
    assert sizes == [2, 1]
    assert {d.workflow_name for d in alphas} == {"alpha"}
    assert sorted(d.version for d in alphas) == [1, 2, 3]
    assert {d.definition_id for d in alphas} == {
        d.definition_id for d in created if d.workflow_name == "alpha"
    }
    assert [
        d.workflow_name for d in (await list_definitions(client, workflow_name="gamma")).definitions
    ] == ["gamma"]
    assert list((await list_definitions(client, workflow_name="delta")).definitions) == []

    default = await list_definitions(client, page_size=0)
    huge = await list_definitions(client, page_size=2**31 - 1)
    for page in (default, huge):
        assert {d.definition_id for d in page.definitions} == expected
        assert page.next_page_token == ""
    error = await refused(list_definitions(client, page_size=-5), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(bad_request(error)) == {"page_size"}
