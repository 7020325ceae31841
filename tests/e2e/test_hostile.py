"""Hostile input: random and malicious requests to every RPC of both services, against one live
server per test, must never be answered UNKNOWN or INTERNAL, must be refused when the contract
says so, and must leave the server serving and its database consistent.

How the examples reach the server. Hypothesis runs many examples inside one test function, and
the server must run once per test function, on pytest-asyncio's event loop (where
`start_server(sqlite_url)` starts it). So each test is an ordinary async test that starts the
server, sets up a small world with the async helpers (agents with open task streams, definitions,
runs, assignments held by a worker), and then runs the property: a plain synchronous function
decorated with `@given`, built inside the test and run in a worker thread with
`asyncio.to_thread`. The property sends each example with gRPC's *synchronous* client over one
channel, so the event loop stays free to serve it, and no fixture is involved in `@given` (no
function-scoped-fixture health check to suppress). Hypothesis' example database is off, so no
files are written. After the examples each test checks that health still answers SERVING, that a
normal flow still works end to end (register, stream, create, trigger, complete, run SUCCEEDED),
and that the SQLite file, opened with the sqlite3 module, is consistent.

What every answer must satisfy:

* its status is one the contract allows (OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
  RESOURCE_EXHAUSTED, ALREADY_EXISTS, ABORTED, UNAVAILABLE): never UNKNOWN or INTERNAL;
* INVALID_ARGUMENT carries google.rpc.BadRequest details naming at least one field;
* a request the contract says is invalid (a NUL in any string, an id of the wrong shape, a
  non-finite number or a NUL in a Struct, an unknown enum number, a negative or absurd duration,
  a broken task graph, ...) is refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED, never accepted
  and never answered as if it were well-formed (NOT_FOUND, FAILED_PRECONDITION, ...). `problems`
  is that oracle, written from the contract alone.

Random examples may miss a rule on a given run, so `test_each_hostile_input_rule_is_enforced`
also sends one fixed request per rule and reports every rule broken at once. The database checks
include what PostgreSQL could not store (NUL in text, NaN or NUL in JSON, text longer than its
VARCHAR), since SQLite would take it silently and the same request would be INTERNAL there.

The harness is the `hostile` package (tests/hostile): the strategies, the world, the requests
per RPC, the oracle and its judge, the fixed cases per rule, and the checks after the examples.
This module holds the tests alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
import auth
import grpc
import pytest
from conftest import ServerFactory, asyncpg_dsn, postgres_database
from google.protobuf.message import Message
from helpers import Client, connect, definition, task
from hostile.contract import Code
from hostile.database import INVARIANTS, database_faults, database_path
from hostile.oracle import judge, problems
from hostile.properties import CALL_TIMEOUT, HYPOTHESIS, run_property, send
from hostile.rpcs import RPCS, rpc_requests
from hostile.rules import contract_cases
from hostile.serving import assert_normal_flow, assert_serving
from hostile.strategies import blob, fill_struct
from hostile.world import build_world, resolve, stop_world
from hypothesis import given, settings
from hypothesis import strategies as st
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from replicas import DEPLOYMENTS, two_replicas

from opscore.domain.validation import Limits

# The properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", RPCS)
async def test_hostile_requests_are_answered_soundly(
    rpc: str, start_server: ServerFactory, sqlite_url: str
) -> None:
    async with start_server(sqlite_url) as server, connect(server.port) as client:
        world, collector = await build_world(client)
        limits: Limits = server.settings.limits
        try:
            strategy = rpc_requests(world)[rpc]
            await asyncio.to_thread(run_property, server.port, strategy, world, limits, rpc)
        finally:
            await stop_world(client, world, collector)
        await assert_serving(client.channel)
        await assert_normal_flow(client.channel)
        assert not server.failed, "a background task of the server failed"
        faults = await asyncio.to_thread(database_faults, database_path(sqlite_url))
        assert not faults, faults


@dataclass(frozen=True)
class Deployment:
    """Where a test's world lives and its hostile requests go, and how its database is checked."""

    client: Client
    """The world's client (on two replicas, its agents stream from the other one)."""
    target: str
    """The synchronous channel's target: the server, or both replicas in turn."""
    options: list[tuple[str, Any]]
    limits: Limits
    faults: Callable[[], Awaitable[list[str]]]
    """The database's broken invariants."""


