"""Views and listings of runs, and every response fitting a client with gRPC's default receive
limit: listings of runs are filtered, ordered and paged, a run's tasks are paged on their own, and
pages of runs, tasks, definitions and agents are cut by bytes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest
from conftest import ServerFactory, client_at
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import Client, as_dict, bad_request, definition, refused, task
from opscore.v1 import agent_lifecycle_pb2, workflow_pb2, workflow_service_pb2

from opscore.domain.validation import Limits

KIB = 1024
VIEW_BASIC = workflow_pb2.WORKFLOW_RUN_VIEW_BASIC
VIEW_FULL = workflow_pb2.WORKFLOW_RUN_VIEW_FULL


async def list_runs(client: Client, **fields: Any) -> workflow_service_pb2.ListWorkflowRunsResponse:
    """One page of ListWorkflowRuns."""
    return await client.workflows.ListWorkflowRuns(
        workflow_service_pb2.ListWorkflowRunsRequest(**fields)
    )


async def every_run(client: Client, **fields: Any) -> tuple[list[workflow_pb2.WorkflowRun], int]:
    """Every run a listing returns, following its page tokens, and how many pages it took."""
    runs: list[workflow_pb2.WorkflowRun] = []
    token, pages = "", 0
    while True:
        page = await list_runs(client, page_token=token, **fields)
        runs.extend(page.runs)
        pages += 1
        token = page.next_page_token
        if not token:
            return runs, pages


async def remaining_tasks(
    client: Client, run_id: str, token: str, page_size: int = 0
) -> tuple[list[workflow_pb2.TaskRun], int]:
    """The tasks of a run from `token` on, following page tokens, and how many pages it took."""
    tasks: list[workflow_pb2.TaskRun] = []
    pages = 0
    while True:
        page = await client.workflows.ListWorkflowRunTasks(
            workflow_service_pb2.ListWorkflowRunTasksRequest(
                run_id=run_id, page_size=page_size, page_token=token
            )
        )
        tasks.extend(page.tasks)
        pages += 1
        token = page.next_page_token
        if not token:
            return tasks, pages


def counts(run: workflow_pb2.WorkflowRun) -> dict[int, int]:
    """A run's task counts as {TaskState: count}."""
    return {count.state: count.count for count in run.task_counts}


async def test_a_page_of_runs_too_large_for_one_message_is_cut_not_refused(
    start_server: ServerFactory, db_url: str
) -> None:
    """130 runs with 32 KiB inputs are more than 4 MiB: a legal page of 130 answers OK, to a
    client at gRPC's default limit, with as many as fit and a token for the rest."""
    async with client_at(start_server, db_url) as client:
        await client.create(definition("wide", task("only")))
        big = "x" * (32 * KIB)
        triggered = [
            (await client.trigger(workflow_name="wide", input={"n": index, "big": big})).run_id
            for index in range(130)
        ]

        first = await list_runs(client, page_size=130)
        assert 0 < len(first.runs) < 130
        assert first.next_page_token
        assert first.ByteSize() <= 4 * 1024 * 1024
        runs, pages = await every_run(client, page_size=130)
        assert pages >= 2
        assert [run.run_id for run in runs] == triggered[::-1]
        assert all(as_dict(run.input)["big"] == big for run in runs)


