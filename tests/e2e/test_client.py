"""The operator's `opscore.client.Client` against a real server over a real channel: every
method, paging, a watch followed until the run is final, cancellation, failover past an address
where nothing listens, TLS, and each refusal raised as its typed exception with the server's
ErrorInfo, field violations and resource."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import auth
import grpc
import helpers
import pytest
from certs import Authority
from conftest import ServerFactory
from helpers import WAIT, connect, definition, task
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_pb2,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from processes import free_port

from opscore.client import (
    AlreadyExists,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OpsCoreError,
    PermissionDenied,
    RunUpdate,
    Tls,
    Unauthenticated,
    Unavailable,
    to_dict,
)
from opscore.domain.validation import Limits
from opscore.server import OpsCoreServer

SUCCEEDED = workflow_pb2.RUN_STATE_SUCCEEDED
RUNNING = workflow_pb2.RUN_STATE_RUNNING
CANCELLED = workflow_pb2.RUN_STATE_CANCELLED

FLOW: dict[str, Any] = {
    "workflow_name": "flow",
    "description": "two steps",
    "tasks": [
        {"name": "fetch", "capability": "work", "input": {"url": "u"}, "timeout": "30s"},
        {"name": "sum", "capability": "work", "depends_on": ["fetch"]},
    ],
}
"""A definition in its protobuf JSON form, as a file would give it."""


@pytest.fixture
async def ops(server: OpsCoreServer) -> AsyncIterator[Client]:
    """An operator's Client to `server`."""
    async with Client(f"127.0.0.1:{server.port}", token=auth.OPERATOR_TOKEN) as opened:
        yield opened


async def test_definitions_from_a_message_or_a_dict_read_and_paged(ops: Client) -> None:
    first = await ops.create_definition(definition("flow", task("fetch", capability="work")))
    second = await ops.create_definition(FLOW)
    other = await ops.create_definition({"workflowName": "other", "tasks": [{"name": "only"}]})

    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert second.description == "two steps"
    assert second.tasks[0].timeout.seconds == 30
    assert to_dict(second.tasks[0].input) == {"url": "u"}
    assert await ops.get_definition(second.definition_id) == second

    page = await ops.list_definitions(page_size=2)
    assert [d.definition_id for d in page.items] == [first.definition_id, second.definition_id]
    assert page.next_page_token
    rest = await ops.list_definitions(page_size=2, page_token=page.next_page_token)
    assert [d.definition_id for d in rest.items] == [other.definition_id]
    assert rest.next_page_token == ""
    versions = await ops.list_definitions(workflow_name="flow")
    assert [d.version for d in versions.items] == [1, 2]

    with pytest.raises(ValueError, match="not a workflow definition"):
        await ops.create_definition({"workflow_name": "x", "no_such_field": 1})


async def test_a_request_id_makes_a_create_or_a_trigger_safe_to_repeat(ops: Client) -> None:
    created = await ops.create_definition(FLOW, request_id="create-1")
    assert (await ops.create_definition(FLOW, request_id="create-1")) == created
    with pytest.raises(AlreadyExists) as reused:
        await ops.create_definition({**FLOW, "description": "else"}, request_id="create-1")
    assert reused.value.reason == "REQUEST_ID_REUSED"
    assert reused.value.resource == ("opscore.v1.WorkflowDefinition", created.definition_id)

    run = await ops.trigger("flow", input={"n": 1}, request_id="trigger-1")
    again = await ops.trigger("flow", input={"n": 1}, request_id="trigger-1")
    assert again.run_id == run.run_id
    with pytest.raises(AlreadyExists) as other:
        await ops.trigger("flow", input={"n": 2}, request_id="trigger-1")
    assert other.value.reason == "REQUEST_ID_REUSED"


async def test_triggers_by_name_id_or_inline_definition_with_input_and_pin(
    ops: Client, client: helpers.Client
) -> None:
    await client.agent("w-1", capabilities=["work"], connect=False)
    stored = await ops.create_definition(FLOW)

    by_name = await ops.trigger("flow", input={"text": "hello", "n": 3})
    assert (by_name.workflow_name, by_name.definition_id) == ("flow", stored.definition_id)
    assert to_dict(by_name.input) == {"text": "hello", "n": 3.0}
    assert by_name.state == workflow_pb2.RUN_STATE_PENDING

    by_id = await ops.trigger(stored.definition_id, agent_id="w-1")
    assert (by_id.definition_id, by_id.agent_id) == (stored.definition_id, "w-1")

    inline = await ops.trigger({"workflow_name": "once", "tasks": [{"name": "t"}]})
    assert (inline.workflow_name, inline.definition_id) == ("once", "")
    message = await ops.trigger(definition("once", task("t")))
    assert message.workflow_name == "once"
    assert message.run_id != inline.run_id


