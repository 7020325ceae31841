"""The Node.js agent of examples/node-agent, built from protos/ as its README says (`npm ci`,
`npm run generate`, `npm run build`) and run with `node` against a real server with
authentication on: it registers with a registration token (or, under mutual TLS, its
certificate), then acts with its own token.

Skipped where `node` or `npm` is missing; `.ci/run` installs both, so CI runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import auth
import grpc
import pytest
from certs import Authority
from conftest import ServerFactory
from helpers import (
    WAIT,
    Agent,
    Client,
    as_dict,
    connect,
    definition,
    seconds,
    struct,
    task,
    tasks_of,
)
from opscore.v1 import agent_lifecycle_pb2, agent_pb2, workflow_pb2, workflow_service_pb2
from processes import ROOT, clean_environment, free_port
from secure import tls_channel

from opscore.server import OpsCoreServer

NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None, reason="node and npm are not installed"
)

EXAMPLE = ROOT / "examples" / "node-agent"

BUILD_WAIT = 300.0
"""Seconds each build step may take: `npm ci` downloads the packages on a cold cache."""

AGENT_ID = "node-agent-1"
CAPABILITY = "echo"


@pytest.fixture(scope="module")
def agent_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent, generated and compiled from the committed sources, then put outside the
    repository (as a user deploys it: it must need nothing of the repository there); its entry
    point."""
    assert NPM is not None
    # No package needs its install scripts (protobufjs's only warns about how dependents pin it),
    # and the lock file names every tarball: a warm cache serves it all without a request.
    install = ["ci", "--no-audit", "--no-fund", "--prefer-offline", "--ignore-scripts"]
    for step in (install, ["run", "generate"], ["run", "build"]):
        completed = subprocess.run(
            [NPM, *step],
            cwd=EXAMPLE,
            env=clean_environment(),
            capture_output=True,
            text=True,
            timeout=BUILD_WAIT,
            check=False,
        )
        assert completed.returncode == 0, (
            f"npm {' '.join(step)}:\n{completed.stdout}{completed.stderr}"
        )
    deployed = tmp_path_factory.mktemp("node-agent")
    for tree in ("dist", "proto"):
        shutil.copytree(EXAMPLE / tree, deployed / tree)
    shutil.copy(EXAMPLE / "package.json", deployed)
    (deployed / "node_modules").symlink_to(EXAMPLE / "node_modules")
    return deployed / "dist" / "main.js"


class NodeAgent:
    """The agent as a process: its JSON log (standard error) goes to a file the test reads."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log

    def records(self) -> list[dict[str, Any]]:
        """The agent's log records so far (a line still being written is left for later)."""
        lines = self.log.read_text().splitlines(keepends=True)
        return [json.loads(line) for line in lines if line.endswith("\n")]

    async def logged(self, message: str, **fields: Any) -> dict[str, Any]:
        """Wait (bounded) for a record with `message` and `fields`; the record."""
        async with asyncio.timeout(WAIT):
            while True:
                # Whether it had exited before its log is read: then the log is all it wrote.
                exited = self.process.returncode is not None
                for record in self.records():
                    if record["message"] == message and fields.items() <= record.items():
                        return record
                assert not exited, f"the agent exited:\n{self.log_text()}"
                await asyncio.sleep(0.02)

    def log_text(self) -> str:
        return self.log.read_text()

    async def exit_status(self) -> int:
        """Wait (bounded) for the agent to exit; its status."""
        return await asyncio.wait_for(self.process.wait(), WAIT)


