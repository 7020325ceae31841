"""The agent SDK (`opscore.client.Worker`) against a real server over a real channel: results,
retries and non-retryable failures, cancellation reaching a handler, leases kept for a handler
that outlives its timeout, TLS with a registration token or a client certificate, a
reconnection after the server restarts (the attempt held sent again and not run twice), and a
drain on SIGTERM of a worker in a process of its own; and the example agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import auth
import grpc
import pytest
from certs import Authority
from conftest import POSTGRES_URL, ServerFactory, postgres_database, serve
from helpers import WAIT, Client, as_dict, definition, seconds, struct, tasks_of
from opscore.v1 import agent_lifecycle_pb2, agent_pb2, workflow_pb2, workflow_service_pb2
from processes import ServerProcess, clean_environment, free_port
from replicas import CHANNEL_OPTIONS
from secure import tls_channel

from opscore.client import (
    AttemptLost,
    Backoff,
    InvalidArgument,
    NonRetryable,
    OpsCoreError,
    TaskContext,
    Tls,
    Unreachable,
    Worker,
)
from opscore.client._calls import Calls
from opscore.client._channels import Channels
from opscore.domain.clock import SystemClock

FAST = Backoff(initial=0.05, maximum=0.5)
"""Reconnections in tests come back within half a second."""

AGENT_SCRIPT = Path(__file__).resolve().parents[1] / "sdk_agent.py"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent.py"

SUCCEEDED = workflow_pb2.RUN_STATE_SUCCEEDED
FAILED = workflow_pb2.RUN_STATE_FAILED


def spec(
    name: str,
    capability: str,
    *,
    input: dict[str, Any] | None = None,  # noqa: A002 - the field's name
    depends_on: tuple[str, ...] = (),
    timeout: float = 0.0,
    max_attempts: int = 0,
) -> workflow_pb2.TaskSpec:
    """A TaskSpec with a fast retry policy (and a timeout, if given)."""
    task = workflow_pb2.TaskSpec(
        name=name,
        capability=capability,
        input=struct(input),
        depends_on=list(depends_on),
        retry_policy=workflow_pb2.RetryPolicy(
            max_attempts=max_attempts, initial_backoff=seconds(0.05)
        ),
    )
    if timeout:
        task.timeout.CopyFrom(seconds(timeout))
    return task


async def agent_of(client: Client, agent_id: str) -> agent_pb2.Agent | None:
    """The agent as the server sees it; None if it is not registered."""
    try:
        response = await client.lifecycle.GetAgent(
            agent_lifecycle_pb2.GetAgentRequest(agent_id=agent_id), timeout=WAIT
        )
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return response.agent


async def wait_agent(client: Client, agent_id: str, check: Any, timeout: float = WAIT) -> None:
    """Poll the agent until `check(agent or None)` holds."""
    async with asyncio.timeout(timeout):
        while not check(await agent_of(client, agent_id)):
            await asyncio.sleep(0.02)


def connected(agent: agent_pb2.Agent | None) -> bool:
    return agent is not None and agent.connected


@contextlib.asynccontextmanager
async def working(worker: Worker, client: Client) -> AsyncIterator[Worker]:
    """The worker running (until its stream is open), stopped and drained on exit."""
    runner = asyncio.create_task(worker.run(handle_signals=False))
    try:
        await wait_agent(client, worker.agent_id, connected)
        yield worker
    finally:
        worker.stop()
        async with asyncio.timeout(WAIT * 2):
            await runner


def new_worker(port: int, agent_id: str = "worker-1", **options: Any) -> Worker:
    return Worker(
        [f"127.0.0.1:{port}"],
        agent_id=agent_id,
        token=auth.OPERATOR_TOKEN,
        backoff=FAST,
        **options,
    )


def until_cancelled(worker: Worker, name: str) -> tuple[asyncio.Event, list[str]]:
    """A handler for `name` that runs until cancelled: an event set once it started, and the
    `cancel_reason` of each cancellation."""
    started = asyncio.Event()
    reasons: list[str] = []

    @worker.task(name)
    async def handler(ctx: TaskContext, task_input: dict[str, Any]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            reasons.append(ctx.cancel_reason)
            raise

    return started, reasons


async def test_outputs_complete_tasks_within_the_concurrency_bound(
    start_server: ServerFactory, migrated_url: str
) -> None:
    async with serve(start_server, migrated_url) as client:
        assert client.server is not None
        worker = new_worker(client.server.port, max_concurrent_tasks=2, labels={"zone": "a"})
        running = 0
        peak = 0

        @worker.task("echo")
        async def echo(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.1)
            running -= 1
            return {"echo": task_input, "attempt": ctx.attempt, "task": ctx.task_name}

        @worker.task("in-thread")
        def in_thread(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
            return {"main": threading.current_thread() is threading.main_thread()}

        async with working(worker, client):
            seen = await agent_of(client, worker.agent_id)
            assert seen is not None
            assert sorted(seen.capabilities) == ["echo", "in-thread"]
            assert dict(seen.labels) == {"zone": "a"}
            assert seen.max_concurrent_tasks == 2
            echoes = [spec(f"e{i}", "echo", input={"n": i}) for i in range(4)]
            last = spec("sync", "in-thread", depends_on=tuple(t.name for t in echoes))
            run = await client.trigger(definition=definition("fan", *echoes, last))
            done = await client.wait_run(run.run_id, SUCCEEDED)
        tasks = tasks_of(done)
        assert as_dict(tasks["e2"].output) == {"echo": {"n": 2.0}, "attempt": 1.0, "task": "e2"}
        assert as_dict(tasks["sync"].output) == {"main": False}
        assert 1 <= peak <= 2
        assert await agent_of(client, worker.agent_id) is None  # deregistered as it stopped


async def test_an_exception_is_retried_and_a_non_retryable_one_fails_the_task(
    start_server: ServerFactory, migrated_url: str
) -> None:
    async with serve(start_server, migrated_url) as client:
        assert client.server is not None
        # The first address has no server: the worker goes on to the next.
        nobody = f"127.0.0.1:{free_port()}"
        worker = Worker(
            [nobody, f"127.0.0.1:{client.server.port}"],
            agent_id="worker-1",
            token=auth.OPERATOR_TOKEN,
            backoff=FAST,
        )

        @worker.task("flaky")
        async def flaky(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
            if ctx.attempt == 1:
                raise RuntimeError("the first try fails")
            return {"attempt": ctx.attempt}

        @worker.task("refuses")
        def refuses(ctx: TaskContext, task_input: dict[str, Any]) -> None:
            raise NonRetryable("this input can never work")

        async with working(worker, client):
            retried = await client.trigger(
                definition=definition("retried", spec("t", "flaky", max_attempts=3))
            )
            refused = await client.trigger(
                definition=definition("refused", spec("t", "refuses", max_attempts=3))
            )
            retried_run = await client.wait_run(retried.run_id, SUCCEEDED)
            refused_run = await client.wait_run(refused.run_id, FAILED)
        task = tasks_of(retried_run)["t"]
        assert (task.attempt, as_dict(task.output)) == (2, {"attempt": 2.0})
        task = tasks_of(refused_run)["t"]
        assert task.state == workflow_pb2.TASK_STATE_FAILED
        assert (task.attempt, task.error) == (1, "this input can never work")


async def test_a_handler_that_exits_or_cancels_itself_fails_its_attempt(client: Client) -> None:
    """SystemExit (a library calling sys.exit) and a CancelledError of the handler's own fail
    the attempt like any exception; the worker goes on."""
    assert client.server is not None
    worker = new_worker(client.server.port)

    @worker.task("exits")
    def exits(ctx: TaskContext, task_input: dict[str, Any]) -> None:
        sys.exit(3)

    @worker.task("self-cancelled")
    async def self_cancelled(ctx: TaskContext, task_input: dict[str, Any]) -> None:
        waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waited.cancel()
        await waited

    @worker.task("fine")
    async def fine(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True}

    async with working(worker, client):
        runs = {
            name: await client.trigger(definition=definition(name, spec("t", name, max_attempts=1)))
            for name in ("exits", "self-cancelled", "fine")
        }
        errors = {
            name: tasks_of(await client.wait_run(runs[name].run_id, FAILED))["t"].error
            for name in ("exits", "self-cancelled")
        }
        await client.wait_run(runs["fine"].run_id, SUCCEEDED)
    assert errors == {
        "exits": "the handler raised SystemExit: 3",
        "self-cancelled": "the handler raised CancelledError",
    }


async def test_a_cancelled_run_cancels_its_handler(
    start_server: ServerFactory, migrated_url: str
) -> None:
    async with serve(start_server, migrated_url) as client:
        assert client.server is not None
        worker = new_worker(client.server.port)
        started, reasons = until_cancelled(worker, "forever")
        async with working(worker, client):
            run = await client.trigger(definition=definition("cancelled", spec("t", "forever")))
            await asyncio.wait_for(started.wait(), WAIT)
            await client.workflows.CancelWorkflowRun(
                workflow_service_pb2.CancelWorkflowRunRequest(run_id=run.run_id), timeout=WAIT
            )
            async with asyncio.timeout(WAIT):
                while not reasons:
                    await asyncio.sleep(0.01)
        assert reasons == ["run cancelled"]


@pytest.mark.parametrize(
    ("overrides", "ended"),
    [
        ({}, ("UNAUTHENTICATED", "AGENT_TOKEN_ROTATED")),
        ({"operator_token": None}, ("ABORTED", "ABORTED")),
    ],
    ids=["with authentication", "without"],
)
async def test_a_second_worker_with_the_same_agent_id_stops_the_first(
    start_server: ServerFactory,
    migrated_url: str,
    overrides: dict[str, Any],
    ended: tuple[str, str],
) -> None:
    """The newer process wins and the older stops, rather than the two taking the agent from
    each other for ever; the older neither deregisters the agent nor fails its tasks."""
    async with serve(start_server, migrated_url, **overrides) as client:
        assert client.server is not None
        workers = [new_worker(client.server.port) for _ in range(2)]
        done: list[str] = []
        for worker in workers:

            @worker.task("work")
            async def work(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
                done.append(ctx.task_id)
                return {}

        first = asyncio.create_task(workers[0].run(handle_signals=False))
        await wait_agent(client, "worker-1", connected)
        async with working(workers[1], client):
            with pytest.raises(OpsCoreError) as raised:
                async with asyncio.timeout(WAIT):
                    await first
            assert (raised.value.code.name, raised.value.reason) == ended
            run = await client.trigger(definition=definition("after", spec("t", "work")))
            await client.wait_run(run.run_id, SUCCEEDED)
            registered = await agent_of(client, "worker-1")
            assert connected(registered)
        assert len(done) == 1


async def test_a_worker_taken_over_while_it_drains_raises_and_leaves_the_agent_alone(
    client: Client,
) -> None:
    assert client.server is not None
    first = new_worker(client.server.port, drain_timeout=WAIT * 4)
    started, reasons = until_cancelled(first, "work")
    second = new_worker(client.server.port)

    @second.task("work")
    async def work(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
        return {}

    draining = asyncio.create_task(first.run(handle_signals=False))
    await wait_agent(client, "worker-1", connected)
    await client.trigger(definition=definition("held", spec("t", "work")))
    await asyncio.wait_for(started.wait(), WAIT)
    first.stop()  # it drains: its handler would hold it for the whole drain_timeout
    async with working(second, client):
        with pytest.raises(OpsCoreError) as raised:
            async with asyncio.timeout(WAIT):
                await draining
        assert raised.value.reason == "AGENT_TOKEN_ROTATED"
        assert reasons == ["the worker stopped before the task finished"]
        await wait_agent(client, "worker-1", connected)  # not deregistered: the second's


async def test_a_handler_that_outlives_its_timeout_keeps_its_lease(
    start_server: ServerFactory, migrated_url: str
) -> None:
    async with serve(start_server, migrated_url) as client:
        assert client.server is not None
        worker = new_worker(client.server.port)

        @worker.task("long")
        async def long(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
            first = ctx.deadline
            await asyncio.sleep(3)  # past the 2 s timeout: kept by automatic extensions
            return {"moved": ctx.deadline > first}

        @worker.task("asks")
        async def asks(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
            first = ctx.deadline
            try:
                await ctx.extend(10**9)  # past the longest task timeout
            except InvalidArgument as error:
                refused = [violation.field for violation in error.violations]
            deadline = await ctx.extend(60)
            return {
                "by": (deadline - first).total_seconds(),
                "seen": ctx.deadline == deadline,
                "refused": refused,
            }

        async with working(worker, client):
            run = await client.trigger(
                definition=definition(
                    "leases",
                    spec("long", "long", timeout=2, max_attempts=1),
                    spec("asks", "asks", timeout=1, max_attempts=1),
                )
            )
            done = await client.wait_run(run.run_id, SUCCEEDED, timeout=WAIT * 2)
        tasks = tasks_of(done)
        assert (tasks["long"].attempt, as_dict(tasks["long"].output)) == (1, {"moved": True})
        asked = as_dict(tasks["asks"].output)
        assert asked["seen"] is True
        assert asked["by"] > 50
        assert asked["refused"] == ["extend_by"]


async def test_an_unanswered_lease_extension_is_sent_next_to_the_next_address(
    client: Client,
) -> None:
    assert client.server is not None
    served = f"127.0.0.1:{client.server.port}"
    channels = Channels([f"127.0.0.1:{free_port()}", served], None)
    calls = Calls(channels, "worker-1", auth.OPERATOR_TOKEN, FAST, SystemClock())
    try:
        with pytest.raises(Unreachable):
            await calls.extend(("no-such-task", 1), timedelta(seconds=5))
        assert channels.address == served
        with pytest.raises(AttemptLost):  # answered: the attempt is not the agent's
            await calls.extend(("no-such-task", 1), timedelta(seconds=5))
    finally:
        await channels.close()


async def test_a_handler_that_cannot_succeed_fails_its_task_at_once(client: Client) -> None:
    assert client.server is not None
    worker = new_worker(client.server.port)

    @worker.task("listing")
    async def listing(ctx: TaskContext, task_input: dict[str, Any]) -> Any:
        return [1, 2]

    @worker.task("infinite")
    def infinite(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
        return {"ratio": float("inf")}

    @worker.task("deep")
    async def deep(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
        output: dict[str, Any] = {"end": True}
        for _ in range(200):  # a few hundred bytes, nested deeper than protobuf takes
            output = {"a": output}
        return output

    async with working(worker, client):
        runs = {
            capability: await client.trigger(
                definition=definition(capability or "stray", spec("stray", capability))
            )
            for capability in ("listing", "infinite", "deep", "")
        }
        errors = {
            capability: tasks_of(await client.wait_run(run.run_id, FAILED))["stray"].error
            for capability, run in runs.items()
        }
    assert errors["listing"] == "the handler returned list, not a dict"
    assert errors["infinite"].startswith("the server refused the output: ")
    assert errors["deep"].startswith("the output cannot be sent as a JSON object: ")
    assert errors[""] == "no handler for 'stray'"


async def test_a_drain_past_its_timeout_fails_what_it_holds_as_retryable(
    client: Client,
) -> None:
    assert client.server is not None
    worker = new_worker(client.server.port, drain_timeout=0.2, deregister_on_stop=False)
    started, reasons = until_cancelled(worker, "stuck")
    async with working(worker, client):
        run = await client.trigger(definition=definition("stuck", spec("t", "stuck")))
        await asyncio.wait_for(started.wait(), WAIT)
    assert reasons == ["the worker stopped before the task finished"]
    task = tasks_of(await client.run(run.run_id))["t"]
    assert (task.state, task.error) == (workflow_pb2.TASK_STATE_QUEUED, reasons[0])
    agent = await agent_of(client, worker.agent_id)
    assert agent is not None
    assert (agent.state, agent.connected) == (agent_pb2.AGENT_STATE_OFFLINE, False)


@pytest.mark.parametrize("credential", ["registration token", "client certificate"])
async def test_a_worker_over_tls(
    start_server: ServerFactory, sqlite_url: str, tmp_path: Path, credential: str
) -> None:
    authority = Authority.create("Ops-Core test CA")
    served = authority.issue_server().write(tmp_path, "server")
    ca = authority.write_ca(tmp_path, "ca")
    mutual = credential == "client certificate"
    settings: dict[str, Any] = {
        "tls_cert": str(served.cert),
        "tls_key": str(served.key),
        "tls_client_ca": str(ca) if mutual else "",
        "registration_token": auth.REGISTRATION_TOKEN,
    }
    operator = authority.issue_client("operator", ["opscore://operator/alice"])
    agent = authority.issue_client("tls-1", ["opscore://agent/tls-1"]).write(tmp_path, "agent")
    async with (
        start_server(sqlite_url, **settings) as server,
        tls_channel(server.port, authority, operator if mutual else None) as channel,
    ):
        client = Client(channel)
        worker = Worker(
            f"localhost:{server.port}",
            agent_id="tls-1",
            token=None if mutual else auth.REGISTRATION_TOKEN,
            tls=Tls(ca, agent.cert, agent.key) if mutual else Tls(ca),
            backoff=FAST,
        )

        @worker.task("secure")
        async def secure(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
            return {"secure": True}

        async with working(worker, client):
            run = await client.trigger(definition=definition("tls", spec("t", "secure")))
            done = await client.wait_run(run.run_id, SUCCEEDED)
        assert as_dict(tasks_of(done)["t"].output) == {"secure": True}


BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set"),
    ),
]

RESTART_SETTINGS = {"OPSCORE_AGENT_GRACE": "10", "OPSCORE_SHUTDOWN_GRACE": "1"}


@contextlib.asynccontextmanager
async def server_process(backend: str, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    """`opscore serve` as a process on a new database of `backend` (killed on exit)."""
    port = free_port()
    log = tmp_path / "serve.log"
    async with contextlib.AsyncExitStack() as stack:
        if backend == "sqlite":
            server = ServerProcess.on_sqlite(tmp_path / "opscore.db", port, log, **RESTART_SETTINGS)
        else:
            url = await stack.enter_async_context(postgres_database())
            server = ServerProcess.on_url(url, port, log, tmp_path, **RESTART_SETTINGS)
        yield await stack.enter_async_context(server)


async def test_a_server_that_stops_answering_is_left_for_the_next_address(
    client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A frozen server keeps its connections open: the worker leaves it once two heartbeats in
    a row go unanswered, and serves from the next address."""
    caplog.set_level(logging.INFO, logger="opscore.client")
    assert client.server is not None
    (tmp_path / "frozen").mkdir()
    async with server_process("sqlite", tmp_path / "frozen") as frozen:
        worker = Worker(
            [f"127.0.0.1:{frozen.port}", f"127.0.0.1:{client.server.port}"],
            agent_id="worker-1",
            token=auth.OPERATOR_TOKEN,
            backoff=FAST,
            heartbeat_interval=0.3,
        )

        @worker.task("work")
        async def work(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
            return {"on": "the second"}

        runner = asyncio.create_task(worker.run(handle_signals=False))
        try:
            async with asyncio.timeout(WAIT):
                while not any(r.message == "task stream open" for r in caplog.records):
                    await asyncio.sleep(0.01)
            frozen.process.send_signal(signal.SIGSTOP)
            try:
                await wait_agent(client, "worker-1", connected)
                run = await client.trigger(definition=definition("after", spec("t", "work")))
                await client.wait_run(run.run_id, SUCCEEDED)
            finally:
                frozen.process.send_signal(signal.SIGCONT)
        finally:
            worker.stop()
            async with asyncio.timeout(WAIT * 2):
                await runner
    left = [r for r in caplog.records if r.message.startswith("server not answering")]
    assert [r.address for r in left] == [f"127.0.0.1:{frozen.port}"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_after_a_server_restart_the_held_attempt_is_not_run_twice(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.client")
    async with (
        server_process(backend, tmp_path) as first,
        auth.channel(f"127.0.0.1:{first.port}", options=CHANNEL_OPTIONS) as channel,
        contextlib.AsyncExitStack() as stack,
    ):
        # The same server again, on its port and database; stopped after the worker.
        second = ServerProcess(
            first.args, port=first.port, log=first.log, cwd=first.cwd, environment=first.environment
        )
        stack.push_async_callback(second.close)
        client = Client(channel)
        worker = new_worker(first.port)
        runs: list[tuple[int, bool]] = []
        release = asyncio.Event()

        @worker.task("held")
        async def held(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
            runs.append((ctx.attempt, ctx.redelivered))
            await release.wait()
            return {"done": True}

        async with working(worker, client):
            run = await client.trigger(definition=definition("restart", spec("t", "held")))
            async with asyncio.timeout(WAIT):
                while not runs:
                    await asyncio.sleep(0.01)
            first.kill()
            await first.wait()
            await second.start()
            async with asyncio.timeout(WAIT * 2):
                while not any(
                    record.message == "attempt sent again, already running"
                    for record in caplog.records
                ):
                    await asyncio.sleep(0.02)
            release.set()
            done = await client.wait_run(run.run_id, SUCCEEDED)
        assert tasks_of(done)["t"].attempt == 1
        assert runs == [(1, False)]


async def test_sigterm_drains_the_worker_process(
    start_server: ServerFactory, migrated_url: str, tmp_path: Path
) -> None:
    async with serve(start_server, migrated_url) as client:
        assert client.server is not None
        marker = tmp_path / "started"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(AGENT_SCRIPT),
            f"127.0.0.1:{client.server.port}",
            "drained",
            auth.OPERATOR_TOKEN,
            str(marker),
            env=clean_environment(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await wait_agent(client, "drained", connected, timeout=WAIT * 3)
            held = await client.trigger(
                definition=definition("slow", spec("t", "slow", input={"seconds": 1.5}))
            )
            async with asyncio.timeout(WAIT):
                while not marker.exists():
                    await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            await wait_agent(
                client, "drained", lambda a: a is not None and a.state == agent_pb2.AGENT_STATE_BUSY
            )
            later = await client.trigger(
                definition=definition("later", spec("t", "slow", input={"seconds": 0}))
            )
            async with asyncio.timeout(WAIT * 2):
                _, stderr = await process.communicate()
            assert process.returncode == 0, stderr.decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.communicate()
        finished = tasks_of(await client.wait_run(held.run_id, SUCCEEDED))["t"]
        assert as_dict(finished.output) == {"slept": 1.5}
        assert await agent_of(client, "drained") is None
        waiting = tasks_of(await client.run(later.run_id))["t"]
        assert (waiting.state, waiting.attempt) == (workflow_pb2.TASK_STATE_QUEUED, 0)
        assert marker.read_text() == finished.task_id


@contextlib.asynccontextmanager
async def python_process(
    *args: str, environment: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python script run as a process (its standard error kept), killed on exit if alive."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=clean_environment() if environment is None else environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def drained(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the process: it drains and exits 0 (bounded)."""
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(WAIT * 2):
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()


async def test_sigterm_drains_every_worker_of_a_process(client: Client, tmp_path: Path) -> None:
    """Two Workers on one event loop, each handling signals: one SIGTERM drains both."""
    assert client.server is not None
    address = f"127.0.0.1:{client.server.port}"
    twins = [str(AGENT_SCRIPT), address, "twin-a,twin-b", auth.OPERATOR_TOKEN, str(tmp_path / "m")]
    async with python_process(*twins) as process:
        for agent_id in ("twin-a", "twin-b"):
            await wait_agent(client, agent_id, connected, timeout=WAIT * 3)
        await drained(process)
    assert [await agent_of(client, each) for each in ("twin-a", "twin-b")] == [None, None]


async def test_the_example_agent_runs_the_walk_through(client: Client) -> None:
    assert client.server is not None
    environment = clean_environment(
        OPSCORE_ADDRESS=f"127.0.0.1:{client.server.port}",
        OPSCORE_AGENT_ID="example",
        OPSCORE_TOKEN=auth.OPERATOR_TOKEN,
    )
    async with python_process(str(EXAMPLE), environment=environment) as process:
        await wait_agent(client, "example", connected, timeout=WAIT * 3)
        run = await client.trigger(
            definition=definition(
                "summarize-url",
                spec("fetch", "summarize", input={"url": "https://example.com"}),
                spec("summarize", "summarize", input={"max_words": 2}, depends_on=("fetch",)),
            ),
            input={"text": "Example Domain."},
        )
        done = await client.wait_run(run.run_id, SUCCEEDED)
        await drained(process)
    tasks = tasks_of(done)
    assert as_dict(tasks["fetch"].output) == {
        "summary": "Example Domain. https://example.com",
        "words": 3.0,
    }
    assert as_dict(tasks["summarize"].output)["summary"] == "Example Domain."
