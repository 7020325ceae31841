"""Every malformed request is refused over a real gRPC channel with INVALID_ARGUMENT (each
offending field named in the message and in google.rpc.BadRequest), NOT_FOUND for what does not
exist, nothing stored, and never UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from helpers import Client, bad_request, definition, refused, resource_of, seconds, task
from opscore.v1 import agent_lifecycle_pb2, agent_pb2, workflow_pb2, workflow_service_pb2

# Helpers -------------------------------------------------------------------------------------


async def invalid(call: Awaitable[Any], *fields: str) -> dict[str, str]:
    """Await a call that must be INVALID_ARGUMENT naming exactly `fields`, in the message and in
    the BadRequest details; returns the violations.
    """
    error = await refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    violations = bad_request(error)
    assert set(violations) == set(fields), violations
    message = error.details() or ""
    for field in fields:
        assert f"{field}: " in message, (field, message)
        assert violations[field], f"{field} has no description"
    return violations


async def stored_definitions(client: Client) -> list[workflow_pb2.WorkflowDefinition]:
    """Every stored workflow definition."""
    response = await client.workflows.ListWorkflowDefinitions(
        workflow_service_pb2.ListWorkflowDefinitionsRequest(page_size=1000)
    )
    return list(response.definitions)


async def stored_runs(client: Client) -> list[workflow_pb2.WorkflowRun]:
    """Every stored workflow run."""
    response = await client.workflows.ListWorkflowRuns(
        workflow_service_pb2.ListWorkflowRunsRequest(page_size=1000)
    )
    return list(response.runs)


async def stored_agents(client: Client) -> list[agent_pb2.Agent]:
    """Every registered agent."""
    response = await client.lifecycle.ListAgents(
        agent_lifecycle_pb2.ListAgentsRequest(page_size=1000)
    )
    return list(response.agents)


def spec(name: str, **fields: Any) -> workflow_pb2.TaskSpec:
    """A TaskSpec with any field set (timeouts, retry policies)."""
    return workflow_pb2.TaskSpec(name=name, **fields)


def datetime_of(message: Any) -> datetime:
    """A Timestamp as an aware datetime."""
    return message.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


# Definitions that break the rules, and the fields each one must be refused on ------------------

INVALID_DEFINITIONS = [
    pytest.param(definition("", task("a")), {"definition.workflow_name"}, id="missing-name"),
    pytest.param(definition("   ", task("a")), {"definition.workflow_name"}, id="blank-name"),
    pytest.param(definition("wf"), {"definition.tasks"}, id="no-tasks"),
    pytest.param(
        definition("wf", task("a"), task("")), {"definition.tasks[1].name"}, id="empty-task-name"
    ),
    pytest.param(
        definition("wf", task("a"), task("b"), task("a")),
        {"definition.tasks[2].name"},
        id="duplicate-task-name",
    ),
    pytest.param(
        definition("wf", task("a"), task("b"), task("c", depends_on=["a", "ghost"])),
        {"definition.tasks[2].depends_on[1]"},
        id="unknown-dependency",
    ),
    pytest.param(
        definition("wf", task("a"), task("b", fallback="ghost")),
        {"definition.tasks[1].fallback"},
        id="unknown-fallback",
    ),
    pytest.param(
        definition("wf", task("a"), task("b", depends_on=["b"])),
        {"definition.tasks[1].depends_on[0]"},
        id="self-dependency",
    ),
    pytest.param(
        definition(
            "wf",
            task("start"),
            task("a", depends_on=["start", "b"]),
            task("b", depends_on=["c"]),
            task("c", depends_on=["a"]),
        ),
        {
            "definition.tasks[1].depends_on",
            "definition.tasks[2].depends_on",
            "definition.tasks[3].depends_on",
        },
        id="dependency-cycle",
    ),
    pytest.param(
        definition("wf", task("a"), spec("b", timeout=seconds(-1))),
        {"definition.tasks[1].timeout"},
        id="negative-timeout",
    ),
    pytest.param(
        definition("wf", spec("a", timeout=seconds(0))),
        {"definition.tasks[0].timeout"},
        id="zero-timeout",
    ),
    pytest.param(
        definition("wf", spec("a", retry_policy=workflow_pb2.RetryPolicy(max_attempts=-1))),
        {"definition.tasks[0].retry_policy.max_attempts"},
        id="negative-max-attempts",
    ),
    pytest.param(
        definition(
            "wf", spec("a", retry_policy=workflow_pb2.RetryPolicy(initial_backoff=seconds(-0.5)))
        ),
        {"definition.tasks[0].retry_policy.initial_backoff"},
        id="negative-initial-backoff",
    ),
    pytest.param(
        definition("wf", spec("a", retry_policy=workflow_pb2.RetryPolicy(max_backoff=seconds(-3)))),
        {"definition.tasks[0].retry_policy.max_backoff"},
        id="negative-max-backoff",
    ),
    pytest.param(
        definition("wf", spec("a", retry_policy=workflow_pb2.RetryPolicy(backoff_multiplier=-2.0))),
        {"definition.tasks[0].retry_policy.backoff_multiplier"},
        id="negative-backoff-multiplier",
    ),
]

SEVERAL_VIOLATIONS = definition(
    "",
    task("a", depends_on=["ghost"]),
    task("a"),
    spec("b", timeout=seconds(-1), retry_policy=workflow_pb2.RetryPolicy(max_attempts=-2)),
    task("c", depends_on=["d"], fallback="nowhere"),
    task("d", depends_on=["c"]),
)
SEVERAL_FIELDS = {
    "definition.workflow_name",
    "definition.tasks[0].depends_on[0]",
    "definition.tasks[1].name",
    "definition.tasks[2].timeout",
    "definition.tasks[2].retry_policy.max_attempts",
    "definition.tasks[3].fallback",
    "definition.tasks[3].depends_on",
    "definition.tasks[4].depends_on",
}


# CreateWorkflowDefinition --------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "fields"), INVALID_DEFINITIONS)
async def test_create_definition_refuses_invalid_definition(
    client: Client, bad: workflow_pb2.WorkflowDefinition, fields: set[str]
) -> None:
    violations = await invalid(client.create(bad), *fields)
    if len(fields) > 1:  # the cycle: each task on it is reported, with the cycle spelled out
        assert all("cycle" in description for description in violations.values()), violations
    assert await stored_definitions(client) == []


async def test_a_duration_over_its_limit_reads_as_people_write_it(client: Client) -> None:
    too_long = definition("wf", spec("a", timeout=seconds(8 * 86_400)))
    violations = await invalid(client.create(too_long), "definition.tasks[0].timeout")
    assert violations["definition.tasks[0].timeout"] == "must be at most 7 days"


async def test_create_definition_reports_every_violation_at_once(client: Client) -> None:
    await invalid(client.create(SEVERAL_VIOLATIONS), *SEVERAL_FIELDS)
    assert await stored_definitions(client) == []


async def test_create_definition_refuses_malformed_request_id(client: Client) -> None:
    await invalid(client.create(definition("wf", task("a")), request_id="not an id"), "request_id")
    assert await stored_definitions(client) == []


async def test_valid_definition_is_accepted_after_refusals(client: Client) -> None:
    await invalid(client.create(definition("", task("a"))), "definition.workflow_name")
    created = await client.create(
        definition("wf", task("a"), task("b", depends_on=["a"], fallback="c"), task("c"))
    )
    assert created.version == 1
    assert [d.definition_id for d in await stored_definitions(client)] == [created.definition_id]


# TriggerWorkflow -----------------------------------------------------------------------------


async def test_trigger_without_source_names_source(client: Client) -> None:
    await invalid(client.trigger(), "source")
    await invalid(client.trigger(input={"x": 1}, request_id="req-1"), "source")
    assert await stored_runs(client) == []


@pytest.mark.parametrize(("bad", "fields"), INVALID_DEFINITIONS)
async def test_trigger_validates_inline_definition(
    client: Client, bad: workflow_pb2.WorkflowDefinition, fields: set[str]
) -> None:
    await invalid(client.trigger(definition=bad), *fields)
    assert await stored_runs(client) == []
    assert await stored_definitions(client) == []


async def test_trigger_reports_every_inline_violation_at_once(client: Client) -> None:
    await invalid(client.trigger(definition=SEVERAL_VIOLATIONS), *SEVERAL_FIELDS)
    assert await stored_runs(client) == []


@pytest.mark.parametrize(
    "source",
    [
        pytest.param({"definition_id": "0190d2c1-0000-7000-8000-000000000000"}, id="definition_id"),
        pytest.param({"workflow_name": "no-such-workflow"}, id="workflow_name"),
    ],
)
async def test_trigger_unknown_definition_is_not_found(
    client: Client, source: dict[str, str]
) -> None:
    await client.create(definition("known", task("a")))
    error = await refused(client.trigger(**source), grpc.StatusCode.NOT_FOUND)
    # The type, not a phrase; the name is the id or the workflow name asked for.
    [asked] = source.values()
    assert resource_of(error) == ("opscore.v1.WorkflowDefinition", asked)
    assert await stored_runs(client) == []


async def test_trigger_pinned_to_unknown_agent_is_not_found(client: Client) -> None:
    created = await client.create(definition("wf", task("a")))
    error = await refused(
        client.trigger(definition_id=created.definition_id, agent_id="ghost-agent"),
        grpc.StatusCode.NOT_FOUND,
    )
    assert resource_of(error) == ("opscore.v1.Agent", "ghost-agent")
    await refused(
        client.trigger(definition=definition("inline", task("a")), agent_id="ghost-agent"),
        grpc.StatusCode.NOT_FOUND,
    )
    assert await stored_runs(client) == []


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        pytest.param({"definition_id": "bad id with spaces"}, "definition_id", id="spaces-id"),
        pytest.param({"definition_id": "x" * 300}, "definition_id", id="long-id"),
        pytest.param({"definition_id": "tab\there"}, "definition_id", id="control-id"),
        pytest.param({"workflow_name": "wf", "agent_id": "bad agent"}, "agent_id", id="agent"),
        pytest.param({"workflow_name": "wf", "agent_id": "a" * 129}, "agent_id", id="agent-129"),
        pytest.param(
            {"workflow_name": "wf", "request_id": "bad request id"}, "request_id", id="request"
        ),
    ],
)
async def test_trigger_refuses_malformed_id(
    client: Client, fields: dict[str, str], named: str
) -> None:
    await client.create(definition("wf", task("a")))
    await invalid(client.trigger(**fields), named)
    assert await stored_runs(client) == []


# AgentLifecycle ------------------------------------------------------------------------------


def registration(agent_id: str, **fields: Any) -> agent_lifecycle_pb2.RegisterAgentRequest:
    """A RegisterAgentRequest."""
    return agent_lifecycle_pb2.RegisterAgentRequest(agent_id=agent_id, **fields)


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        pytest.param({"agent_id": "bad id with spaces"}, "agent_id", id="spaces"),
        pytest.param({"agent_id": "x" * 129}, "agent_id", id="129-chars"),
        pytest.param({"agent_id": "x" * 300}, "agent_id", id="300-chars"),
        pytest.param({"agent_id": "slash/id"}, "agent_id", id="slash"),
        pytest.param(
            {"agent_id": "ok", "max_concurrent_tasks": -1},
            "max_concurrent_tasks",
            id="negative-slots",
        ),
    ],
)
async def test_register_refuses_malformed_agent(
    client: Client, request_fields: dict[str, Any], named: str
) -> None:
    request = agent_lifecycle_pb2.RegisterAgentRequest(name="n", version="1", **request_fields)
    await invalid(client.lifecycle.RegisterAgent(request), named)
    assert await stored_agents(client) == []


async def test_register_accepts_longest_id(client: Client) -> None:
    agent_id = "a:b.c_d-" + "x" * 120
    response = await client.lifecycle.RegisterAgent(registration(agent_id))
    assert response.agent.agent_id == agent_id


async def test_register_without_id_gets_server_assigned_id(client: Client) -> None:
    first = (await client.lifecycle.RegisterAgent(registration("", name="anon"))).agent
    second = (await client.lifecycle.RegisterAgent(registration("", name="anon"))).agent
    assert first.agent_id
    assert second.agent_id
    assert first.agent_id != second.agent_id
    assert first.max_concurrent_tasks == 1  # 0 means 1
    fetched = await client.lifecycle.GetAgent(
        agent_lifecycle_pb2.GetAgentRequest(agent_id=first.agent_id)
    )
    assert fetched.agent.name == "anon"
    assert {a.agent_id for a in await stored_agents(client)} == {first.agent_id, second.agent_id}


async def test_register_again_updates_and_keeps_registered_at(client: Client) -> None:
    first = (
        await client.lifecycle.RegisterAgent(
            registration(
                "worker-1",
                name="old",
                version="1.0",
                capabilities=["a", "b"],
                labels={"zone": "eu", "gpu": "no"},
                max_concurrent_tasks=2,
            )
        )
    ).agent
    await asyncio.sleep(0.02)
    second = (
        await client.lifecycle.RegisterAgent(
            registration(
                "worker-1",
                name="new",
                version="2.0",
                capabilities=["c"],
                labels={"zone": "us"},
                max_concurrent_tasks=3,
            )
        )
    ).agent
    fetched = (
        await client.lifecycle.GetAgent(agent_lifecycle_pb2.GetAgentRequest(agent_id="worker-1"))
    ).agent
    for agent in (second, fetched):
        assert agent.name == "new"
        assert agent.version == "2.0"
        assert list(agent.capabilities) == ["c"]
        assert dict(agent.labels) == {"zone": "us"}
        assert agent.max_concurrent_tasks == 3
        assert agent.registered_at == first.registered_at
        assert datetime_of(agent.last_seen_at) > datetime_of(first.last_seen_at)
    assert [a.agent_id for a in await stored_agents(client)] == ["worker-1"]
    listed = (
        await client.lifecycle.ListAgents(agent_lifecycle_pb2.ListAgentsRequest(capability="a"))
    ).agents
    assert list(listed) == []  # the old capabilities are gone


UNKNOWN_AGENT_CALLS: list[Any] = [
    pytest.param(
        lambda c: c.lifecycle.GetAgent(agent_lifecycle_pb2.GetAgentRequest(agent_id="ghost")),
        id="GetAgent",
    ),
    pytest.param(
        lambda c: c.lifecycle.Heartbeat(agent_lifecycle_pb2.HeartbeatRequest(agent_id="ghost")),
        id="Heartbeat",
    ),
    pytest.param(
        lambda c: c.lifecycle.ReportState(
            agent_lifecycle_pb2.ReportStateRequest(
                agent_id="ghost", state=agent_pb2.REPORTED_AGENT_STATE_IDLE
            )
        ),
        id="ReportState",
    ),
    pytest.param(
        lambda c: c.lifecycle.DeregisterAgent(
            agent_lifecycle_pb2.DeregisterAgentRequest(agent_id="ghost")
        ),
        id="DeregisterAgent",
    ),
]


@pytest.mark.parametrize("call", UNKNOWN_AGENT_CALLS)
async def test_unknown_agent_is_not_found(
    client: Client, call: Callable[[Client], Awaitable[Any]]
) -> None:
    await client.lifecycle.RegisterAgent(registration("someone-else"))
    error = await refused(call(client), grpc.StatusCode.NOT_FOUND)
    assert resource_of(error) == ("opscore.v1.Agent", "ghost")
    assert [a.agent_id for a in await stored_agents(client)] == ["someone-else"]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda c: c.lifecycle.GetAgent(agent_lifecycle_pb2.GetAgentRequest(agent_id="a b")),
            id="GetAgent",
        ),
        pytest.param(
            lambda c: c.lifecycle.Heartbeat(agent_lifecycle_pb2.HeartbeatRequest(agent_id="")),
            id="Heartbeat",
        ),
        pytest.param(
            lambda c: c.lifecycle.DeregisterAgent(
                agent_lifecycle_pb2.DeregisterAgentRequest(agent_id="x" * 300)
            ),
            id="DeregisterAgent",
        ),
    ],
)
async def test_malformed_agent_id_names_agent_id(
    client: Client, call: Callable[[Client], Awaitable[Any]]
) -> None:
    await invalid(call(client), "agent_id")


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(agent_pb2.AGENT_STATE_OFFLINE, id="offline-as-a-number"),
        pytest.param(agent_pb2.REPORTED_AGENT_STATE_UNSPECIFIED, id="unspecified"),
        pytest.param(99, id="unknown-number"),
        pytest.param(-1, id="negative-number"),
    ],
)
async def test_report_state_refuses_unreportable_state(client: Client, state: int) -> None:
    agent = await client.agent("reporter")
    await agent.report(agent_pb2.REPORTED_AGENT_STATE_BUSY, "working")
    await invalid(
        client.lifecycle.ReportState(
            agent_lifecycle_pb2.ReportStateRequest(agent_id="reporter", state=state, detail="x")
        ),
        "state",
    )
    after = await agent.get()
    assert after.state == agent_pb2.AGENT_STATE_BUSY
    assert after.state_detail == "working"


@pytest.mark.parametrize(
    ("report", "state"),
    [
        (agent_pb2.REPORTED_AGENT_STATE_IDLE, agent_pb2.AGENT_STATE_IDLE),
        (agent_pb2.REPORTED_AGENT_STATE_BUSY, agent_pb2.AGENT_STATE_BUSY),
        (agent_pb2.REPORTED_AGENT_STATE_ERROR, agent_pb2.AGENT_STATE_ERROR),
    ],
)
async def test_report_state_accepts_reportable_state(
    client: Client, report: int, state: int
) -> None:
    agent = await client.agent("reporter")
    reported = await agent.report(report, "detail")
    assert reported.state == state
    assert reported.state_detail == "detail"
    assert (await agent.get()).state == state


async def test_heartbeat_returns_server_time_and_moves_last_seen(client: Client) -> None:
    registered = (await client.lifecycle.RegisterAgent(registration("beater"))).agent
    await asyncio.sleep(0.02)
    response = await client.lifecycle.Heartbeat(
        agent_lifecycle_pb2.HeartbeatRequest(agent_id="beater")
    )
    assert response.HasField("server_time")
    server_time = datetime_of(response.server_time)
    assert abs(server_time - datetime.now(UTC)) < timedelta(seconds=5)
    after = (
        await client.lifecycle.GetAgent(agent_lifecycle_pb2.GetAgentRequest(agent_id="beater"))
    ).agent
    before = datetime_of(registered.last_seen_at)
    assert server_time > before
    assert before < datetime_of(after.last_seen_at) <= server_time
    assert after.registered_at == registered.registered_at


async def test_list_agents_refuses_negative_page_size(client: Client) -> None:
    await invalid(
        client.lifecycle.ListAgents(agent_lifecycle_pb2.ListAgentsRequest(page_size=-1)),
        "page_size",
    )


async def test_list_agents_refuses_unknown_state(client: Client) -> None:
    await invalid(
        client.lifecycle.ListAgents(agent_lifecycle_pb2.ListAgentsRequest(state=99)), "state"
    )


def b64(raw: bytes) -> str:
    """URL-safe base64 of raw bytes, as a forged page token."""
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("a", id="truncated-base64"),
        pytest.param(b64(b"\xff\xfe\xfd\xfc"), id="base64-of-non-utf8"),
    ],
)
async def test_list_agents_refuses_undecodable_page_token(client: Client, token: str) -> None:
    await client.lifecycle.RegisterAgent(registration("listed"))
    await invalid(
        client.lifecycle.ListAgents(agent_lifecycle_pb2.ListAgentsRequest(page_token=token)),
        "page_token",
    )


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("!!!", id="not-base64"),
        pytest.param("%%%%", id="percent-signs"),
        pytest.param(b64(b"not a valid id at all"), id="base64-of-non-id"),
        pytest.param(b64(b"zzzz"), id="base64-past-the-end"),
        pytest.param("é" * 10, id="non-ascii"),
    ],
)
async def test_list_agents_forged_page_token_is_refused_or_sane(client: Client, token: str) -> None:
    """A token the server never issued is refused (naming page_token) or, at worst, read as
    some position in the listing: never a server fault, never an agent that is not registered.
    """
    registered = {"agent-a", "agent-b", "agent-c"}
    for agent_id in sorted(registered):
        await client.lifecycle.RegisterAgent(registration(agent_id))
    error: grpc.aio.AioRpcError | None = None
    response = agent_lifecycle_pb2.ListAgentsResponse()
    try:
        response = await client.lifecycle.ListAgents(
            agent_lifecycle_pb2.ListAgentsRequest(page_token=token)
        )
    except grpc.aio.AioRpcError as caught:
        error = caught
    if error is not None:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert set(bad_request(error)) == {"page_token"}
        assert "page_token" in (error.details() or "")
        return
    listed = [agent.agent_id for agent in response.agents]
    assert set(listed) <= registered
    assert len(listed) == len(set(listed))
    assert response.next_page_token == ""


async def test_list_agents_pages(client: Client) -> None:
    registered = [f"agent-{index}" for index in range(5)]
    for agent_id in registered:
        await client.lifecycle.RegisterAgent(registration(agent_id))
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    for _ in range(10):
        response = await client.lifecycle.ListAgents(
            agent_lifecycle_pb2.ListAgentsRequest(page_size=2, page_token=token)
        )
        sizes.append(len(response.agents))
        seen.extend(agent.agent_id for agent in response.agents)
        token = response.next_page_token
        if not token:
            break
    assert sizes == [2, 2, 1]
    assert sorted(seen) == registered
    assert len(seen) == len(set(seen))


async def test_list_agents_filters_by_state_and_capability(client: Client) -> None:
    await client.agent("idle-1", capabilities=["echo"])
    busy = await client.agent("busy-1", capabilities=["echo", "sum"])
    await busy.report(agent_pb2.REPORTED_AGENT_STATE_BUSY)
    failing = await client.agent("error-1", capabilities=["sum"])
    await failing.report(agent_pb2.REPORTED_AGENT_STATE_ERROR, "disk full")
    await client.agent("offline-1", capabilities=["echo"], connect=False)

    async def listed(state: int = 0, capability: str = "") -> set[str]:
        response = await client.lifecycle.ListAgents(
            agent_lifecycle_pb2.ListAgentsRequest(state=state, capability=capability)
        )
        return {agent.agent_id for agent in response.agents}

    assert await listed() == {"idle-1", "busy-1", "error-1", "offline-1"}
    assert await listed(agent_pb2.AGENT_STATE_IDLE) == {"idle-1"}
    assert await listed(agent_pb2.AGENT_STATE_BUSY) == {"busy-1"}
    assert await listed(agent_pb2.AGENT_STATE_ERROR) == {"error-1"}
    assert await listed(agent_pb2.AGENT_STATE_OFFLINE) == {"offline-1"}
    assert await listed(capability="echo") == {"idle-1", "busy-1", "offline-1"}
    assert await listed(capability="sum") == {"busy-1", "error-1"}
    assert await listed(capability="nobody") == set()
    assert await listed(agent_pb2.AGENT_STATE_IDLE, "sum") == set()
    assert await listed(agent_pb2.AGENT_STATE_OFFLINE, "echo") == {"offline-1"}
    assert await listed(agent_pb2.AGENT_STATE_BUSY, "sum") == {"busy-1"}