async def test_a_run_of_the_largest_definition_with_outputs_at_the_limit_is_readable(
    start_server: ServerFactory, db_url: str
) -> None:
    """The largest run the limits allow, every output at the payload limit, is read whole
    through GetWorkflowRun and ListWorkflowRunTasks by a client whose receive limit is the
    server's message limit. The limits are scaled down (24 tasks of 48 KiB against 256 KiB
    messages) so the run takes several messages, as 1000 tasks of 1 MiB against 4 MiB do;
    tests/unit/test_responses.py checks the default limits' arithmetic."""
    tasks, payload, message = 24, 48 * KIB, 256 * KIB
    limits = Limits(max_tasks_per_definition=tasks, max_payload_bytes=payload)
    async with client_at(
        start_server, db_url, message, limits=limits, max_message_bytes=message
    ) as client:
        names = [f"t{index:02d}" for index in range(tasks)]
        await client.create(definition("largest", *(task(name) for name in names)))
        run_input = {"big": "i" * (payload - len('{"big":""}'))}
        run = await client.trigger(workflow_name="largest", input=run_input, request_id="r-1")
        agent = await client.agent("worker")
        outputs: dict[str, str] = {}
        for _ in names:
            assignment = await agent.next_assignment()
            text = assignment.task_name + "o" * (payload - len('{"text":""}') - 3)
            outputs[assignment.task_name] = text
            await agent.complete(assignment, {"text": text})

        got = await client.workflows.GetWorkflowRun(
            workflow_service_pb2.GetWorkflowRunRequest(run_id=run.run_id)
        )
        full = got.run
        assert full.state == workflow_pb2.RUN_STATE_SUCCEEDED
        assert as_dict(full.input) == run_input
        assert counts(full) == {workflow_pb2.TASK_STATE_SUCCEEDED: tasks}
        assert 0 < len(full.tasks) < tasks
        assert full.next_task_page_token
        rest, pages = await remaining_tasks(client, run.run_id, full.next_task_page_token)
        assert pages >= 2
        every = [*full.tasks, *rest]
        assert [task_run.name for task_run in every] == names
        assert {t.name: as_dict(t.output)["text"] for t in every} == outputs

        listed = (await list_runs(client, view=VIEW_FULL)).runs[0]
        assert [t.name for t in listed.tasks] == names[: len(listed.tasks)]
        assert 0 < len(listed.tasks) < tasks
        rest, _ = await remaining_tasks(client, run.run_id, listed.next_task_page_token)
        assert [t.name for t in rest] == names[len(listed.tasks) :]

        # Responses that carry a run whole are cut the same way: a repeated trigger.
        again = await client.trigger(workflow_name="largest", input=run_input, request_id="r-1")
        assert again.run_id == run.run_id
        assert 0 < len(again.tasks) < tasks
        assert again.next_task_page_token


async def test_basic_view_has_task_counts_and_no_tasks(client: Client) -> None:
    await client.create(
        definition("pair", task("first"), task("second", depends_on=["first"]), task("side"))
    )
    run = await client.trigger(workflow_name="pair")
    agent = await client.agent("worker")
    assignment = await agent.next_assignment()
    await agent.complete(assignment, {"ok": True})
    await agent.next_assignment()

    listed = (await list_runs(client)).runs[0]
    assert listed.run_id == run.run_id
    assert not listed.tasks
    assert not listed.next_task_page_token
    assert counts(listed) == {
        workflow_pb2.TASK_STATE_SUCCEEDED: 1,
        workflow_pb2.TASK_STATE_QUEUED: 1,
        workflow_pb2.TASK_STATE_ASSIGNED: 1,
    }
    basic = await client.workflows.GetWorkflowRun(
        workflow_service_pb2.GetWorkflowRunRequest(run_id=run.run_id, view=VIEW_BASIC)
    )
    assert not basic.run.tasks
    assert counts(basic.run) == counts(listed)

    full = (await list_runs(client, view=VIEW_FULL)).runs[0]
    assert [task_run.name for task_run in full.tasks] == ["first", "second", "side"]
    assert counts(full) == counts(listed)
    assert [count.state for count in full.task_counts] == sorted(counts(listed))


