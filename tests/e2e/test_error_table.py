"""The table of errors (docs/errors.md) is what the server answers: each row (code, reason,
details) is provoked against a real server and the answer compared. Rows that need a fault of
the world (a full disk, a database gone) are checked through the one mapping function with the
domain error the store raises for that fault. A row without a provoker here fails: a new row
needs one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import auth
import grpc
import pytest
from conftest import ServerFactory, serve
from google.rpc import error_details_pb2, status_pb2
from helpers import WAIT, Agent, Client, connect, definition, status_of, task
from opscore.v1 import agent_lifecycle_pb2, workflow_service_pb2

from opscore.api.errors import ERROR_DOMAIN, internal_status, to_status
from opscore.domain.errors import OpsCoreError, StorageFull, StorageLost, StorageUnavailable
from opscore.domain.quotas import Rate
from opscore.store.faults import FULL_RETRY, LOST_RETRY, UNAVAILABLE_RETRY
from opscore.streams import StreamLimits

ERRORS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


@dataclass(frozen=True, slots=True)
class Row:
    """One row of the table of errors (docs/errors.md)."""

    code: str
    reason: str
    details: frozenset[str]
    """The `google.rpc` detail types besides `ErrorInfo`, by name (e.g. "BadRequest")."""
    resource_types: frozenset[str]
    """The `ResourceInfo.resource_type` values the row allows."""
    retry_seconds: int | None


def table_rows() -> list[Row]:
    """The rows of the table of errors."""
    section = ERRORS.read_text()
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:2] == ["Code", "Reason"], header
    rows = []
    for line in lines[2:]:
        code, reason, _, details = (cell.strip() for cell in line.strip("|").split("|"))
        retry = re.search(r"RetryInfo`?: (\d+) s", details)
        rows.append(
            Row(
                code.strip("`"),
                reason.strip("`"),
                frozenset(re.findall(r"google\.rpc\.(\w+)", details)),
                frozenset(re.findall(r"opscore\.v1\.\w+", details)),
                int(retry.group(1)) if retry else None,
            )
        )
    return rows


Answer = tuple[str, status_pb2.Status | None]
"""A status code's name and the `google.rpc.Status` its details carry."""

Provoker = Callable[[ServerFactory, str], Awaitable[Answer]]