@asynccontextmanager
async def node_agent(
    script: Path,
    log: Path,
    *addresses: str,
    token: str | None = auth.REGISTRATION_TOKEN,
    settings: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> AsyncIterator[NodeAgent]:
    """The agent running against `addresses`, registering with `token` (none: no
    OPSCORE_REGISTRATION_TOKEN), with more environment `settings` and command-line `args`;
    killed at the end if it is still alive."""
    assert NODE is not None
    environment = clean_environment(
        OPSCORE_ADDRESSES=",".join(addresses),
        OPSCORE_AGENT_ID=AGENT_ID,
        OPSCORE_CAPABILITIES=CAPABILITY,
        **({} if token is None else {"OPSCORE_REGISTRATION_TOKEN": token}),
        **(settings or {}),
    )
    with log.open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            NODE,
            str(script),
            *args,
            env=environment,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        yield NodeAgent(process, log)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()


@asynccontextmanager
async def server_with_registration(
    start_server: ServerFactory, url: str, port: int = 0
) -> AsyncIterator[tuple[OpsCoreServer, Client]]:
    """A server with authentication on and a registration token, and an operator's client."""
    async with (
        start_server(
            url, registration_token=auth.REGISTRATION_TOKEN, listen=f"127.0.0.1:{port}"
        ) as server,
        connect(server.port, server) as client,
    ):
        yield server, client


@pytest.fixture
def database(migrated_sqlite: Path, tmp_path: Path) -> str:
    """A migrated SQLite database of this test's own, as a URL."""
    copy = tmp_path / "opscore.db"
    shutil.copyfile(migrated_sqlite, copy)
    return f"sqlite:///{copy}"


async def connected(client: Client) -> agent_pb2.Agent:
    """The Node agent as the server sees it, once it has registered and opened its stream."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                seen = await Agent(client, AGENT_ID).get()
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                if seen.connected:
                    return seen
            await asyncio.sleep(0.02)


@pytest.fixture
async def working(
    agent_script: Path, start_server: ServerFactory, database: str, tmp_path: Path
) -> AsyncIterator[tuple[Client, NodeAgent]]:
    """A server with a registration token, an operator's client, and the agent on its stream."""
    async with (
        server_with_registration(start_server, database) as (server, client),
        node_agent(agent_script, tmp_path / "agent.log", f"127.0.0.1:{server.port}") as agent,
    ):
        await connected(client)
        yield client, agent


def echo_task(name: str, *depends_on: str, **inputs: Any) -> workflow_pb2.TaskSpec:
    return task(name, capability=CAPABILITY, depends_on=depends_on, input=inputs)


async def wait_task(
    client: Client, run_id: str, name: str, holds: Callable[[workflow_pb2.TaskRun], bool]
) -> workflow_pb2.TaskRun:
    """Poll a run until its task `name` satisfies `holds`."""
    async with asyncio.timeout(WAIT):
        while True:
            found = tasks_of(await client.run(run_id))[name]
            if holds(found):
                return found
            await asyncio.sleep(0.02)


def assigned(found: workflow_pb2.TaskRun) -> bool:
    return found.state == workflow_pb2.TASK_STATE_ASSIGNED


async def test_runs_a_chain_after_an_unreachable_address(
    agent_script: Path, start_server: ServerFactory, database: str, tmp_path: Path
) -> None:
    async with (
        server_with_registration(start_server, database) as (server, client),
        node_agent(
            agent_script,
            tmp_path / "agent.log",
            f"127.0.0.1:{free_port()}",
            f"127.0.0.1:{server.port}",
        ) as agent,
    ):
        seen = await connected(client)
        assert list(seen.capabilities) == [CAPABILITY]
        assert seen.version == json.loads((EXAMPLE / "package.json").read_text())["version"]
        created = await client.create(
            definition(
                "node-chain",
                echo_task("fetch", source="https://example.com"),
                echo_task("summarize", "fetch"),
                echo_task("publish", "summarize"),
            )
        )
        run = await client.trigger(definition_id=created.definition_id, input={"lang": "en"})
        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED, timeout=10.0)

        outputs = {name: as_dict(found.output) for name, found in tasks_of(done).items()}
        assert {found.agent_id for found in done.tasks} == {AGENT_ID}
        for name, dependencies in (
            ("fetch", []),
            ("summarize", ["fetch"]),
            ("publish", ["summarize"]),
        ):
            assert outputs[name]["agent_id"] == AGENT_ID
            assert outputs[name]["runtime"].startswith("node v")
            assert outputs[name]["task_name"] == name
            assert outputs[name]["dependencies"] == dependencies
            assert outputs[name]["input"]["lang"] == "en"
        assert outputs["fetch"]["input"]["source"] == "https://example.com"
        # The unreachable address was tried, and passed over for the next.
        await agent.logged("registration failed", code="UNAVAILABLE")


