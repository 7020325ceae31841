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
"""

from __future__ import annotations

import asyncio
import contextlib
import graphlib
import json
import math
import sqlite3
import string
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import grpc
import pytest
from conftest import ServerFactory
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct, Value
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import WAIT, Agent, Client, bad_request, connect, definition, task
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from opscore.domain.validation import Limits
from opscore.server import SERVICE_NAMES

Code = grpc.StatusCode

ACCEPTABLE = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
        Code.ALREADY_EXISTS,
        Code.ABORTED,
        Code.UNAVAILABLE,
    }
)
"""Every status the contract allows an answer to a client's request to have."""

REFUSALS = frozenset({Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED})
"""How a request the contract calls invalid must be answered."""

EXAMPLES = 75
"""Examples per RPC (the whole module stays well under a minute)."""

CALL_TIMEOUT = 30.0
"""Seconds a unary call may take: a server that hangs fails the property with DEADLINE_EXCEEDED."""

MAX_NAME = 200
MAX_ID = 128
MAX_DURATION_SECONDS = 315_576_000_000
MAX_TIMEOUT = timedelta(days=7)
MAX_BACKOFF = timedelta(days=1)
MAX_ATTEMPTS = 100
MAX_MULTIPLIER = 100.0
ID_ALPHABET = string.ascii_letters + string.digits + "._:-"

HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


# Strategies: text, ids, numbers --------------------------------------------------------------

# Surrogates are excluded: protobuf refuses them on the client side (they are not UTF-8).
CHARACTERS = st.characters(exclude_categories=("Cs",))


def _repeat(seed: str, length: int) -> str:
    """`seed` repeated to exactly `length` characters (long strings at little entropy cost)."""
    return (seed * (length // len(seed) + 1))[:length]


def _with_nul(before: str, after: str) -> str:
    return f"{before}\x00{after}"


def _insert(text: str, character: str, position: int) -> str:
    position %= len(text) + 1
    return text[:position] + character + text[position:]


short_text = st.text(CHARACTERS, max_size=24)
long_text = st.builds(
    _repeat, st.text(CHARACTERS, min_size=1, max_size=4), st.integers(MAX_NAME + 1, 100_000)
)
nul_text = st.builds(_with_nul, st.text(CHARACTERS, max_size=8), st.text(CHARACTERS, max_size=8))
edge_text = st.sampled_from(
    [
        "",
        " ",
        "\t",
        "\n",
        "\x00",
        "\x7f",
        "\u200b",
        "\ufeff",
        "\U0001f600",
        "a" * MAX_NAME,
        "a" * (MAX_NAME + 1),
        "\u00e9" * MAX_NAME,
        "\U0001f600" * (MAX_NAME + 1),
        "../../etc/passwd",
        "'; DROP TABLE tasks; --",
        "%s%n%x",
        "\\",
        "null",
        "NaN",
    ]
)
hostile_text = st.one_of(short_text, nul_text, long_text, edge_text)

valid_ids = st.text(ID_ALPHABET, min_size=1, max_size=MAX_ID)
wrong_ids = st.one_of(
    st.just(""),
    st.text(ID_ALPHABET, min_size=MAX_ID + 1, max_size=400),
    st.builds(
        _insert,
        st.text(ID_ALPHABET, min_size=1, max_size=20),
        st.characters(exclude_categories=("Cs",), exclude_characters=ID_ALPHABET),
        st.integers(0, 20),
    ),
    hostile_text,
)


def ids(known: Sequence[str]) -> st.SearchStrategy[str]:
    """Ids that exist, ids of the right shape that do not, and ids of the wrong shape."""
    return st.one_of(st.sampled_from(list(known)), valid_ids, wrong_ids)


def optional_ids(known: Sequence[str]) -> st.SearchStrategy[str]:
    """As `ids`, with the empty string (the field left unset) likely."""
    return st.one_of(st.just(""), ids(known))


int32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, -1, 2, 100, 101, 1000, 1001, 2**31 - 1, -(2**31)]),
)
enum_numbers = st.one_of(st.integers(-3, 9), int32)
page_sizes = st.one_of(st.integers(-2, 3), int32)


def _duration(seconds: int, nanos: int) -> Duration:
    return Duration(seconds=seconds, nanos=nanos)


durations = st.builds(
    _duration,
    st.one_of(
        st.integers(-10, 10),
        st.integers(-MAX_DURATION_SECONDS, MAX_DURATION_SECONDS),
        st.sampled_from(
            [60, 86_400, 86_401, 604_800, 604_801, MAX_DURATION_SECONDS, -MAX_DURATION_SECONDS]
        ),
    ),
    st.one_of(st.just(0), st.integers(-999_999_999, 999_999_999)),
)
optional_durations = st.one_of(st.none(), durations)
multipliers = st.one_of(
    st.floats(), st.sampled_from([0.0, 1.0, 2.0, 100.0, 100.5, -1.0, math.nan, math.inf])
)


# Strategies: Struct payloads -----------------------------------------------------------------

struct_keys = st.one_of(st.sampled_from(["k", "a", "b", ""]), short_text, nul_text)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),  # NaN and the infinities included
    st.integers(-(2**53), 2**53),
    short_text,
    short_text,
    nul_text,
    long_text,
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(struct_keys, children, max_size=4)
    ),
    max_leaves=12,
)


def _nest(value: Any, depth: int, key: str) -> dict[str, Any]:
    """`value` wrapped `depth` times, alternately in an object and a list, inside an object."""
    for level in range(depth):
        value = {key: value} if level % 2 == 0 else [value]
    return value if isinstance(value, dict) else {key: value}


def _blob(size: int) -> dict[str, Any]:
    return {"blob": "x" * size}


deep_payloads = st.builds(_nest, json_values, st.integers(1, 70), struct_keys)
big_payloads = st.builds(_blob, st.sampled_from([10_000, 600_000, 1_100_000, 5_000_000]))
small_payloads = st.one_of(
    st.just({}), st.dictionaries(struct_keys, json_values, max_size=5), deep_payloads
)
payloads = st.one_of(small_payloads, big_payloads)


def fill_struct(target: Struct, value: dict[str, Any]) -> None:
    """Set a Struct field in place: assigning or copying one re-parses it, which a deep one
    fails on the client side before it could reach the server."""
    target.update(value)


# Strategies: definitions ---------------------------------------------------------------------

TASK_NAMES = ("a", "b", "c", "d", "e")
task_names = st.one_of(st.sampled_from(TASK_NAMES), st.sampled_from(TASK_NAMES), hostile_text)
workflow_names = st.one_of(st.sampled_from(["hostile", "chain", "stuck"]), hostile_text)
capabilities = st.one_of(st.sampled_from(["", "work", "nobody"]), hostile_text)
labels = st.dictionaries(st.one_of(st.just("zone"), hostile_text), hostile_text, max_size=3)