async def postgres_faults(url: str) -> list[str]:
    """The broken invariants of a PostgreSQL database (its own types refuse what SQLite's
    text and JSON checks look for, so only the invariants are asked)."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        faults = []
        for description, query in INVARIANTS.items():
            if found := [row[0] for row in await connection.fetch(query)][:5]:
                faults.append(f"{description}: {found}")
        return faults
    finally:
        await connection.close()


@pytest.fixture(params=DEPLOYMENTS)
def template(request: pytest.FixtureRequest) -> str:
    """ "" for one server on SQLite; for two replicas, the migrated PostgreSQL database their
    database copies."""
    return "" if request.param == "one server" else request.getfixturevalue("migrated_postgres")


@asynccontextmanager
async def deployed(
    template: str, start_server: ServerFactory, tmp_path: Path
) -> AsyncIterator[Deployment]:
    """One server on a fresh SQLite file (no `template`), or two replicas on a fresh copy of the
    PostgreSQL `template`, whose hostile requests go to each replica in turn (client-side round
    robin)."""
    if not template:
        url = f"sqlite:///{tmp_path / 'opscore.db'}"
        async with start_server(url) as server, connect(server.port) as client:
            yield Deployment(
                client,
                f"127.0.0.1:{server.port}",
                [],
                server.settings.limits,
                lambda: asyncio.to_thread(database_faults, database_path(url)),
            )
        return
    async with postgres_database(template) as url, two_replicas(start_server, url) as split:
        addresses = ",".join(f"127.0.0.1:{replica.port}" for replica in split.replicas)
        yield Deployment(
            split,
            f"ipv4:{addresses}",
            [("grpc.lb_policy_name", "round_robin")],
            split.replicas[0].settings.limits,
            lambda: postgres_faults(url),
        )


async def test_mixed_hostile_sequences_keep_the_server_sound(
    template: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    """Sequences of hostile requests to any RPC, interleaved, against one server, or spread
    over two replicas."""
    async with deployed(template, start_server, tmp_path) as deployment:
        client = deployment.client
        world, collector = await build_world(client)
        limits = deployment.limits
        by_rpc = rpc_requests(world)
        steps = st.lists(
            st.one_of([st.tuples(st.just(rpc), by_rpc[rpc]) for rpc in RPCS]),
            min_size=1,
            max_size=6,
        )

        def sequences() -> None:
            with auth.sync_channel(
                deployment.target,
                options=[("grpc.max_receive_message_length", -1), *deployment.options],
            ) as sync_channel:

                @settings(HYPOTHESIS, max_examples=40)
                @given(sequence=steps)
                def every_answer_is_sound(sequence: list[tuple[str, Message]]) -> None:
                    for rpc, drawn in sequence:
                        request = resolve(drawn, world)
                        code, error = send(sync_channel, rpc, request, limits)
                        judge(rpc, request, code, error, limits)

                every_answer_is_sound()

        try:
            await asyncio.to_thread(sequences)
        finally:
            await stop_world(client, world, collector)
        await assert_serving(client.channel)
        await assert_normal_flow(client)
        faults = await deployment.faults()
        assert not faults, faults


# Each rule once ---------------------------------------------------------------------------------


async def test_each_hostile_input_rule_is_enforced(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    """One request per rule, all sent to one server: every one refused (INVALID_ARGUMENT with
    BadRequest, or RESOURCE_EXHAUSTED), and all the rules a server breaks reported at once."""
    async with start_server(sqlite_url) as server, connect(server.port) as client:
        world, collector = await build_world(client)
        limits: Limits = server.settings.limits

        def check_all() -> list[str]:
            broken = []
            with auth.sync_channel(f"127.0.0.1:{server.port}") as sync_channel:
                for name, rpc, drawn in contract_cases(world):
                    request = resolve(drawn, world)
                    # Too deep to parse is no rule of the contract: only no server fault.
                    refused = "deep" not in name
                    assert not refused or problems(request, limits), f"oracle misses {name!r}"
                    code, error = send(sync_channel, rpc, request, limits)
                    try:
                        judge(rpc, request, code, error, limits)
                    except AssertionError as failure:
                        broken.append(f"[{name}] {str(failure).splitlines()[0][:400]}")
            return broken

        try:
            broken = await asyncio.to_thread(check_all)
        finally:
            await stop_world(client, world, collector)
        assert not broken, "\n".join(["rules not enforced:", *broken])
        await assert_serving(client.channel)
        faults = await asyncio.to_thread(database_faults, database_path(sqlite_url))
        assert not faults, faults


# Size limits ----------------------------------------------------------------------------------


def _exhausted(call: Callable[[], Any]) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = cast(grpc.Call, caught.value)
    assert error.code() == Code.RESOURCE_EXHAUSTED, (error.code(), error.details())
    return error


async def test_a_message_over_max_message_bytes_is_resource_exhausted(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, max_message_bytes=64 * 1024) as server,
        connect(server.port) as client,
    ):
        await client.agent("big-1", capabilities=["work"], connect=False)
        created = await client.create(definition("big", task("a", capability="work")))

        def oversized() -> None:
            with auth.sync_channel(f"127.0.0.1:{server.port}") as sync_channel:
                lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(sync_channel)
                workflows = workflow_service_pb2_grpc.WorkflowServiceStub(sync_channel)
                trigger = workflow_service_pb2.TriggerWorkflowRequest(
                    definition_id=created.definition_id
                )
                fill_struct(trigger.input, blob(100 * 1024))
                _exhausted(lambda: workflows.TriggerWorkflow(trigger, timeout=CALL_TIMEOUT))
                register = agent_lifecycle_pb2.RegisterAgentRequest(
                    agent_id="big-2", capabilities=[f"c{index}" for index in range(20_000)]
                )
                _exhausted(lambda: lifecycle.RegisterAgent(register, timeout=CALL_TIMEOUT))
                fail = workflow_service_pb2.FailTaskRequest(
                    task_id="t", agent_id="big-1", attempt=1, error="e" * 70_000
                )
                _exhausted(lambda: workflows.FailTask(fail, timeout=CALL_TIMEOUT))

        await asyncio.to_thread(oversized)
        runs = await client.workflows.ListWorkflowRuns(
            workflow_service_pb2.ListWorkflowRunsRequest()
        )
        assert not runs.runs, "an oversized request was acted on"
        assert (await client.agent("big-3", connect=False)).agent_id == "big-3"
        await assert_serving(client.channel)


async def test_a_struct_over_max_payload_bytes_is_resource_exhausted(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    """Task inputs (stored and inline), run inputs and outputs: over the limit as compact JSON is
    RESOURCE_EXHAUSTED and stores nothing; well under it is accepted."""
    limit = 16 * 1024
    async with (
        start_server(sqlite_url, limits=Limits(max_payload_bytes=limit)) as server,
        connect(server.port) as client,
    ):
        worker = await client.agent("payload-1", capabilities=["work"])
        created = await client.create(definition("payload", task("a", capability="work")))
        over = blob(2 * limit)
        under = blob(limit // 2)

        def with_input(value: dict[str, Any]) -> workflow_pb2.WorkflowDefinition:
            message = definition("payload", task("a", capability="work"))
            fill_struct(message.tasks[0].input, value)
            return message

        def oversized() -> None:
            with auth.sync_channel(f"127.0.0.1:{server.port}") as sync_channel:
                workflows = workflow_service_pb2_grpc.WorkflowServiceStub(sync_channel)
                create = workflow_service_pb2.CreateWorkflowDefinitionRequest(
                    definition=with_input(over)
                )
                _exhausted(lambda: workflows.CreateWorkflowDefinition(create, timeout=5))
                inline = workflow_service_pb2.TriggerWorkflowRequest(definition=with_input(over))
                _exhausted(lambda: workflows.TriggerWorkflow(inline, timeout=5))
                run_input = workflow_service_pb2.TriggerWorkflowRequest(
                    definition_id=created.definition_id
                )
                fill_struct(run_input.input, over)
                _exhausted(lambda: workflows.TriggerWorkflow(run_input, timeout=5))
                nested = workflow_service_pb2.TriggerWorkflowRequest(
                    definition_id=created.definition_id
                )
                fill_struct(nested.input, {"list": [{"k": "y" * 1024} for _ in range(40)]})
                _exhausted(lambda: workflows.TriggerWorkflow(nested, timeout=5))

        await asyncio.to_thread(oversized)
        definitions_now = await client.workflows.ListWorkflowDefinitions(
            workflow_service_pb2.ListWorkflowDefinitionsRequest()
        )
        assert len(definitions_now.definitions) == 1
        runs = await client.workflows.ListWorkflowRuns(
            workflow_service_pb2.ListWorkflowRunsRequest()
        )
        assert not runs.runs

        run = await client.trigger(definition_id=created.definition_id, input=under)
        assignment = await worker.next_assignment()
        assert assignment.run_id == run.run_id
        output = workflow_service_pb2.CompleteTaskRequest(
            task_id=assignment.task_id, agent_id="payload-1", attempt=assignment.attempt
        )
        fill_struct(output.output, over)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.workflows.CompleteTask(output)
        assert caught.value.code() == Code.RESOURCE_EXHAUSTED, caught.value.details()
        assert (await client.run(run.run_id)).state == workflow_pb2.RUN_STATE_RUNNING
        await worker.complete(assignment, under)
        await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        await client.close()


async def test_more_tasks_than_the_limit_is_resource_exhausted(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, limits=Limits(max_tasks_per_definition=5)) as server,
        connect(server.port) as client,
    ):
        too_many = definition("many", *(task(f"t{index}") for index in range(6)))
        with pytest.raises(grpc.aio.AioRpcError) as created:
            await client.create(too_many)
        assert created.value.code() == Code.RESOURCE_EXHAUSTED, created.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as triggered:
            await client.trigger(definition=too_many)
        assert triggered.value.code() == Code.RESOURCE_EXHAUSTED, triggered.value.details()
        assert (await client.create(definition("five", *(task(f"t{i}") for i in range(5))))).tasks