async def test_runs_read_listed_with_filters_and_paged(ops: Client) -> None:
    stored = await ops.create_definition(FLOW)
    runs = [await ops.trigger("flow", input={"i": i}) for i in range(3)]
    await ops.trigger({"workflow_name": "elsewhere", "tasks": [{"name": "t"}]})
    cancelled = await ops.cancel(runs[1].run_id)
    assert cancelled.state == CANCELLED

    got = await ops.get_run(runs[0].run_id)
    assert [t.name for t in got.tasks] == ["fetch", "sum"]
    assert got.tasks[0].state == workflow_pb2.TASK_STATE_QUEUED
    assert got.tasks[0].waiting_reason
    basic = await ops.get_run(runs[0].run_id, view=workflow_pb2.WORKFLOW_RUN_VIEW_BASIC)
    assert (len(basic.tasks), basic.task_counts[0].count) == (0, 1)

    of_flow = await ops.list_runs(definition_id=stored.definition_id)
    assert [r.run_id for r in of_flow.items] == [r.run_id for r in reversed(runs)]
    assert (await ops.list_runs(state=CANCELLED)).items[0].run_id == runs[1].run_id
    named = await ops.list_runs(workflow_name="elsewhere")
    assert [r.workflow_name for r in named.items] == ["elsewhere"]

    oldest = await ops.list_runs(order_by="created_at", page_size=3)
    assert [r.run_id for r in oldest.items] == [r.run_id for r in runs]
    last = await ops.list_runs(order_by="created_at", page_token=oldest.next_page_token)
    assert [r.workflow_name for r in last.items] == ["elsewhere"]
    assert last.next_page_token == ""
    created = runs[0].created_at.ToDatetime()
    assert len((await ops.list_runs(created_before=created)).items) == 0

    tasks = await ops.list_run_tasks(runs[0].run_id, page_size=1)
    assert [t.name for t in tasks.items] == ["fetch"]
    rest = await ops.list_run_tasks(runs[0].run_id, page_token=tasks.next_page_token)
    assert [t.name for t in rest.items] == ["sum"]


async def follow(ops: Client, run_id: str) -> list[RunUpdate]:
    """Every update of a watch, until it ends."""
    async with asyncio.timeout(WAIT):
        return [update async for update in ops.watch(run_id)]


async def test_a_watch_follows_a_run_until_it_is_final(ops: Client, client: helpers.Client) -> None:
    worker = await client.agent("w-1", capabilities=["work"])
    run = await ops.trigger(FLOW)
    watching = asyncio.create_task(follow(ops, run.run_id))
    for step in ("fetch", "sum"):
        assignment = await worker.next_assignment()
        assert assignment.task_name == step
        await worker.complete(assignment, {"done": step})
    updates = await watching

    first, final = updates[0], updates[-1]
    assert [t.name for t in first.changed] == ["fetch", "sum"]
    assert final.final
    assert final.run.state == SUCCEEDED
    assert [(t.name, t.state) for t in final.run.tasks] == [
        ("fetch", workflow_pb2.TASK_STATE_SUCCEEDED),
        ("sum", workflow_pb2.TASK_STATE_SUCCEEDED),
    ]
    assert to_dict(final.run.tasks[1].output) == {"done": "sum"}
    assert all(not update.final for update in updates[:-1])
    assert all(len(update.run.tasks) == 2 for update in updates)
    # A run already final is one update.
    assert [u.run.state for u in await follow(ops, run.run_id)] == [SUCCEEDED]


async def test_a_cancelled_run_ends_its_watch_and_cannot_be_cancelled_again(
    ops: Client, server: OpsCoreServer
) -> None:
    run = await ops.trigger(FLOW)
    watching = asyncio.create_task(follow(ops, run.run_id))
    cancelled = await ops.cancel(run.run_id)
    assert cancelled.state == CANCELLED
    updates = await watching
    assert updates[-1].run.state == CANCELLED
    assert {t.state for t in updates[-1].run.tasks} == {workflow_pb2.TASK_STATE_CANCELLED}

    with pytest.raises(FailedPrecondition) as again:
        await ops.cancel(run.run_id)
    assert again.value.reason == "FAILED_PRECONDITION"
    with pytest.raises(NotFound):
        await follow(ops, str(uuid.uuid4()))


