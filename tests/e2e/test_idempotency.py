"""Idempotency over a real gRPC channel, on both backends: a repeated request or result is
answered as the first, and anything else reusing its identity is refused, naming what it
conflicts with (a request_id reused for another trigger, another result for a recorded
attempt)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable

import asyncpg
import grpc
from conftest import ServerFactory, asyncpg_dsn, serve
from helpers import (
    Agent,
    Client,
    as_dict,
    definition,
    reason_of,
    refused,
    resource_of,
    seconds,
    task,
    tasks_of,
)
from opscore.v1 import workflow_pb2, workflow_service_pb2

from opscore.domain.engine import FAILURE_WITHOUT_TEXT


async def execute_sql(url: str, statement: str) -> None:
    """Run one statement on the database behind `url`, outside the server."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.split(":///", 1)[1])) as db:
            db.execute(statement)
            db.commit()
        return
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def run_ids(client: Client) -> list[str]:
    """The ids of every run (a few, in one page)."""
    response = await client.workflows.ListWorkflowRuns(
        workflow_service_pb2.ListWorkflowRunsRequest()
    )
    return [run.run_id for run in response.runs]


async def test_trigger_reusing_a_request_id_for_another_request_is_refused(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        await client.agent("pinned", connect=False)
        created = await client.create(definition("wf", task("a")))
        other = await client.create(definition("other", task("a")))
        asked = {"definition_id": created.definition_id, "request_id": "r-1"}
        first = await client.trigger(**asked, input={"n": 1})
        again = await client.trigger(**asked, input={"n": 1})
        assert again.run_id == first.run_id

        for changed in (
            {**asked, "input": {"n": 2}},
            {**asked, "input": {"n": 1}, "agent_id": "pinned"},
            {"definition_id": other.definition_id, "request_id": "r-1", "input": {"n": 1}},
            {"workflow_name": "wf", "request_id": "r-1", "input": {"n": 1}},
            {"definition": definition("wf", task("a")), "request_id": "r-1", "input": {"n": 1}},
        ):
            error = await refused(
                client.trigger(**changed), grpc.StatusCode.ALREADY_EXISTS, str(changed)
            )
            assert reason_of(error) == "REQUEST_ID_REUSED"
            assert resource_of(error) == ("opscore.v1.WorkflowRun", first.run_id)
            assert first.run_id in (error.details() or "")
        assert await run_ids(client) == [first.run_id]


async def test_inline_trigger_repeated_is_the_same_request(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        inline = definition("wf", task("a", input={"x": [1, 2]}), task("b", depends_on=["a"]))
        first = await client.trigger(definition=inline, request_id="r-1")
        again = await client.trigger(definition=inline, request_id="r-1")
        assert again.run_id == first.run_id
        changed = definition("wf", task("a", input={"x": [2, 1]}), task("b", depends_on=["a"]))
        error = await refused(
            client.trigger(definition=changed, request_id="r-1"), grpc.StatusCode.ALREADY_EXISTS
        )
        assert reason_of(error) == "REQUEST_ID_REUSED"


async def test_run_stored_without_a_fingerprint_matches_any_repeat(
    start_server: ServerFactory, db_url: str
) -> None:
    """Runs written before fingerprints were kept answer their request_id as they used to."""
    async with serve(start_server, db_url) as client:
        created = await client.create(definition("wf", task("a")))
        first = await client.trigger(definition_id=created.definition_id, request_id="old")
    await execute_sql(db_url, "UPDATE runs SET request_fingerprint = NULL")
    async with serve(start_server, db_url) as client:
        again = await client.trigger(
            definition_id=created.definition_id, request_id="old", input={"other": True}
        )
        assert again.run_id == first.run_id


async def one_task_held(client: Client) -> tuple[Agent, str, workflow_pb2.TaskAssignment]:
    """A worker holding the one task of a new run: the worker, the run's id, the assignment."""
    worker = await client.agent("worker")
    run = await client.trigger(definition=definition("wf", task("a")))
    return worker, run.run_id, await worker.next_assignment()


async def conflicts(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """Await a result call that must be refused as RESULT_CONFLICT."""
    error = await refused(call, grpc.StatusCode.FAILED_PRECONDITION)
    assert reason_of(error) == "RESULT_CONFLICT"
    return error


async def test_complete_repeated_with_another_output_is_refused(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        worker, run_id, assignment = await one_task_held(client)
        await worker.complete(assignment, {"n": 1})
        await worker.complete(assignment, {"n": 1})

        error = await conflicts(worker.complete(assignment, {"n": 2}))
        assert resource_of(error) == ("opscore.v1.TaskRun", assignment.task_id)
        await conflicts(worker.fail(assignment, "late"))

        recorded = tasks_of(await client.run(run_id))["a"]
        assert recorded.state == workflow_pb2.TASK_STATE_SUCCEEDED
        assert as_dict(recorded.output) == {"n": 1}


async def test_fail_repeated_with_another_error_or_a_success_is_refused(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        worker, run_id, assignment = await one_task_held(client)
        await worker.fail(assignment, "broken", retryable=True)
        await worker.fail(assignment, "broken", retryable=True)
        await conflicts(worker.fail(assignment, "other"))
        await conflicts(worker.complete(assignment, {"n": 1}))
        assert tasks_of(await client.run(run_id))["a"].error == "broken"


async def test_fail_without_error_text_records_a_default(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        worker, run_id, assignment = await one_task_held(client)
        await worker.fail(assignment, "")
        await worker.fail(assignment, "")  # the same call repeated stays OK
        failed = await client.wait_run(run_id, workflow_pb2.RUN_STATE_FAILED)
        assert tasks_of(failed)["a"].error == FAILURE_WITHOUT_TEXT


async def test_create_definition_reusing_a_request_id_for_another_draft_is_refused(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        rich = task("a", capability="c", labels={"zone": "eu"}, input={"k": [1, 2.5, "x"]})
        rich.timeout.CopyFrom(seconds(90))
        rich.retry_policy.max_attempts = 4
        rich.retry_policy.initial_backoff.CopyFrom(seconds(0.5))
        draft = definition("wf", rich, task("b", depends_on=["a"]), task("f"))
        draft.tasks[1].fallback = "f"
        draft.description = "about"
        first = await client.create(draft, request_id="d-1")
        assert await client.create(draft, request_id="d-1") == first

        changed = workflow_pb2.WorkflowDefinition()
        changed.CopyFrom(draft)
        changed.tasks[0].retry_policy.max_attempts = 5
        for other in (changed, definition("wf", task("a"))):
            error = await refused(
                client.create(other, request_id="d-1"), grpc.StatusCode.ALREADY_EXISTS
            )
            assert reason_of(error) == "REQUEST_ID_REUSED"
            assert resource_of(error) == ("opscore.v1.WorkflowDefinition", first.definition_id)
        listed = await client.workflows.ListWorkflowDefinitions(
            workflow_service_pb2.ListWorkflowDefinitionsRequest()
        )
        assert [d.definition_id for d in listed.definitions] == [first.definition_id]