async def test_runs_are_listed_newest_first_unless_ordered_otherwise(client: Client) -> None:
    await client.create(definition("one", task("only")))
    made = [(await client.trigger(workflow_name="one")).run_id for _ in range(5)]

    newest, _ = await every_run(client, page_size=2)
    assert [run.run_id for run in newest] == made[::-1]
    explicit, _ = await every_run(client, page_size=2, order_by="created_at desc")
    assert [run.run_id for run in explicit] == made[::-1]
    for order_by in ("created_at", "created_at asc", "  created_at   asc "):
        oldest, _ = await every_run(client, page_size=2, order_by=order_by)
        assert [run.run_id for run in oldest] == made

    error = await refused(
        list_runs(client, order_by="state desc"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "order_by" in bad_request(error)


def _timestamp(run: workflow_pb2.WorkflowRun, shift: timedelta = timedelta()) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(run.created_at.ToDatetime() + shift)
    return stamp


async def test_runs_are_filtered_by_state_definition_name_agent_and_time(
    start_server: ServerFactory, db_url: str
) -> None:
    async with client_at(start_server, db_url) as client:
        alpha = await client.create(definition("alpha", task("only")))
        await client.create(definition("beta", task("only")))
        await client.agent("pinned", connect=False)
        first = await client.trigger(workflow_name="alpha")
        pinned = await client.trigger(workflow_name="beta", agent_id="pinned")
        inline = await client.trigger(definition=definition("alpha", task("x")))
        last = await client.trigger(workflow_name="beta")
        await client.workflows.CancelWorkflowRun(
            workflow_service_pb2.CancelWorkflowRunRequest(run_id=last.run_id)
        )

        async def ids(**fields: Any) -> list[str]:
            return [run.run_id for run in (await every_run(client, page_size=1, **fields))[0]]

        assert await ids(state=workflow_pb2.RUN_STATE_CANCELLED) == [last.run_id]
        assert await ids(definition_id=alpha.definition_id) == [first.run_id]
        assert await ids(workflow_name="alpha") == [inline.run_id, first.run_id]
        assert await ids(agent_id="pinned") == [pinned.run_id]
        assert await ids(created_after=_timestamp(pinned)) == [
            last.run_id,
            inline.run_id,
            pinned.run_id,
        ]
        assert await ids(created_before=_timestamp(pinned)) == [first.run_id]
        window = {"created_after": _timestamp(pinned), "created_before": _timestamp(last)}
        assert await ids(**window) == [inline.run_id, pinned.run_id]
        assert await ids(**window, workflow_name="beta", order_by="created_at") == [pinned.run_id]
        assert await ids(created_after=_timestamp(last, timedelta(seconds=1))) == []


async def test_a_page_token_is_valid_only_for_its_own_listing(client: Client) -> None:
    await client.create(definition("one", task("a"), task("b"), task("c")))
    runs = [await client.trigger(workflow_name="one") for _ in range(3)]
    page = await list_runs(client, page_size=1, workflow_name="one")
    assert page.next_page_token

    same = await list_runs(
        client, page_size=1, workflow_name="one", page_token=page.next_page_token
    )
    assert [run.run_id for run in same.runs] == [runs[1].run_id]
    for other in (
        {"workflow_name": "two"},
        {},
        {"workflow_name": "one", "order_by": "created_at"},
        {"workflow_name": "one", "state": workflow_pb2.RUN_STATE_PENDING},
        {"workflow_name": "one", "created_before": _timestamp(runs[2])},
    ):
        error = await refused(
            list_runs(client, page_size=1, page_token=page.next_page_token, **other),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the token with {other}",
        )
        assert "page_token" in bad_request(error)

    tasks = await client.workflows.ListWorkflowRunTasks(
        workflow_service_pb2.ListWorkflowRunTasksRequest(run_id=runs[0].run_id, page_size=1)
    )
    assert [task_run.name for task_run in tasks.tasks] == ["a"]
    rest, _ = await remaining_tasks(client, runs[0].run_id, tasks.next_page_token, 1)
    assert [task_run.name for task_run in rest] == ["b", "c"]
    for forged in (tasks.next_page_token, page.next_page_token, "bm90IGEgdG9rZW4"):
        error = await refused(
            client.workflows.ListWorkflowRunTasks(
                workflow_service_pb2.ListWorkflowRunTasksRequest(
                    run_id=runs[1].run_id, page_token=forged
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "page_token" in bad_request(error)


async def test_listing_tasks_of_an_unknown_run_or_with_a_bad_request_is_refused(
    client: Client,
) -> None:
    await refused(
        client.workflows.ListWorkflowRunTasks(
            workflow_service_pb2.ListWorkflowRunTasksRequest(run_id="no-such-run")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    for request, field in (
        (workflow_service_pb2.ListWorkflowRunTasksRequest(), "run_id"),
        (workflow_service_pb2.ListWorkflowRunTasksRequest(run_id="r", page_size=-1), "page_size"),
    ):
        error = await refused(
            client.workflows.ListWorkflowRunTasks(request), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert field in bad_request(error)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"view": 7}, "view"),
        ({"created_after": Timestamp(seconds=-(10**12))}, "created_after"),
        ({"created_before": Timestamp(seconds=1, nanos=-1)}, "created_before"),
        (
            {"created_after": Timestamp(seconds=100), "created_before": Timestamp(seconds=100)},
            "created_before",
        ),
        ({"workflow_name": "x" * 201}, "workflow_name"),
    ],
)
async def test_a_malformed_listing_names_its_field(
    client: Client, fields: dict[str, Any], field: str
) -> None:
    error = await refused(list_runs(client, **fields), grpc.StatusCode.INVALID_ARGUMENT)
    assert field in bad_request(error)


async def test_a_page_of_definitions_too_large_for_one_message_is_cut_not_refused(
    client: Client,
) -> None:
    big = "x" * (700 * KIB)
    made = [
        (await client.create(definition("heavy", task("only", input={"n": n, "big": big}))))
        for n in range(8)
    ]

    page = await client.workflows.ListWorkflowDefinitions(
        workflow_service_pb2.ListWorkflowDefinitionsRequest(page_size=8)
    )
    assert 0 < len(page.definitions) < 8
    first_token = page.next_page_token
    assert first_token
    seen = list(page.definitions)
    while page.next_page_token:
        page = await client.workflows.ListWorkflowDefinitions(
            workflow_service_pb2.ListWorkflowDefinitionsRequest(
                page_size=8, page_token=page.next_page_token
            )
        )
        seen.extend(page.definitions)
    assert [item.definition_id for item in seen] == [item.definition_id for item in made]
    error = await refused(
        client.workflows.ListWorkflowDefinitions(
            workflow_service_pb2.ListWorkflowDefinitionsRequest(
                workflow_name="other", page_token=first_token
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in bad_request(error)


async def test_a_page_of_agents_too_large_for_one_message_is_cut_not_refused(
    client: Client,
) -> None:
    """90 agents offering 256 capabilities of 200 characters each are more than 4 MiB."""
    capabilities = [f"{index:03d}" + "c" * 197 for index in range(256)]
    made = [f"agent-{index:02d}" for index in range(90)]
    for agent_id in made:
        await client.agent(agent_id, capabilities=capabilities, connect=False)

    request = agent_lifecycle_pb2.ListAgentsRequest(page_size=100)
    page = await client.lifecycle.ListAgents(request)
    assert 0 < len(page.agents) < 90
    seen = [agent.agent_id for agent in page.agents]
    while page.next_page_token:
        request.page_token = page.next_page_token
        page = await client.lifecycle.ListAgents(request)
        seen.extend(agent.agent_id for agent in page.agents)
    assert seen == made


async def test_a_definition_no_default_client_could_read_back_is_refused(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    """With the server's message limit raised, a 5 MiB definition is a legal request, but no
    client at the default limit could read it: it is refused, and nothing is stored."""
    big = {"big": "x" * (900 * KIB)}
    async with client_at(start_server, sqlite_url, max_message_bytes=8 * 1024 * 1024) as client:
        too_large = definition("huge", *(task(f"t{index}", input=big) for index in range(6)))
        error = await refused(client.create(too_large), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "definition" in str(error.details())
        fits = definition("large", *(task(f"t{index}", input=big) for index in range(4)))
        stored = await client.create(fits)
        listed = await client.workflows.ListWorkflowDefinitions(
            workflow_service_pb2.ListWorkflowDefinitionsRequest()
        )
        assert [item.definition_id for item in listed.definitions] == [stored.definition_id]