async def test_a_watch_outlives_a_restart_of_its_only_server(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    """The watch reopens, on the one address it has, once the server is back: its next update
    is the run as it is, and it goes on to the run's end."""
    address = f"127.0.0.1:{free_port()}"
    async with Client(address, token=auth.OPERATOR_TOKEN) as ops:
        async with start_server(sqlite_url, listen=address):
            run = await ops.trigger(FLOW)
            watch = ops.watch(run.run_id)
            first = await anext(watch)
            assert [t.state for t in first.run.tasks] == [
                workflow_pb2.TASK_STATE_QUEUED,
                workflow_pb2.TASK_STATE_PENDING,
            ]
        reopened = asyncio.create_task(anext(watch))
        async with start_server(sqlite_url, listen=address):
            again = await asyncio.wait_for(reopened, WAIT)
            assert again.run.run_id == run.run_id
            assert [t.name for t in again.changed] == ["fetch", "sum"]
            await ops.cancel(run.run_id)
            async with asyncio.timeout(WAIT):
                rest = [update async for update in watch]
    assert [update.run.state for update in rest] == [CANCELLED]


class PartedEnding(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """A server whose watch sends a run, then the change that makes it final in two parts (as
    a change too large for one response is sent)."""

    async def WatchWorkflowRun(  # noqa: N802 - the method's name in the protos
        self,
        request: workflow_service_pb2.WatchWorkflowRunRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[workflow_service_pb2.WatchWorkflowRunResponse]:
        def task_run(name: str, state: int) -> workflow_pb2.TaskRun:
            return workflow_pb2.TaskRun(task_id=name, name=name, state=state)  # type: ignore[arg-type]

        running = workflow_pb2.WorkflowRun(run_id=request.run_id, state=RUNNING)
        running.tasks.extend(task_run(name, workflow_pb2.TASK_STATE_ASSIGNED) for name in "ab")
        yield workflow_service_pb2.WatchWorkflowRunResponse(run=running)
        final = workflow_pb2.WorkflowRun(run_id=request.run_id, state=SUCCEEDED)
        for name in "ab":
            yield workflow_service_pb2.WatchWorkflowRunResponse(
                run=final, changed_tasks=[task_run(name, workflow_pb2.TASK_STATE_SUCCEEDED)]
            )


async def test_the_change_that_ends_a_run_is_one_update_however_many_parts_it_came_in() -> None:
    server = grpc.aio.server()
    workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(PartedEnding(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Client(f"127.0.0.1:{port}") as ops:
            updates = await follow(ops, "run-1")
    finally:
        await server.stop(None)
    assert [update.final for update in updates] == [False, True]
    assert [t.name for t in updates[1].changed] == ["a", "b"]
    assert [(t.name, t.state) for t in updates[1].run.tasks] == [
        ("a", workflow_pb2.TASK_STATE_SUCCEEDED),
        ("b", workflow_pb2.TASK_STATE_SUCCEEDED),
    ]


async def test_agents_read_and_listed(ops: Client, client: helpers.Client) -> None:
    await client.agent("a-1", capabilities=["work"], labels={"zone": "x"})
    await client.agent("a-2", capabilities=["other"], connect=False)
    await client.agent("a-3", capabilities=["work"], connect=False)

    one = await ops.get_agent("a-1")
    assert (one.connected, one.state, dict(one.labels)) == (
        True,
        agent_pb2.AGENT_STATE_IDLE,
        {"zone": "x"},
    )
    page = await ops.list_agents(page_size=2)
    assert [a.agent_id for a in page.items] == ["a-1", "a-2"]
    rest = await ops.list_agents(page_token=page.next_page_token)
    assert [a.agent_id for a in rest.items] == ["a-3"]
    workers = await ops.list_agents(capability="work")
    assert [a.agent_id for a in workers.items] == ["a-1", "a-3"]
    offline = await ops.list_agents(state=agent_pb2.AGENT_STATE_OFFLINE)
    assert [a.agent_id for a in offline.items] == ["a-2", "a-3"]


async def test_refusals_are_typed_and_carry_the_error_info(
    ops: Client, client: helpers.Client, server: OpsCoreServer
) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as not_found:
        await ops.get_run(missing)
    assert (not_found.value.reason, not_found.value.domain) == ("NOT_FOUND", "opscore.v1")
    assert not_found.value.resource == ("opscore.v1.WorkflowRun", missing)
    assert isinstance(not_found.value, OpsCoreError)

    with pytest.raises(InvalidArgument) as invalid:
        await ops.create_definition(
            {"workflow_name": "bad", "tasks": [{"name": "a", "depends_on": ["nowhere"]}]}
        )
    assert invalid.value.reason == "INVALID_ARGUMENT"
    assert [v.field for v in invalid.value.violations] == ["definition.tasks[0].depends_on[0]"]
    assert "nowhere" in invalid.value.violations[0].description

    await client.agent("a-1", capabilities=["other"], connect=False)
    with pytest.raises(FailedPrecondition) as unfit:
        await ops.trigger(FLOW, agent_id="a-1")
    assert unfit.value.reason == "PINNED_AGENT_UNFIT"
    assert unfit.value.resource == ("opscore.v1.Agent", "a-1")

    address = f"127.0.0.1:{server.port}"
    async with Client(address, token="not-a-token-the-server-knows") as stranger:
        with pytest.raises(Unauthenticated) as unknown:
            await stranger.list_runs()
    assert unknown.value.reason == "UNAUTHENTICATED"

    registered = await client.lifecycle.RegisterAgent(
        agent_lifecycle_pb2.RegisterAgentRequest(agent_id="a-2")
    )
    async with Client(address, token=registered.agent_token) as agent:
        with pytest.raises(PermissionDenied) as denied:
            await agent.list_runs()
    assert denied.value.reason == "PERMISSION_DENIED"


async def test_calls_and_watches_move_on_past_an_address_where_nothing_listens(
    server: OpsCoreServer,
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    async with Client(nowhere, token=auth.OPERATOR_TOKEN) as lost:
        with pytest.raises(Unavailable) as unavailable:
            await lost.list_agents()
    assert unavailable.value.reason == ""  # gRPC's own refusal: no server said anything

    here = f"127.0.0.1:{server.port}"
    async with Client([nowhere, here], token=auth.OPERATOR_TOKEN) as ops:
        assert (await ops.list_agents()).items == []
        run = await ops.trigger(FLOW)
        assert (await ops.get_run(run.run_id)).run_id == run.run_id
        await ops.cancel(run.run_id)
    async with Client([nowhere, here], token=auth.OPERATOR_TOKEN) as ops:
        # A watch too is opened on the next address when the first does not answer.
        assert [u.run.state for u in await follow(ops, run.run_id)] == [CANCELLED]


async def test_a_client_over_tls(
    start_server: ServerFactory, sqlite_url: str, tmp_path: Path
) -> None:
    authority = Authority.create("Ops-Core test CA")
    served = authority.issue_server().write(tmp_path, "server")
    ca = authority.write_ca(tmp_path, "ca")
    operator = authority.issue_client("alice", ["opscore://operator/alice"]).write(
        tmp_path, "alice"
    )
    settings = {
        "tls_cert": str(served.cert),
        "tls_key": str(served.key),
        "tls_client_ca": str(ca),
    }
    async with start_server(sqlite_url, **settings) as server:
        # The certificate names an operator: no token needed.
        tls = Tls(ca, operator.cert, operator.key)
        async with Client(f"localhost:{server.port}", tls=tls) as ops:
            run = await ops.trigger(FLOW)
            assert (await ops.get_run(run.run_id)).workflow_name == "flow"


async def test_a_run_too_large_for_one_message_is_watched_and_read_whole(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    """The first response of a watch, and GetWorkflowRun, carry the tasks that fit one
    message: the client pages in the rest (limits scaled down: outputs of 15 KiB, messages of
    64 KiB)."""
    names = [f"t{index}" for index in range(8)]
    limits = Limits(max_payload_bytes=16 * 1024)
    settings = {"limits": limits, "max_message_bytes": 64 * 1024}
    async with (
        start_server(sqlite_url, **settings) as server,
        connect(server.port) as client,
        Client(f"127.0.0.1:{server.port}", token=auth.OPERATOR_TOKEN) as ops,
    ):
        worker = await client.agent("worker")
        run = await ops.trigger(definition("large", *(task(name) for name in names)))
        for _ in names:
            assignment = await worker.next_assignment()
            await worker.complete(assignment, {"text": assignment.task_name * 5000})
        [update] = await follow(ops, run.run_id)
        got = await ops.get_run(run.run_id)
        every = await ops.all_tasks(got)

    assert update.final
    assert [t.name for t in update.run.tasks] == names
    assert got.next_task_page_token
    assert len(got.tasks) < len(names)
    assert [to_dict(t.output)["text"][:2] for t in every] == names