async def refusal(call: Awaitable[object]) -> Answer:
    """What a call that must fail answered."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name, status_of(error)
    raise AssertionError("the call succeeded")


def mapped(error: OpsCoreError | None) -> Answer:
    """What the one mapping function answers for a domain error (None: a fault of the
    server)."""
    status = internal_status() if error is None else to_status(error)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(details, bytes)
    return status.code.name, status_pb2.Status.FromString(details)


async def invalid_argument(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        return await refusal(client.run(""))


async def not_found(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        return await refusal(client.run("no-such-run"))


async def request_id_reused(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        wf = definition("wf", task("a"))
        await client.trigger(definition=wf, request_id="r", input={"n": 1})
        return await refusal(client.trigger(definition=wf, request_id="r", input={"n": 2}))


async def failed_precondition(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        run = await client.trigger(definition=definition("wf", task("a")))
        cancel = workflow_service_pb2.CancelWorkflowRunRequest(run_id=run.run_id)
        await client.workflows.CancelWorkflowRun(cancel)
        return await refusal(client.workflows.CancelWorkflowRun(cancel))


async def result_conflict(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        worker = await client.agent("w")
        await client.trigger(definition=definition("wf", task("a")))
        assignment = await worker.next_assignment()
        await worker.complete(assignment, {"n": 1})
        return await refusal(worker.complete(assignment, {"n": 2}))


async def pinned_agent_unfit(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        await client.agent("w", connect=False)
        needy = definition("wf", task("a", capability="gpu"))
        return await refusal(client.trigger(definition=needy, agent_id="w"))


async def aborted(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        first = await client.agent("w")
        await Agent(client, "w").connect()
        await first.wait_stream_ended()
        assert first.stream_error is not None
        return first.stream_error.code().name, status_of(first.stream_error)


async def token_rotated(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        first = await client.agent("w")
        await client.lifecycle.RegisterAgent(agent_lifecycle_pb2.RegisterAgentRequest(agent_id="w"))
        await first.wait_stream_ended()
        assert first.stream_error is not None
        return first.stream_error.code().name, status_of(first.stream_error)


async def resource_exhausted(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        big = {"text": "x" * (1024 * 1024 + 1)}
        return await refusal(client.trigger(definition=definition("wf", task("a")), input=big))


async def storage_reserve(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url, sqlite_free_space_reserve=2**62) as client:
        return await refusal(client.create(definition("wf", task("a"))))


async def shutting_down(start_server: ServerFactory, url: str) -> Answer:
    async with start_server(url) as server, connect(server.port) as client:
        agent = await client.agent("w")
        await server.stop()
        await agent.wait_stream_ended()
        assert agent.stream_error is not None
        return agent.stream_error.code().name, status_of(agent.stream_error)


async def unimplemented(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        method = client.channel.unary_unary("/opscore.v1.WorkflowService/NoSuchMethod")
        return await refusal(method(b""))


async def stream_stalled(start_server: ServerFactory, url: str) -> Answer:
    stall = StreamLimits(max_messages=1000, max_bytes=1 << 30, stall_timeout=0.3)
    async with serve(start_server, url, streams=stall) as client:
        await client.agent("w", capabilities=["work"], max_concurrent_tasks=100, connect=False)
        request = workflow_service_pb2.StreamTasksRequest(agent_id="w")
        call = client.workflows.StreamTasks(request)
        get = agent_lifecycle_pb2.GetAgentRequest(agent_id="w")
        async with asyncio.timeout(WAIT):
            while not (await client.lifecycle.GetAgent(get)).agent.connected:
                await asyncio.sleep(0.01)
            # Inputs large enough to fill the client's flow-control window, never read.
            for _ in range(40):
                run = definition("wf", task("a", capability="work"))
                await client.trigger(definition=run, input={"blob": "x" * 200_000})
            while (await client.lifecycle.GetAgent(get)).agent.connected:
                await asyncio.sleep(0.05)
        return await refusal(_read_to_end(call))


async def _read_to_end(call: AsyncIterator[object]) -> None:
    async for _ in call:
        pass


async def unauthenticated(start_server: ServerFactory, url: str) -> Answer:
    async with (
        start_server(url) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as bare,
    ):
        return await refusal(Client(bare).run("any"))


async def permission_denied(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url) as client:
        registered = await client.lifecycle.RegisterAgent(
            agent_lifecycle_pb2.RegisterAgentRequest(agent_id="w")
        )
        as_agent = auth.bearer(registered.agent_token)
        listing = agent_lifecycle_pb2.ListAgentsRequest()
        return await refusal(client.lifecycle.ListAgents(listing, metadata=as_agent))


async def rate_limited(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url, trigger_rate=Rate(per_second=0.001, burst=1)) as client:
        await client.trigger(definition=definition("wf", task("a")))
        return await refusal(client.trigger(definition=definition("wf", task("a"))))


async def overloaded(start_server: ServerFactory, url: str) -> Answer:
    async with serve(start_server, url, max_streams=1) as client:
        await client.agent("first")
        second = await client.agent("second", connect=False)
        call = client.workflows.StreamTasks(
            workflow_service_pb2.StreamTasksRequest(agent_id=second.agent_id)
        )
        return await refusal(_read_to_end(call))


async def by_mapping(error: OpsCoreError | None) -> Answer:
    return mapped(error)


PROVOKERS: dict[tuple[str, str], Provoker] = {
    ("INVALID_ARGUMENT", "INVALID_ARGUMENT"): invalid_argument,
    ("NOT_FOUND", "NOT_FOUND"): not_found,
    ("ALREADY_EXISTS", "REQUEST_ID_REUSED"): request_id_reused,
    ("FAILED_PRECONDITION", "FAILED_PRECONDITION"): failed_precondition,
    ("FAILED_PRECONDITION", "RESULT_CONFLICT"): result_conflict,
    ("FAILED_PRECONDITION", "PINNED_AGENT_UNFIT"): pinned_agent_unfit,
    ("ABORTED", "ABORTED"): aborted,
    ("RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"): resource_exhausted,
    ("RESOURCE_EXHAUSTED", "STORAGE_FULL"): lambda *_: by_mapping(
        StorageFull("No space left on device", FULL_RETRY)
    ),
    ("RESOURCE_EXHAUSTED", "STORAGE_RESERVE"): storage_reserve,
    ("RESOURCE_EXHAUSTED", "RATE_LIMITED"): rate_limited,
    ("RESOURCE_EXHAUSTED", "OVERLOADED"): overloaded,
    ("UNAUTHENTICATED", "UNAUTHENTICATED"): unauthenticated,
    ("UNAUTHENTICATED", "AGENT_TOKEN_ROTATED"): token_rotated,
    ("PERMISSION_DENIED", "PERMISSION_DENIED"): permission_denied,
    ("UNAVAILABLE", "UNAVAILABLE"): shutting_down,
    ("UNAVAILABLE", "STREAM_STALLED"): stream_stalled,
    ("UNAVAILABLE", "STORAGE_UNAVAILABLE"): lambda *_: by_mapping(
        StorageUnavailable("connection refused", UNAVAILABLE_RETRY)
    ),
    ("UNAVAILABLE", "STORAGE_LOST"): lambda *_: by_mapping(
        StorageLost("database does not exist", LOST_RETRY)
    ),
    ("UNIMPLEMENTED", "UNIMPLEMENTED"): unimplemented,
    ("INTERNAL", "INTERNAL"): lambda *_: by_mapping(None),
}

ROWS = table_rows()


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row.code}:{row.reason}")
async def test_the_server_answers_each_row_as_the_readme_says(
    row: Row, start_server: ServerFactory, sqlite_url: str
) -> None:
    provoke = PROVOKERS.get((row.code, row.reason))
    if provoke is None:
        pytest.fail(f"the row {row.code} {row.reason} has no provoker here: add one")
    code, status = await provoke(start_server, sqlite_url)
    assert code == row.code
    assert status is not None, "the error carries no google.rpc.Status details"
    first, *others = status.details
    info = error_details_pb2.ErrorInfo()
    assert first.Unpack(info), f"the first detail is {first.TypeName()}, not ErrorInfo"
    assert (info.domain, info.reason) == (ERROR_DOMAIN, row.reason)
    assert {detail.TypeName().removeprefix("google.rpc.") for detail in others} == row.details
    for detail in others:
        resource = error_details_pb2.ResourceInfo()
        if detail.Unpack(resource):
            assert resource.resource_type in row.resource_types, resource
            assert resource.resource_name
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            delay = retry.retry_delay.ToTimedelta().total_seconds()
            if row.retry_seconds is None:  # the row says "when": it depends on the call
                assert delay > 0
            else:
                assert delay == row.retry_seconds


def test_the_table_has_a_row_for_each_provoker_and_no_row_twice() -> None:
    keys = [(row.code, row.reason) for row in ROWS]
    assert len(keys) == len(set(keys)), keys
    assert set(PROVOKERS) - set(keys) == set(), "rows missing from docs/errors.md"