@st.composite
def retry_policies(draw: st.DrawFn) -> workflow_pb2.RetryPolicy:
    """A retry policy with any numbers and durations."""
    policy = workflow_pb2.RetryPolicy(
        max_attempts=draw(st.one_of(st.integers(-2, 102), int32)),
        backoff_multiplier=draw(multipliers),
    )
    for name in ("initial_backoff", "max_backoff"):
        value = draw(optional_durations)
        if value is not None:
            getattr(policy, name).CopyFrom(value)
    return policy


def _server_set_fields(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """Fields the server sets and must ignore: sometimes sent anyway."""
    if draw(st.booleans()):
        message.definition_id = draw(hostile_text)
        message.version = draw(int32)


def _fill_small(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """Up to 8 tasks with random names, references, fallbacks, labels, inputs and policies."""
    names = draw(st.lists(task_names, max_size=8))
    message.workflow_name = draw(workflow_names)
    message.description = draw(st.one_of(st.just(""), hostile_text))
    _server_set_fields(draw, message)
    references = st.one_of(st.sampled_from(names), hostile_text) if names else hostile_text
    for name in names:
        spec = message.tasks.add(
            name=name,
            capability=draw(capabilities),
            depends_on=draw(st.lists(references, max_size=3)),
            fallback=draw(st.one_of(st.just(""), st.just(""), references)),
        )
        spec.labels.update(draw(labels))
        fill_struct(spec.input, draw(small_payloads))
        timeout = draw(optional_durations)
        if timeout is not None:
            spec.timeout.CopyFrom(timeout)
        if draw(st.booleans()):
            spec.retry_policy.CopyFrom(draw(retry_policies()))


def _fill_ring(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """A ring of dependencies (a self-dependency for one task), possibly behind a valid task."""
    size = draw(st.integers(1, 6))
    message.workflow_name = "ring"
    if draw(st.booleans()):
        message.tasks.add(name="entry", capability="nobody")
    for index in range(size):
        message.tasks.add(
            name=f"r{index}", capability="nobody", depends_on=[f"r{(index + 1) % size}"]
        )


def _fill_many(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """Around the limit of tasks per definition: flat, one long chain, or one long cycle."""
    size = draw(st.sampled_from([999, 1000, 1001, 1500]))
    shape = draw(st.sampled_from(["flat", "chain", "cycle"]))
    message.workflow_name = f"many-{shape}"
    for index in range(size):
        depends_on: list[str] = []
        if shape == "chain" and index:
            depends_on = [f"t{index - 1}"]
        elif shape == "cycle":
            depends_on = [f"t{(index + 1) % size}"]
        message.tasks.add(name=f"t{index}", capability="nobody", depends_on=depends_on)


DEFINITION_SHAPES: dict[str, Callable[[st.DrawFn, workflow_pb2.WorkflowDefinition], None]] = {
    "small": _fill_small,
    "ring": _fill_ring,
    "many": _fill_many,
}


def fill_definition(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """Draw a definition into `message` in place (built apart and copied in, a deep Struct in a
    task input would fail to re-parse on the client side)."""
    shape = draw(st.sampled_from(["small", "small", "small", "small", "ring", "many"]))
    DEFINITION_SHAPES[shape](draw, message)


# The world: what exists on the server before the examples ------------------------------------

LIVE = "@live:"
"""A task_id placeholder: replaced by the task_id, agent_id and attempt of an assignment the
worker holds (or held), so results and lease extensions reach real tasks."""

LIVE_TASK = "@task:"
"""A task_id placeholder: replaced by the task_id only; agent_id and attempt stay as drawn."""


@dataclass
class World:
    """Ids of things that exist, to aim hostile requests at, and the worker's assignments."""

    agents: list[str]
    definitions: list[str]
    names: list[str]
    runs: list[str]
    tasks: list[str]
    request_ids: list[str]
    page_tokens: list[str]
    worker: Agent
    held: list[workflow_pb2.TaskAssignment] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def assignment(self, index: int) -> workflow_pb2.TaskAssignment | None:
        """One of the worker's assignments so far, if it got any."""
        with self.lock:
            return self.held[index % len(self.held)] if self.held else None


async def build_world(client: Client) -> tuple[World, asyncio.Task[None]]:
    """Agents (a connected worker, two idle ones), definitions, runs whose first tasks the
    worker holds, and page tokens; plus the task collecting the worker's assignments."""
    worker = await client.agent("worker-1", capabilities=["work"], max_concurrent_tasks=20)
    await client.agent("idle-1", capabilities=["idle", "nobody"], connect=False)
    await client.agent("idle-2", labels={"zone": "b"}, connect=False)
    chain = await client.create(
        definition(
            "chain",
            task("a", capability="work", input={"k": 1}),
            task("b", capability="work", depends_on=["a"]),
            task("c", capability="work", depends_on=["b"]),
        ),
        request_id="req-chain",
    )
    stuck = await client.create(definition("stuck", task("x", capability="nobody")))
    runs = [await client.trigger(definition_id=chain.definition_id) for _ in range(4)]
    runs.append(await client.trigger(definition_id=stuck.definition_id, agent_id="idle-1"))
    runs.append(await client.trigger(workflow_name="stuck", request_id="req-run"))
    tokens = [
        (
            await client.lifecycle.ListAgents(agent_lifecycle_pb2.ListAgentsRequest(page_size=1))
        ).next_page_token,
        (
            await client.workflows.ListWorkflowDefinitions(
                workflow_service_pb2.ListWorkflowDefinitionsRequest(page_size=1)
            )
        ).next_page_token,
        (
            await client.workflows.ListWorkflowRuns(
                workflow_service_pb2.ListWorkflowRunsRequest(page_size=1)
            )
        ).next_page_token,
    ]
    world = World(
        agents=["worker-1", "idle-1", "idle-2"],
        definitions=[chain.definition_id, stuck.definition_id],
        names=["chain", "stuck"],
        runs=[run.run_id for run in runs],
        tasks=[task_run.task_id for run in runs for task_run in run.tasks],
        request_ids=["req-chain", "req-run"],
        page_tokens=[token for token in tokens if token],
        worker=worker,
    )

    async def collect() -> None:
        while True:
            event = await worker.events.get()
            if event.WhichOneof("event") == "assignment":
                with world.lock:
                    world.held.append(event.assignment)

    collector = asyncio.create_task(collect())
    async with asyncio.timeout(WAIT):
        while len(world.held) < 4:
            await asyncio.sleep(0.01)
    return world, collector


async def stop_world(client: Client, world: World, collector: asyncio.Task[None]) -> None:
    """Stop collecting, close the agents' streams; a stream the server broke off must have
    ended with a status a client can act on (an assignment it could not even send, or the
    client could not parse, ends it UNKNOWN or INTERNAL)."""
    collector.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collector
    await client.close()
    error = world.worker.stream_error
    assert error is None or error.code() in ACCEPTABLE, (
        f"the worker's task stream ended {error.code().name}: {error.details()}"
    )


# Requests, one strategy per RPC --------------------------------------------------------------


def page_tokens(world: World) -> st.SearchStrategy[str]:
    """Empty, issued, and forged page tokens."""
    forged = st.binary(max_size=40).map(lambda raw: raw.hex())
    return st.one_of(st.just(""), st.sampled_from(world.page_tokens), forged, hostile_text)


@st.composite
def register_requests(draw: st.DrawFn, world: World) -> Message:
    """RegisterAgent with any id, name, version, capabilities, labels and slot count."""
    return agent_lifecycle_pb2.RegisterAgentRequest(
        agent_id=draw(optional_ids(world.agents)),
        name=draw(st.one_of(st.just("agent"), hostile_text)),
        version=draw(st.one_of(st.just("1.0"), hostile_text)),
        capabilities=draw(st.lists(capabilities, max_size=5)),
        labels=draw(labels),
        max_concurrent_tasks=draw(st.one_of(st.integers(-2, 5), int32)),
    )


@st.composite
def create_requests(draw: st.DrawFn, world: World) -> Message:
    """CreateWorkflowDefinition with any definition and request id."""
    request = workflow_service_pb2.CreateWorkflowDefinitionRequest(
        request_id=draw(optional_ids(world.request_ids))
    )
    fill_definition(draw, request.definition)
    return request


@st.composite
def trigger_requests(draw: st.DrawFn, world: World, source: str) -> Message:
    """TriggerWorkflow from one source (or none), with any pin, input and request id."""
    request = workflow_service_pb2.TriggerWorkflowRequest(
        agent_id=draw(optional_ids(world.agents)),
        request_id=draw(optional_ids(world.request_ids)),
    )
    if source == "definition_id":
        chosen = draw(st.one_of(st.none(), ids(world.definitions)))
        if chosen is not None:
            request.definition_id = chosen
    elif source == "workflow_name":
        request.workflow_name = draw(st.one_of(st.sampled_from(world.names), hostile_text))
    else:
        fill_definition(draw, request.definition)
    fill_struct(request.input, draw(payloads))
    return request


@st.composite
def result_requests(draw: st.DrawFn, world: World, rpc: str) -> Message:
    """CompleteTask, FailTask or ExtendTaskLease: aimed at a held attempt, at a real task with
    a wrong agent or attempt, or at anything at all."""
    task_id = draw(
        st.one_of(
            st.integers(0, 1000).map(lambda index: f"{LIVE}{index}"),
            st.integers(0, 1000).map(lambda index: f"{LIVE_TASK}{index}"),
            ids(world.tasks),
        )
    )
    common: dict[str, Any] = {
        "task_id": task_id,
        "agent_id": draw(ids(world.agents)),
        "attempt": draw(st.one_of(st.integers(-1, 3), int32)),
    }
    if rpc == "CompleteTask":
        request: Message = workflow_service_pb2.CompleteTaskRequest(**common)
        fill_struct(cast(workflow_service_pb2.CompleteTaskRequest, request).output, draw(payloads))
    elif rpc == "FailTask":
        request = workflow_service_pb2.FailTaskRequest(
            **common, error=draw(hostile_text), retryable=draw(st.booleans())
        )
    else:
        request = workflow_service_pb2.ExtendTaskLeaseRequest(**common)
        extend_by = draw(st.one_of(optional_durations, st.just(Duration(seconds=30))))
        if extend_by is not None:
            request.extend_by.CopyFrom(extend_by)
    return request


def rpc_requests(world: World) -> dict[str, st.SearchStrategy[Message]]:
    """For each RPC under test (TriggerWorkflow once per source), its hostile requests."""
    agent_ids = ids(world.agents)
    lifecycle = agent_lifecycle_pb2
    service = workflow_service_pb2
    return {
        "RegisterAgent": register_requests(world),
        "DeregisterAgent": st.builds(lifecycle.DeregisterAgentRequest, agent_id=agent_ids),
        "Heartbeat": st.builds(lifecycle.HeartbeatRequest, agent_id=agent_ids),
        "ReportState": st.builds(
            lifecycle.ReportStateRequest,
            agent_id=agent_ids,
            state=enum_numbers,
            detail=st.one_of(st.just(""), hostile_text),
        ),
        "GetAgent": st.builds(lifecycle.GetAgentRequest, agent_id=agent_ids),
        "ListAgents": st.builds(
            lifecycle.ListAgentsRequest,
            page_size=page_sizes,
            page_token=page_tokens(world),
            state=enum_numbers,
            capability=st.one_of(capabilities),
        ),
        "CreateWorkflowDefinition": create_requests(world),
        "GetWorkflowDefinition": st.builds(
            service.GetWorkflowDefinitionRequest, definition_id=ids(world.definitions)
        ),
        "ListWorkflowDefinitions": st.builds(
            service.ListWorkflowDefinitionsRequest,
            page_size=page_sizes,
            page_token=page_tokens(world),
            workflow_name=st.one_of(st.just(""), st.sampled_from(world.names), hostile_text),
        ),
        "TriggerWorkflow[definition_id]": trigger_requests(world, "definition_id"),
        "TriggerWorkflow[workflow_name]": trigger_requests(world, "workflow_name"),
        "TriggerWorkflow[definition]": trigger_requests(world, "definition"),
        "GetWorkflowRun": st.builds(service.GetWorkflowRunRequest, run_id=ids(world.runs)),
        "ListWorkflowRuns": st.builds(
            service.ListWorkflowRunsRequest,
            page_size=page_sizes,
            page_token=page_tokens(world),
            state=enum_numbers,
            definition_id=optional_ids(world.definitions),
            agent_id=optional_ids(world.agents),
            view=enum_numbers,
            workflow_name=st.one_of(st.just(""), st.sampled_from(world.names), hostile_text),
            order_by=st.one_of(st.sampled_from(sorted(RUN_ORDERS)), hostile_text),
        ),
        "ListWorkflowRunTasks": st.builds(
            service.ListWorkflowRunTasksRequest,
            run_id=ids(world.runs),
            page_size=page_sizes,
            page_token=page_tokens(world),
        ),
        "CancelWorkflowRun": st.builds(service.CancelWorkflowRunRequest, run_id=ids(world.runs)),
        "CompleteTask": result_requests(world, "CompleteTask"),
        "FailTask": result_requests(world, "FailTask"),
        "ExtendTaskLease": result_requests(world, "ExtendTaskLease"),
        "StreamTasks": st.builds(service.StreamTasksRequest, agent_id=agent_ids),
    }


RPCS = [
    "RegisterAgent",
    "DeregisterAgent",
    "Heartbeat",
    "ReportState",
    "GetAgent",
    "ListAgents",
    "CreateWorkflowDefinition",
    "GetWorkflowDefinition",
    "ListWorkflowDefinitions",
    "TriggerWorkflow[definition_id]",
    "TriggerWorkflow[workflow_name]",
    "TriggerWorkflow[definition]",
    "GetWorkflowRun",
    "ListWorkflowRuns",
    "ListWorkflowRunTasks",
    "CancelWorkflowRun",
    "CompleteTask",
    "FailTask",
    "ExtendTaskLease",
    "StreamTasks",
]


def resolve(request: Message, world: World) -> Message:
    """Replace a LIVE/LIVE_TASK placeholder by a real assignment's fields (in place: copying a
    message re-parses it, which a deep Struct fails)."""
    task_id: str = getattr(request, "task_id", "")
    if not task_id.startswith((LIVE, LIVE_TASK)):
        return request
    live = task_id.startswith(LIVE)
    held = world.assignment(int(task_id.removeprefix(LIVE).removeprefix(LIVE_TASK)))
    if held is None:
        request.task_id = world.tasks[0]  # type: ignore[attr-defined]
        return request
    request.task_id = held.task_id  # type: ignore[attr-defined]
    if live:
        request.agent_id = "worker-1"  # type: ignore[attr-defined]
        request.attempt = held.attempt  # type: ignore[attr-defined]
    return request


# The oracle: what the contract says must be refused -------------------------------------------

SERVER_SET = ("definition.definition_id", "definition.version", "definition.created_at")
"""Paths of fields a client may send but the server ignores."""

REQUIRED_IDS = {
    "DeregisterAgentRequest": ("agent_id",),
    "HeartbeatRequest": ("agent_id",),
    "ReportStateRequest": ("agent_id",),
    "GetAgentRequest": ("agent_id",),
    "StreamTasksRequest": ("agent_id",),
    "GetWorkflowDefinitionRequest": ("definition_id",),
    "GetWorkflowRunRequest": ("run_id",),
    "ListWorkflowRunTasksRequest": ("run_id",),
    "CancelWorkflowRunRequest": ("run_id",),
    "CompleteTaskRequest": ("task_id", "agent_id"),
    "FailTaskRequest": ("task_id", "agent_id"),
    "ExtendTaskLeaseRequest": ("task_id", "agent_id"),
}
OPTIONAL_IDS = {
    "RegisterAgentRequest": ("agent_id",),
    "CreateWorkflowDefinitionRequest": ("request_id",),
    "TriggerWorkflowRequest": ("definition_id", "agent_id", "request_id"),
    "ListWorkflowRunsRequest": ("definition_id", "agent_id"),
}


def walk(message: Message, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) in a message: scalars, map keys (as `path{key}`), submessages."""
    for descriptor, value in message.ListFields():
        here = f"{path}.{descriptor.name}" if path else descriptor.name
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            for key in value:
                yield f"{here}{{key}}", key
                entry = value[key]
                if isinstance(entry, Message):
                    yield from _walk_value(entry, f"{here}[{key!r}]")
                else:
                    yield f"{here}[{key!r}]", entry
        elif descriptor.is_repeated:
            for index, item in enumerate(value):
                yield from _walk_value(item, f"{here}[{index}]")
        else:
            yield from _walk_value(value, here)


def _walk_value(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, Message):
        yield from walk(value, path)


def is_id(value: str) -> bool:
    """The contract's id shape."""
    return 1 <= len(value) <= MAX_ID and all(character in ID_ALPHABET for character in value)


def bad_name(value: str) -> bool:
    """Longer than a name may be, or holding a character that is not printable."""
    return len(value) > MAX_NAME or not value.isprintable()


def duration_value(message: Duration) -> timedelta | None:
    """A Duration's length, or None when it is not a valid Duration (mixed signs)."""
    if (message.seconds > 0 > message.nanos) or (message.seconds < 0 < message.nanos):
        return None
    return timedelta(seconds=message.seconds, microseconds=message.nanos / 1000)


def plain(value: Value) -> Any:
    """A Struct Value as plain Python (NaN and the infinities kept)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return plain_struct(value.struct_value)
    if kind == "list_value":
        return [plain(item) for item in value.list_value.values]
    return None if kind in (None, "null_value") else getattr(value, kind)


def plain_struct(message: Struct) -> dict[str, Any]:
    """A Struct as a dict."""
    return {key: plain(item) for key, item in message.fields.items()}


def payload_bytes(message: Struct) -> int:
    """Size of a Struct as compact JSON (UTF-8), the measure of max_payload_bytes."""
    compact = json.dumps(plain_struct(message), separators=(",", ":"), ensure_ascii=False)
    return len(compact.encode())


def _label_problems(values: dict[str, str], path: str) -> Iterator[str]:
    for key, value in values.items():
        if not key or len(key) > MAX_NAME:
            yield f"{path} has a key that is empty or over {MAX_NAME} characters"
        if len(value) > MAX_NAME:
            yield f"{path}[{key!r}] is over {MAX_NAME} characters"


def _duration_problems(
    message: Any, name: str, path: str, *, low: timedelta, high: timedelta, zero: bool
) -> Iterator[str]:
    if not message.HasField(name):
        return
    value = duration_value(getattr(message, name))
    if value is None:
        yield f"{path}.{name} has seconds and nanos of different signs"
    elif value < low or value > high or (value == low and not zero):
        yield f"{path}.{name} is out of range: {value}"


def _task_problems(spec: workflow_pb2.TaskSpec, path: str, names: set[str]) -> Iterator[str]:
    for index, dependency in enumerate(spec.depends_on):
        if dependency not in names or dependency == spec.name:
            yield f"{path}.depends_on[{index}] names no other task: {dependency!r}"
    if spec.fallback and (spec.fallback not in names or spec.fallback == spec.name):
        yield f"{path}.fallback names no other task: {spec.fallback!r}"
    if len(spec.capability) > MAX_NAME:
        yield f"{path}.capability is over {MAX_NAME} characters"
    yield from _label_problems(dict(spec.labels), f"{path}.labels")
    yield from _duration_problems(
        spec, "timeout", path, low=timedelta(0), high=MAX_TIMEOUT, zero=False
    )
    if spec.HasField("retry_policy"):
        policy = spec.retry_policy
        here = f"{path}.retry_policy"
        if not 0 <= policy.max_attempts <= MAX_ATTEMPTS:
            yield f"{here}.max_attempts is out of range: {policy.max_attempts}"
        if not 0 <= policy.backoff_multiplier <= MAX_MULTIPLIER:  # NaN fails this too
            yield f"{here}.backoff_multiplier is out of range: {policy.backoff_multiplier}"
        for name in ("initial_backoff", "max_backoff"):
            yield from _duration_problems(
                policy, name, here, low=timedelta(0), high=MAX_BACKOFF, zero=True
            )


def _graph_problems(tasks: Sequence[workflow_pb2.TaskSpec]) -> Iterator[str]:
    by_name = {spec.name: spec for spec in tasks}
    targets = [spec.fallback for spec in tasks if spec.fallback in by_name]
    for target in sorted(set(targets)):
        fallback = by_name[target]
        if targets.count(target) > 1:
            yield f"task {target!r} is the fallback of two tasks"
        if fallback.depends_on or fallback.fallback:
            yield f"fallback task {target!r} has dependencies or a fallback of its own"
        if any(target in spec.depends_on for spec in tasks):
            yield f"fallback task {target!r} is depended on"
    sorter = graphlib.TopologicalSorter(
        {
            spec.name: [dep for dep in spec.depends_on if dep in by_name and dep != spec.name]
            for spec in tasks
        }
    )
    try:
        sorter.prepare()
    except graphlib.CycleError as cycle:
        yield f"dependency cycle: {cycle.args[1]}"


def definition_problems(message: workflow_pb2.WorkflowDefinition, limits: Limits) -> list[str]:
    """Why the contract refuses a definition (empty when it does not)."""
    found = []
    if not message.workflow_name or bad_name(message.workflow_name):
        found.append("definition.workflow_name is empty, too long or not printable")
    if not message.tasks or len(message.tasks) > limits.max_tasks_per_definition:
        found.append(f"definition.tasks holds {len(message.tasks)} tasks")
        return found
    names = [spec.name for spec in message.tasks]
    if len(set(names)) != len(names) or any(not name or bad_name(name) for name in names):
        found.append("task names are duplicated, empty, too long or not printable")
    for index, spec in enumerate(message.tasks):
        found.extend(_task_problems(spec, f"definition.tasks[{index}]", set(names)))
    found.extend(_graph_problems(message.tasks))
    return found


RUN_ORDERS = {"", "created_at", "created_at asc", "created_at desc"}
"""The order_by values of ListWorkflowRuns, words apart by any spaces."""


def _run_listing_problems(request: workflow_service_pb2.ListWorkflowRunsRequest) -> Iterator[str]:
    if not 0 <= request.view <= 2:
        yield f"view {request.view} is unknown"
    if " ".join(request.order_by.split()) not in RUN_ORDERS:
        yield f"order_by {request.order_by[:40]!r} is not an order"
    if len(request.workflow_name) > MAX_NAME or "\x00" in request.workflow_name:
        yield "workflow_name is too long or holds a NUL"


def _request_rules(request: Message, limits: Limits) -> Iterator[str]:  # noqa: PLR0912
    """The rules specific to each request type."""
    kind = type(request).__name__
    if isinstance(request, agent_lifecycle_pb2.RegisterAgentRequest):
        if bad_name(request.name):
            yield "name is too long or not printable"
        if any(not item or len(item) > MAX_NAME for item in request.capabilities):
            yield "a capability is empty or too long"
        yield from _label_problems(dict(request.labels), "labels")
        if request.max_concurrent_tasks < 0:
            yield "max_concurrent_tasks is negative"
    elif isinstance(request, agent_lifecycle_pb2.ReportStateRequest):
        if request.state not in (1, 2, 3):
            yield f"state {request.state} is not IDLE, BUSY or ERROR"
    elif kind in (
        "ListAgentsRequest",
        "ListWorkflowRunsRequest",
        "ListWorkflowDefinitionsRequest",
        "ListWorkflowRunTasksRequest",
    ):
        if request.page_size < 0:  # type: ignore[attr-defined]
            yield "page_size is negative"
        states = {"ListAgentsRequest": 4, "ListWorkflowRunsRequest": 5}
        if kind in states and not 0 <= request.state <= states[kind]:  # type: ignore[attr-defined]
            yield f"state {request.state} is unknown"  # type: ignore[attr-defined]
        if isinstance(request, workflow_service_pb2.ListWorkflowRunsRequest):
            yield from _run_listing_problems(request)
    elif isinstance(request, workflow_service_pb2.CreateWorkflowDefinitionRequest):
        yield from definition_problems(request.definition, limits)
    elif isinstance(request, workflow_service_pb2.TriggerWorkflowRequest):
        source = request.WhichOneof("source")
        if source is None or (source != "definition" and not getattr(request, source)):
            yield "no source"
        if source == "definition":
            yield from definition_problems(request.definition, limits)
    elif isinstance(request, workflow_service_pb2.ExtendTaskLeaseRequest):
        value = duration_value(request.extend_by)
        if not request.HasField("extend_by") or value is None or value <= timedelta(0):
            yield "extend_by is unset, zero, negative or not a valid duration"


def problems(request: Message, limits: Limits) -> list[str]:
    """Why the contract refuses a request (empty when it does not predict a refusal)."""
    kind = type(request).__name__
    found = []
    for path, value in walk(request):
        if path.startswith(SERVER_SET):
            continue
        if isinstance(value, str) and "\x00" in value:
            found.append(f"{path} holds a NUL character")
        if (
            isinstance(value, Value)
            and value.WhichOneof("kind") == "number_value"
            and not math.isfinite(value.number_value)
        ):
            found.append(f"{path} is {value.number_value}")
        if isinstance(value, Struct) and payload_bytes(value) > limits.max_payload_bytes:
            found.append(f"{path} is over max_payload_bytes as JSON")
    for name in REQUIRED_IDS.get(kind, ()):
        if not is_id(getattr(request, name)):
            found.append(f"{name} {getattr(request, name)[:40]!r} is not an id")
    for name in OPTIONAL_IDS.get(kind, ()):
        value = getattr(request, name)
        if value and not is_id(value):
            found.append(f"{name} {value[:40]!r} is not an id")
    found.extend(_request_rules(request, limits))
    return found


# Sending, and judging answers -----------------------------------------------------------------


def to_plain(message: Message) -> dict[str, Any]:
    """A message as plain Python, Structs as JSON (text_format cannot print a deep Struct: it
    copies map entries, which re-parses them)."""
    if isinstance(message, Struct):
        return plain_struct(message)
    found: dict[str, Any] = {}
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            found[descriptor.name] = {
                key: to_plain(value[key]) if isinstance(value[key], Message) else value[key]
                for key in value
            }
        elif descriptor.is_repeated:
            found[descriptor.name] = [
                to_plain(item) if isinstance(item, Message) else item for item in value
            ]
        else:
            found[descriptor.name] = to_plain(value) if isinstance(value, Message) else value
    return found


def brief(request: Message) -> str:
    """A request in one line, cut short."""
    text = json.dumps(to_plain(request), default=repr)
    return text if len(text) <= 1500 else f"{text[:1500]}... ({len(text)} characters)"


def send(
    channel: grpc.Channel, rpc: str, request: Message, limits: Limits
) -> tuple[grpc.StatusCode, Any]:
    """Send one request; returns its status and the error (None when OK). A StreamTasks call
    counts as OK once the server has accepted it (it sends its headers then), unless the
    contract refuses the request: then its status is awaited, so a late refusal is never taken
    for an accepted stream, nor an accepted one for a refusal."""
    method = rpc.split("[", maxsplit=1)[0]
    if method in agent_lifecycle_pb2.DESCRIPTOR.services_by_name["AgentLifecycle"].methods_by_name:
        stub: Any = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
    else:
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
    try:
        if method == "StreamTasks":
            call = stub.StreamTasks(request, timeout=CALL_TIMEOUT)
            refusal_due = bool(problems(request, limits))
            if not refusal_due:
                call.initial_metadata()  # accepted (headers) or refused (a status alone)
            if refusal_due or call.done():
                with contextlib.suppress(StopIteration):
                    next(call)  # the refusal, or a first task
            call.cancel()
        else:
            getattr(stub, method)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as raised:
        error = cast(grpc.Call, raised)
        return error.code(), error
    return Code.OK, None


def judge(rpc: str, request: Message, code: grpc.StatusCode, error: Any, limits: Limits) -> None:
    """Assert the properties of one answer."""
    details = "" if error is None else (error.details() or "")
    where = f"{rpc} answered {code.name} ({details[:300]!r}) to {brief(request)}"
    # One line per kind of fault, so that Hypothesis reports each as a distinct failure.
    assert code != Code.UNKNOWN, where
    assert code != Code.INTERNAL, where
    assert code in ACCEPTABLE, where
    if code == Code.INVALID_ARGUMENT:
        violations = bad_request(error)
        assert any(name.strip() for name in violations), f"no field named in BadRequest: {where}"
    reasons = problems(request, limits)
    if reasons:
        assert code in REFUSALS, f"{where}\nbut the contract refuses it: {reasons[:5]}"


def run_property(
    port: int, strategy: st.SearchStrategy[Any], world: World, limits: Limits, rpc: str
) -> None:
    """Run the Hypothesis property for one RPC over a synchronous channel (in a worker thread)."""
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
    ) as channel:

        @HYPOTHESIS
        @given(request=strategy)
        def answers_are_sound(request: Message) -> None:
            request = resolve(request, world)
            code, error = send(channel, rpc, request, limits)
            judge(rpc, request, code, error, limits)

        answers_are_sound()


# After the examples ---------------------------------------------------------------------------


async def assert_serving(channel: grpc.aio.Channel) -> None:
    """Health answers SERVING, for the server and each service."""
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICE_NAMES):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


async def assert_normal_flow(channel: grpc.aio.Channel) -> None:
    """Register, stream, create, trigger, complete both tasks of a chain: the run SUCCEEDED and
    the second task saw the first's output."""
    client = Client(channel)
    tag = uuid.uuid4().hex[:8]
    capability = f"final-{tag}"
    try:
        agent = await client.agent(
            f"final-{tag}", capabilities=[capability], max_concurrent_tasks=10_000
        )
        created = await client.create(
            definition(
                f"final-{tag}",
                task("first", capability=capability, input={"n": 1}),
                task("second", capability=capability, depends_on=["first"]),
            )
        )
        run = await client.trigger(definition_id=created.definition_id, input={"who": "final"})
        done: list[str] = []
        async with asyncio.timeout(2 * WAIT):
            while len(done) < 2:
                event = await agent.next_event()
                assignment = event.assignment
                if event.WhichOneof("event") != "assignment" or assignment.run_id != run.run_id:
                    continue  # leftovers of the examples may reach this agent too
                if assignment.task_name == "second":
                    first = assignment.dependency_outputs["first"]
                    assert dict(first.fields)["from"].string_value == "first"
                await agent.complete(assignment, {"from": assignment.task_name})
                done.append(assignment.task_name)
        finished = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        assert [t.state for t in finished.tasks] == [workflow_pb2.TASK_STATE_SUCCEEDED] * 2
    finally:
        await client.close()


TEXT_COLUMNS = {
    "agents": {"agent_id": MAX_ID, "name": MAX_NAME, "version": MAX_NAME, "state_detail": 0},
    "agent_capabilities": {"agent_id": MAX_ID, "capability": MAX_NAME},
    "definitions": {
        "definition_id": MAX_ID,
        "name": MAX_NAME,
        "description": 0,
        "request_id": MAX_ID,
    },
    "runs": {"run_id": MAX_ID, "workflow_name": MAX_NAME, "agent_id": MAX_ID, "request_id": MAX_ID},
    "tasks": {
        "task_id": MAX_ID,
        "name": MAX_NAME,
        "capability": MAX_NAME,
        "fallback": MAX_NAME,
        "agent_id": MAX_ID,
        "pinned_agent_id": MAX_ID,
        "error": 0,
    },
}
"""Text columns, with their VARCHAR length (0: unbounded), that PostgreSQL enforces."""

JSON_COLUMNS = {
    "agents": ("labels",),
    "definitions": ("tasks",),
    "runs": ("input",),
    "tasks": ("labels", "depends_on", "input", "output", "retry_policy"),
}

INVARIANTS = {
    "a task whose run does not exist": """
        SELECT t.task_id FROM tasks t LEFT JOIN runs r ON r.run_id = t.run_id
        WHERE r.run_id IS NULL""",
    "an ASSIGNED task without agent, attempt or deadline": """
        SELECT task_id FROM tasks WHERE state = 'assigned'
        AND (agent_id IS NULL OR agent_id = '' OR attempt < 1 OR deadline IS NULL)""",
    "an ASSIGNED task held by an agent that does not exist": """
        SELECT t.task_id FROM tasks t LEFT JOIN agents a ON a.agent_id = t.agent_id
        WHERE t.state = 'assigned' AND a.agent_id IS NULL""",
    "a SUCCEEDED task without output": """
        SELECT task_id FROM tasks WHERE state = 'succeeded'
        AND (output IS NULL OR output = 'null')""",
    "a SUCCEEDED or FAILED task without finished_at": """
        SELECT task_id FROM tasks WHERE state IN ('succeeded', 'failed')
        AND finished_at IS NULL""",
    "a finished run without finished_at": """
        SELECT run_id FROM runs WHERE state IN ('succeeded', 'failed', 'cancelled')
        AND finished_at IS NULL""",
    "a SUCCEEDED run with a task neither SUCCEEDED nor SKIPPED": """
        SELECT DISTINCT r.run_id FROM runs r JOIN tasks t ON t.run_id = r.run_id
        WHERE r.state = 'succeeded' AND t.state NOT IN ('succeeded', 'skipped')""",
    "a PENDING or RUNNING run without an unfinished task": """
        SELECT r.run_id FROM runs r WHERE r.state IN ('pending', 'running')
        AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.run_id
                        AND t.state IN ('pending', 'queued', 'assigned'))""",
    "a finished run with an unfinished task": """
        SELECT DISTINCT r.run_id FROM runs r JOIN tasks t ON t.run_id = r.run_id
        WHERE r.state IN ('succeeded', 'failed', 'cancelled')
        AND t.state IN ('pending', 'queued', 'assigned')""",
}


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} stored in JSON")


def _json_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_strings(item)


def _invariant_faults(db: sqlite3.Connection) -> Iterator[str]:
    for description, query in INVARIANTS.items():
        found = [row[0] for row in db.execute(query).fetchmany(5)]
        if found:
            yield f"{description}: {found}"


def _text_faults(db: sqlite3.Connection) -> Iterator[str]:
    """Text PostgreSQL could not store: NUL characters, values longer than their VARCHAR."""
    for table, columns in TEXT_COLUMNS.items():
        for column, limit in columns.items():
            query = f"SELECT count(*) FROM {table} WHERE instr({column}, char(0)) > 0"
            if nul := db.execute(query).fetchone()[0]:
                yield f"{table}.{column}: {nul} values hold NUL"
            query = f"SELECT count(*) FROM {table} WHERE length({column}) > {limit or 1e18}"
            if long := db.execute(query).fetchone()[0]:
                yield f"{table}.{column}: {long} values over VARCHAR({limit})"


def _json_faults(db: sqlite3.Connection) -> Iterator[str]:
    """JSON PostgreSQL could not store: NaN or the infinities, NUL in strings (as \\u0000)."""
    for table, columns in JSON_COLUMNS.items():
        for column in columns:
            for (raw,) in db.execute(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL"):
                try:
                    loaded = json.loads(raw, parse_constant=_refuse_constant)
                except ValueError as error:
                    yield f"{table}.{column}: {error}"
                    break
                if any("\x00" in text for text in _json_strings(loaded)):
                    yield f"{table}.{column}: a string holds NUL"
                    break


def database_faults(path: str) -> list[str]:
    """Every broken invariant of the database (read with the sqlite3 module)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [*_invariant_faults(db), *_text_faults(db), *_json_faults(db)]


def database_path(url: str) -> str:
    """The file of a sqlite:/// URL."""
    return url.split(":///", 1)[1]


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


async def test_mixed_hostile_sequences_keep_the_server_sound(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    """Sequences of hostile requests to any RPC, interleaved, against one server."""
    async with start_server(sqlite_url) as server, connect(server.port) as client:
        world, collector = await build_world(client)
        limits: Limits = server.settings.limits
        by_rpc = rpc_requests(world)
        steps = st.lists(
            st.one_of([st.tuples(st.just(rpc), by_rpc[rpc]) for rpc in RPCS]),
            min_size=1,
            max_size=6,
        )

        def sequences() -> None:
            with grpc.insecure_channel(
                f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", -1)]
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
        await assert_normal_flow(client.channel)
        faults = await asyncio.to_thread(database_faults, database_path(sqlite_url))
        assert not faults, faults


# Each rule once ---------------------------------------------------------------------------------


def _deep(depth: int) -> dict[str, Any]:
    """Objects nested `depth` deep: past protobuf's default parse limit of 100 at 33."""
    value: dict[str, Any] = {"x": 1}
    for _ in range(depth):
        value = {"k": value}
    return value


def _with_struct(request: Message, name: str, value: dict[str, Any]) -> Message:
    fill_struct(getattr(request, name), value)
    return request


def _definition_with(**fields: Any) -> workflow_service_pb2.CreateWorkflowDefinitionRequest:
    request = workflow_service_pb2.CreateWorkflowDefinitionRequest()
    request.definition.workflow_name = "rule"
    spec = request.definition.tasks.add(name="a")
    for name, value in fields.items():
        if name == "input":
            fill_struct(spec.input, value)
        elif isinstance(value, Message):
            getattr(spec, name).CopyFrom(value)
        elif isinstance(value, list):
            getattr(spec, name).extend(value)
        else:
            setattr(spec, name, value)
    return request


BAD_STRUCTS = {
    "NaN": {"k": math.nan},
    "Infinity": {"k": math.inf},
    "-Infinity": {"k": [1, {"x": -math.inf}]},
    "NUL in a key": {"a\x00b": 1},
    "NUL in a value": {"k": ["ok", "a\x00b"]},
    "nested 33 deep": _deep(33),
    "nested 60 deep": _deep(60),
}


def contract_cases(world: World) -> list[tuple[str, str, Message]]:
    """(name, rpc, request): one request per rule of "Hostile input" that must be refused, and
    Structs nested too deep for protobuf to parse, which must at least not be a server fault."""
    lifecycle = agent_lifecycle_pb2
    service = workflow_service_pb2
    live = f"{LIVE}0"
    cases: list[tuple[str, str, Message]] = [
        ("id too long", "GetAgent", lifecycle.GetAgentRequest(agent_id="a" * 129)),
        ("id with a space", "Heartbeat", lifecycle.HeartbeatRequest(agent_id="a b")),
        ("id with NUL", "StreamTasks", service.StreamTasksRequest(agent_id="a\x00")),
        ("empty id", "DeregisterAgent", lifecycle.DeregisterAgentRequest()),
        ("run id shape", "CancelWorkflowRun", service.CancelWorkflowRunRequest(run_id="r/1")),
        ("run id shape", "GetWorkflowRun", service.GetWorkflowRunRequest(run_id="\u00e9")),
        (
            "definition id shape",
            "GetWorkflowDefinition",
            service.GetWorkflowDefinitionRequest(definition_id="d" * 200),
        ),
        ("agent name NUL", "RegisterAgent", lifecycle.RegisterAgentRequest(name="a\x00")),
        ("agent name long", "RegisterAgent", lifecycle.RegisterAgentRequest(name="n" * 201)),
        ("agent name control", "RegisterAgent", lifecycle.RegisterAgentRequest(name="a\x1fb")),
        ("version NUL", "RegisterAgent", lifecycle.RegisterAgentRequest(version="\x00")),
        (
            "empty capability",
            "RegisterAgent",
            lifecycle.RegisterAgentRequest(agent_id="c", capabilities=[""]),
        ),
        (
            "long capability",
            "RegisterAgent",
            lifecycle.RegisterAgentRequest(agent_id="c", capabilities=["c" * 201]),
        ),
        ("empty label key", "RegisterAgent", lifecycle.RegisterAgentRequest(labels={"": "v"})),
        (
            "long label value",
            "RegisterAgent",
            lifecycle.RegisterAgentRequest(labels={"k": "v" * 201}),
        ),
        (
            "negative slots",
            "RegisterAgent",
            lifecycle.RegisterAgentRequest(max_concurrent_tasks=-1),
        ),
        (
            "state OFFLINE",
            "ReportState",
            lifecycle.ReportStateRequest(agent_id="worker-1", state=4),
        ),
        (
            "unknown state",
            "ReportState",
            lifecycle.ReportStateRequest(agent_id="worker-1", state=99),
        ),
        (
            "detail NUL",
            "ReportState",
            lifecycle.ReportStateRequest(agent_id="worker-1", state=1, detail="\x00"),
        ),
        ("unknown filter", "ListAgents", lifecycle.ListAgentsRequest(state=-1)),
        ("negative page", "ListAgents", lifecycle.ListAgentsRequest(page_size=-1)),
        ("capability NUL", "ListAgents", lifecycle.ListAgentsRequest(capability="\x00")),
        ("unknown filter", "ListWorkflowRuns", service.ListWorkflowRunsRequest(state=6)),
        (
            "filter id shape",
            "ListWorkflowRuns",
            service.ListWorkflowRunsRequest(agent_id="a" * 129),
        ),
        (
            "name NUL",
            "ListWorkflowDefinitions",
            service.ListWorkflowDefinitionsRequest(workflow_name="\x00"),
        ),
        (
            "name NUL",
            "TriggerWorkflow[workflow_name]",
            service.TriggerWorkflowRequest(workflow_name="a\x00"),
        ),
        ("no source", "TriggerWorkflow[definition_id]", service.TriggerWorkflowRequest()),
        (
            "request id shape",
            "CreateWorkflowDefinition",
            service.CreateWorkflowDefinitionRequest(
                definition=definition("rule", task("a")), request_id="r" * 129
            ),
        ),
        (
            "error NUL",
            "FailTask",
            service.FailTaskRequest(task_id=live, agent_id="worker-1", attempt=1, error="\x00"),
        ),
        ("task name NUL", "CreateWorkflowDefinition", _definition_with(name="a\x00")),
        ("task name long", "CreateWorkflowDefinition", _definition_with(name="t" * 201)),
        ("capability long", "CreateWorkflowDefinition", _definition_with(capability="c" * 201)),
        ("unknown dependency", "CreateWorkflowDefinition", _definition_with(depends_on=["zz"])),
        ("self dependency", "CreateWorkflowDefinition", _definition_with(depends_on=["a"])),
        ("own fallback", "CreateWorkflowDefinition", _definition_with(fallback="a")),
        (
            "negative timeout",
            "CreateWorkflowDefinition",
            _definition_with(timeout=Duration(seconds=-1)),
        ),
        (
            "zero timeout",
            "CreateWorkflowDefinition",
            _definition_with(timeout=Duration()),
        ),
        (
            "timeout over 7 days",
            "CreateWorkflowDefinition",
            _definition_with(timeout=Duration(seconds=MAX_DURATION_SECONDS)),
        ),
        (
            "mixed-sign timeout",
            "CreateWorkflowDefinition",
            _definition_with(timeout=Duration(seconds=5, nanos=-1)),
        ),
        (
            "101 attempts",
            "CreateWorkflowDefinition",
            _definition_with(retry_policy=workflow_pb2.RetryPolicy(max_attempts=101)),
        ),
        (
            "negative attempts",
            "CreateWorkflowDefinition",
            _definition_with(retry_policy=workflow_pb2.RetryPolicy(max_attempts=-1)),
        ),
        (
            "NaN multiplier",
            "CreateWorkflowDefinition",
            _definition_with(retry_policy=workflow_pb2.RetryPolicy(backoff_multiplier=math.nan)),
        ),
        (
            "multiplier over 100",
            "CreateWorkflowDefinition",
            _definition_with(retry_policy=workflow_pb2.RetryPolicy(backoff_multiplier=101.0)),
        ),
        (
            "negative backoff",
            "CreateWorkflowDefinition",
            _definition_with(
                retry_policy=workflow_pb2.RetryPolicy(initial_backoff=Duration(seconds=-1))
            ),
        ),
        (
            "backoff over a day",
            "CreateWorkflowDefinition",
            _definition_with(
                retry_policy=workflow_pb2.RetryPolicy(max_backoff=Duration(seconds=86_401))
            ),
        ),
    ]
    for kind, value in BAD_STRUCTS.items():
        cases.append(
            (f"task input {kind}", "CreateWorkflowDefinition", _definition_with(input=value))
        )
        inline = service.TriggerWorkflowRequest()
        inline.definition.workflow_name = "rule"
        fill_struct(inline.definition.tasks.add(name="a").input, value)
        cases.append((f"inline task input {kind}", "TriggerWorkflow[definition]", inline))
        by_id = service.TriggerWorkflowRequest(definition_id=world.definitions[0])
        cases.append(
            (
                f"run input {kind}",
                "TriggerWorkflow[definition_id]",
                _with_struct(by_id, "input", value),
            )
        )
        by_name = service.TriggerWorkflowRequest(workflow_name=world.names[0])
        cases.append(
            (
                f"run input {kind}",
                "TriggerWorkflow[workflow_name]",
                _with_struct(by_name, "input", value),
            )
        )
        output = service.CompleteTaskRequest(task_id=live)
        cases.append((f"output {kind}", "CompleteTask", _with_struct(output, "output", value)))
    for kind, extend_by in {
        "unset": None,
        "zero": Duration(),
        "negative": Duration(seconds=-30),
        "mixed-sign": Duration(seconds=30, nanos=-5),
    }.items():
        request = service.ExtendTaskLeaseRequest(task_id=live)
        if extend_by is not None:
            request.extend_by.CopyFrom(extend_by)
        cases.append((f"extend_by {kind}", "ExtendTaskLease", request))
    return cases


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
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as sync_channel:
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
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as sync_channel:
                lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(sync_channel)
                workflows = workflow_service_pb2_grpc.WorkflowServiceStub(sync_channel)
                trigger = workflow_service_pb2.TriggerWorkflowRequest(
                    definition_id=created.definition_id
                )
                fill_struct(trigger.input, _blob(100 * 1024))
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
        over = _blob(2 * limit)
        under = _blob(limit // 2)

        def with_input(value: dict[str, Any]) -> workflow_pb2.WorkflowDefinition:
            message = definition("payload", task("a", capability="work"))
            fill_struct(message.tasks[0].input, value)
            return message

        def oversized() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as sync_channel:
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