async def test_stops_a_cancelled_attempt(working: tuple[Client, NodeAgent]) -> None:
    client, agent = working
    slow = await client.trigger(definition=definition("slow", echo_task("wait", work_ms=60_000)))
    held = await wait_task(client, slow.run_id, "wait", assigned)
    await agent.logged("task assigned", task_id=held.task_id)
    await client.workflows.CancelWorkflowRun(
        workflow_service_pb2.CancelWorkflowRunRequest(run_id=slow.run_id)
    )
    await agent.logged("task cancelled", task_id=held.task_id, in_hand=True)

    # The agent is free for the next task, and never reported the cancelled one.
    quick = await client.trigger(definition=definition("quick", echo_task("go")))
    await client.wait_run(quick.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    reports = [
        record
        for record in agent.records()
        if record["message"] in ("task completed", "task failed")
    ]
    assert held.task_id not in {record["task_id"] for record in reports}, reports


async def test_reconnects_when_the_server_restarts(
    agent_script: Path, start_server: ServerFactory, database: str, tmp_path: Path
) -> None:
    port = free_port()
    async with node_agent(agent_script, tmp_path / "agent.log", f"127.0.0.1:{port}") as agent:
        async with server_with_registration(start_server, database, port) as (_, client):
            await connected(client)
        await agent.logged("task stream ended", code="UNAVAILABLE")

        async with server_with_registration(start_server, database, port) as (_, client):
            await connected(client)
            run = await client.trigger(definition=definition("after", echo_task("again")))
            done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
            assert tasks_of(done)["again"].agent_id == AGENT_ID
        # Its token outlived the restart: it registered once.
        assert [r["message"] for r in agent.records()].count("registered") == 1


async def test_sigterm_finishes_the_task_in_hand_and_exits_0(
    working: tuple[Client, NodeAgent],
) -> None:
    client, agent = working
    run = await client.trigger(definition=definition("last", echo_task("last", work_ms=500)))
    await wait_task(client, run.run_id, "last", assigned)
    agent.process.send_signal(signal.SIGTERM)

    assert await agent.exit_status() == 0, agent.log_text()
    assert (await client.run(run.run_id)).state == workflow_pb2.RUN_STATE_SUCCEEDED
    await Agent(client, AGENT_ID).wait_until(lambda seen: not seen.connected)


async def test_exits_0_when_deregistered(working: tuple[Client, NodeAgent]) -> None:
    client, agent = working
    await client.lifecycle.DeregisterAgent(
        agent_lifecycle_pb2.DeregisterAgentRequest(agent_id=AGENT_ID)
    )
    assert await agent.exit_status() == 0, agent.log_text()
    await agent.logged("deregistered by the server")


async def test_exits_1_when_another_registration_takes_its_id(
    working: tuple[Client, NodeAgent],
) -> None:
    """Registering back would revoke the other's token in turn: the two would fight for ever."""
    client, agent = working
    await client.lifecycle.RegisterAgent(
        agent_lifecycle_pb2.RegisterAgentRequest(agent_id=AGENT_ID, capabilities=[CAPABILITY])
    )
    assert await agent.exit_status() == 1, agent.log_text()
    await agent.logged("another registration of this agent revoked its token")
    assert [r["message"] for r in agent.records()].count("registered") == 1


@pytest.mark.parametrize("credential", ["registration token", "client certificate"])
async def test_runs_tasks_over_tls(
    agent_script: Path,
    start_server: ServerFactory,
    database: str,
    tmp_path: Path,
    credential: str,
) -> None:
    """Over TLS that trusts the test's CA alone; under mutual TLS the agent registers with no
    token, its certificate naming it, and the operator's client presents one too."""
    authority = Authority.create("Ops-Core test CA")
    served = authority.issue_server().write(tmp_path, "server")
    ca = authority.write_ca(tmp_path, "ca")
    mutual = credential == "client certificate"
    settings = {"OPSCORE_TLS_CA": str(ca)}
    if mutual:
        issued = authority.issue_client(AGENT_ID, [f"opscore://agent/{AGENT_ID}"])
        files = issued.write(tmp_path, "agent")
        settings |= {
            "OPSCORE_TLS_CLIENT_CERT": str(files.cert),
            "OPSCORE_TLS_CLIENT_KEY": str(files.key),
        }
    operator = authority.issue_client("operator", ["opscore://operator/alice"])
    async with (
        start_server(
            database,
            tls_cert=str(served.cert),
            tls_key=str(served.key),
            tls_client_ca=str(ca) if mutual else "",
            registration_token=auth.REGISTRATION_TOKEN,
        ) as server,
        tls_channel(server.port, authority, operator if mutual else None) as channel,
        node_agent(
            agent_script,
            tmp_path / "agent.log",
            f"127.0.0.1:{server.port}",
            token=None if mutual else auth.REGISTRATION_TOKEN,
            settings=settings,
        ) as agent,
    ):
        client = Client(channel)
        await connected(client)
        run = await client.trigger(definition=definition("tls", echo_task("secure")))
        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        assert as_dict(tasks_of(done)["secure"].output)["agent_id"] == AGENT_ID
        await agent.logged("starting", tls=True, client_certificate=mutual)


def leased_task(name: str, *, timeout: float, **inputs: Any) -> workflow_pb2.TaskSpec:
    """A task of the agent's capability with a lease of `timeout` seconds and one attempt."""
    spec = echo_task(name, **inputs)
    spec.timeout.CopyFrom(seconds(timeout))
    spec.retry_policy.CopyFrom(workflow_pb2.RetryPolicy(max_attempts=1))
    return spec


async def test_work_that_outlives_its_timeout_keeps_its_lease(
    working: tuple[Client, NodeAgent],
) -> None:
    client, agent = working
    run = await client.trigger(
        definition=definition("long", leased_task("long", timeout=1, work_ms=3_000))
    )
    held = await wait_task(client, run.run_id, "long", assigned)
    first = held.deadline.ToDatetime()
    # The lease moves while the work runs: extended, not merely not yet expired.
    await wait_task(client, run.run_id, "long", lambda found: found.deadline.ToDatetime() > first)
    done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    found = tasks_of(done)["long"]
    assert found.attempt == 1
    assert as_dict(found.output)["input"]["work_ms"] == 3_000
    assert not [r for r in agent.records() if r["message"].startswith("lease extension")]


async def test_an_attempt_the_server_no_longer_extends_is_stopped_unreported(
    working: tuple[Client, NodeAgent],
) -> None:
    """The attempt's result is recorded behind the agent's back (an operator may act as any
    agent): its next extension is refused as FAILED_PRECONDITION, which stops the work."""
    client, agent = working
    run = await client.trigger(
        definition=definition("taken", leased_task("taken", timeout=1, work_ms=60_000))
    )
    held = await wait_task(client, run.run_id, "taken", assigned)
    await client.workflows.CompleteTask(
        workflow_service_pb2.CompleteTaskRequest(
            task_id=held.task_id,
            agent_id=AGENT_ID,
            attempt=held.attempt,
            output=struct({"by": "operator"}),
        )
    )
    lost = await agent.logged("attempt lost", task_id=held.task_id)
    assert lost["reason"].startswith("FAILED_PRECONDITION"), lost

    # The work stopped: the agent, stopping, has no task in hand to finish.
    agent.process.send_signal(signal.SIGTERM)
    assert await agent.exit_status() == 0, agent.log_text()
    messages = [record["message"] for record in agent.records()]
    assert "finishing the tasks in hand" not in messages, agent.log_text()
    about_it = [
        record["message"]
        for record in agent.records()
        if record["message"].startswith("task ") and record.get("task_id") == held.task_id
    ]
    assert about_it == ["task assigned"], agent.log_text()
    done = await client.run(run.run_id)
    assert as_dict(tasks_of(done)["taken"].output) == {"by": "operator"}


@pytest.mark.parametrize(
    ("args", "settings", "named"),
    [
        (("--tls-client-cert", "{ca}"), {}, "--tls-client-cert"),
        ((), {"OPSCORE_TLS_CLIENT_KEY": "{ca}"}, "--tls-client-key"),
        (("--tls-ca", "{missing}"), {}, "--tls-ca"),
        ((), {"OPSCORE_TLS_CA": "{junk}"}, "--tls-ca"),
        (("--tls-client-cert", "{junk}", "--tls-client-key", "{junk}"), {}, "--tls-client-cert"),
    ],
    ids=["cert-without-key", "key-without-cert", "unreadable-ca", "not-a-ca", "not-a-cert"],
)
async def test_a_bad_tls_setting_exits_2(
    agent_script: Path,
    tmp_path: Path,
    args: tuple[str, ...],
    settings: dict[str, str],
    named: str,
) -> None:
    files = {
        "ca": str(Authority.create("Ops-Core test CA").write_ca(tmp_path, "ca")),
        "missing": str(tmp_path / "missing.crt"),
        "junk": str(tmp_path / "junk.pem"),
    }
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    async with node_agent(
        agent_script,
        tmp_path / "agent.log",
        f"127.0.0.1:{free_port()}",
        settings={name: value.format(**files) for name, value in settings.items()},
        args=tuple(arg.format(**files) for arg in args),
    ) as agent:
        assert await agent.exit_status() == 2, agent.log_text()
    said = agent.log_text().splitlines()[0]
    assert said.startswith(named), said
