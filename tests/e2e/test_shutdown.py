"""Shutdown: SIGTERM drains the server. Health turns NOT_SERVING, new task streams are refused and
open ones end with UNAVAILABLE, in-flight calls finish and their commits are kept, and the
process exits with status 0 within its shutdown grace.

The first test runs `opscore serve` as a separate process (as operators run it: a
`ServerProcess` of tests/processes.py) and restarts it on the same database to see what the
drained one committed; the second drives `stop()` of an in-process server to look at the drain
from inside.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from conftest import ServerFactory
from grpc_health.v1 import health_pb2
from helpers import Agent, Client, as_dict, complete_request, connect, definition, struct, task
from opscore.v1 import workflow_pb2, workflow_service_pb2
from processes import ServerProcess, free_port, health_status

SHUTDOWN_GRACE = 2.0
"""The drained server's shutdown grace (OPSCORE_SHUTDOWN_GRACE), in seconds."""

EXIT_SLACK = 3.0
"""Seconds beyond the grace a draining server may take to be gone."""

CALL_TIMEOUT = 5.0
"""Deadline of each unary call the test makes."""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
"""How a call racing the drain may fail: UNAVAILABLE (refused by the server, or no server to
connect to), or CANCELLED (gRPC's own answer to a call that had reached the process but no
handler yet when the server stopped taking calls: nothing of it ran)."""


async def poll_health(port: int, start: asyncio.Event, seen: list[int | None]) -> None:
    """From `start` on, ask for the server's health every few milliseconds until nothing
    answers, noting each answer (None for no answer) in `seen`.
    """
    await start.wait()
    while True:
        status = await health_status(port)
        seen.append(status)
        if status is None:
            return
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class Outcome:
    """One call made around the SIGTERM: what it asked, how it ended, and what it returned."""

    kind: str
    """"complete" or "trigger"."""
    key: str
    """The task_id of a completion, the request_id of a trigger."""
    code: grpc.StatusCode
    after_sigterm: bool
    """Whether the call returned after the SIGTERM was sent."""
    result: Any = None
    """A completion's (agent_id, attempt, output); a trigger's WorkflowRun, if OK."""


@dataclass
class Caller:
    """Makes CompleteTask and TriggerWorkflow calls and notes each one's outcome."""

    client: Client
    definition_id: str
    outcomes: list[Outcome] = field(default_factory=list)
    sigterm_sent: asyncio.Event = field(default_factory=asyncio.Event)

    async def complete(self, agent: Agent, assignment: workflow_pb2.TaskAssignment) -> None:
        output = {"by": agent.agent_id, "task": assignment.task_id, "attempt": assignment.attempt}
        try:
            await self.client.workflows.CompleteTask(
                complete_request(assignment, agent.agent_id, output=output), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
        else:
            code = grpc.StatusCode.OK
        result = (agent.agent_id, assignment.attempt, output)
        self.outcomes.append(
            Outcome("complete", assignment.task_id, code, self.sigterm_sent.is_set(), result)
        )

    async def trigger(self, number: int) -> None:
        request_id = f"drain-trigger-{number}"
        run: workflow_pb2.WorkflowRun | None = None
        try:
            response = await self.client.workflows.TriggerWorkflow(
                workflow_service_pb2.TriggerWorkflowRequest(
                    definition_id=self.definition_id,
                    request_id=request_id,
                    input=struct({"number": number}),
                ),
                timeout=CALL_TIMEOUT,
            )
            run = response.run
        except grpc.aio.AioRpcError as error:
            code = error.code()
        else:
            code = grpc.StatusCode.OK
        self.outcomes.append(Outcome("trigger", request_id, code, self.sigterm_sent.is_set(), run))


async def test_sigterm_drains_and_keeps_every_acknowledged_commit(tmp_path: Path) -> None:
    database = tmp_path / "drain.db"
    log = tmp_path / "server.log"
    port = free_port()
    slots = 8
    health_seen: list[int | None] = []

    async with (
        ServerProcess.on_sqlite(
            database,
            port,
            log,
            OPSCORE_LOG_FORMAT="json",
            OPSCORE_SHUTDOWN_GRACE=str(SHUTDOWN_GRACE),
        ) as server,
        connect(port) as client,
    ):
        agents = [await client.agent(f"drain-{i}", max_concurrent_tasks=slots) for i in range(3)]
        batch = await client.create(definition("batch", *(task(f"t{i:02}") for i in range(40))))
        single = await client.create(definition("single", task("only")))
        first = await client.trigger(definition_id=batch.definition_id)
        held = [(agent, await agent.next_assignment()) for agent in agents for _ in range(slots)]
        assert {a.run_id for _, a in held} == {first.run_id}
        caller = Caller(client, single.definition_id)

        # Before the signal: calls that must all succeed.
        for agent, assignment in held[:3]:
            await caller.complete(agent, assignment)
        for number in range(3):
            await caller.trigger(number)
        assert {o.code for o in caller.outcomes} == {grpc.StatusCode.OK}, caller.outcomes

        # Then completions and triggers every few milliseconds, SIGTERM going out in
        # the middle of them, while several are in flight.
        watcher = asyncio.create_task(poll_health(port, caller.sigterm_sent, health_seen))
        calls: list[asyncio.Task[None]] = []
        burst = list(range(3, len(held)))
        for step, index in enumerate(burst):
            calls.append(asyncio.create_task(caller.complete(*held[index])))
            calls.append(asyncio.create_task(caller.trigger(index)))
            if step == len(burst) // 3:
                sigterm_at = time.monotonic()
                server.terminate()
                caller.sigterm_sent.set()
            await asyncio.sleep(0.003)

        # Health: SERVING answers may come while the signal is on its way; once the
        # server answers otherwise, it is NOT_SERVING until it answers no more.
        await asyncio.wait_for(watcher, SHUTDOWN_GRACE + EXIT_SLACK)
        turned = next(i for i, status in enumerate(health_seen) if status != SERVING)
        assert set(health_seen[turned:]) <= {NOT_SERVING, None}, health_seen

        # Every open task stream ends with UNAVAILABLE.
        for agent in agents:
            code = await agent.wait_stream_ended(SHUTDOWN_GRACE + EXIT_SLACK)
            assert code == grpc.StatusCode.UNAVAILABLE, (agent.agent_id, code)

        # The process exits with status 0 within the grace plus a little.
        left = SHUTDOWN_GRACE + EXIT_SLACK - (time.monotonic() - sigterm_at)
        await server.wait(max(left, 0.1))
        exited_after = time.monotonic() - sigterm_at
        assert server.returncode == 0, server.log_text()
        await asyncio.wait_for(asyncio.gather(*calls), CALL_TIMEOUT + 1)

    outcomes = caller.outcomes
    acknowledged = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    refused = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert len(outcomes) == 3 + 3 + 2 * len(burst)
    assert {o.code for o in refused} <= REFUSED, refused
    # Nothing fails before the signal.
    assert all(o.after_sigterm for o in refused), refused
    print(
        f"\ndrain: exited {exited_after:.2f} s after SIGTERM; health after it {health_seen}; "
        f"{len(acknowledged)} calls OK ({sum(o.after_sigterm for o in acknowledged)} returned "
        f"after SIGTERM), refused {sorted(o.code.name for o in refused)}"
    )

    # Restarted on the same file, the server shows every acknowledged commit.
    second_port = free_port()
    async with (
        ServerProcess.on_sqlite(database, second_port, log, OPSCORE_LOG_FORMAT="json"),
        connect(second_port) as client,
    ):
        tasks = {t.task_id: t for t in (await client.run(first.run_id)).tasks}
        for outcome in acknowledged:
            if outcome.kind == "trigger":
                started: workflow_pb2.WorkflowRun = outcome.result
                stored = await client.run(started.run_id)
                assert stored.definition_id == single.definition_id
                assert as_dict(stored.input) == as_dict(started.input)
                assert stored.created_at == started.created_at
                assert [t.task_id for t in stored.tasks] == [t.task_id for t in started.tasks]
                # The same request again returns the run the acknowledged call created.
                again = await client.trigger(
                    definition_id=single.definition_id,
                    request_id=outcome.key,
                    input=as_dict(started.input),
                )
                assert again.run_id == started.run_id
            else:
                agent_id, attempt, output = outcome.result
                stored_task = tasks[outcome.key]
                assert stored_task.state == workflow_pb2.TASK_STATE_SUCCEEDED, stored_task
                assert (stored_task.agent_id, stored_task.attempt) == (agent_id, attempt)
                assert as_dict(stored_task.output) == output


async def test_stream_tasks_is_refused_once_stop_begins(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    grace = 3.0
    async with (
        start_server(sqlite_url, shutdown_grace=grace) as server,
        connect(server.port) as client,
    ):
        connected = await client.agent("connected")
        racers = 8
        for number in range(racers + 3):
            await client.agent(f"late-{number}", connect=False)
        ended: dict[str, tuple[grpc.StatusCode, float, list[Any]]] = {}
        began = time.monotonic()

        async def open_stream(agent_id: str) -> None:
            """Open a task stream; note how it ended, when, and what came on it."""
            call = client.workflows.StreamTasks(
                workflow_service_pb2.StreamTasksRequest(agent_id=agent_id)
            )
            events: list[Any] = []
            try:
                async with asyncio.timeout(grace + EXIT_SLACK):
                    async for event in call:
                        events.append(event)
            except grpc.aio.AioRpcError as error:
                code = error.code()
            else:
                code = grpc.StatusCode.OK
            ended[agent_id] = (code, time.monotonic() - began, events)

        # Streams opened as the stop begins, a millisecond apart (half before it, half
        # after): some reach their handler before the drain, some during it, some not at
        # all. Each must end at once, carrying nothing: none may stay open (and hold the
        # drain) until the grace.
        began = time.monotonic()
        racing: list[asyncio.Task[None]] = []
        for number in range(racers):
            if number == racers // 2:
                stopping = asyncio.create_task(server.stop())
            racing.append(asyncio.create_task(open_stream(f"late-{number}")))
            await asyncio.sleep(0.001)

        # The stream open before the stop ends with UNAVAILABLE.
        assert await connected.wait_stream_ended() == grpc.StatusCode.UNAVAILABLE

        # Now the drain is under way: a new stream is refused with UNAVAILABLE.
        await open_stream(f"late-{racers}")
        await open_stream("connected")
        await asyncio.sleep(0.2)
        await open_stream(f"late-{racers + 1}")
        for agent_id in (f"late-{racers}", "connected", f"late-{racers + 1}"):
            code, _, events = ended[agent_id]
            assert code == grpc.StatusCode.UNAVAILABLE, (agent_id, code)
            assert events == [], agent_id

        await asyncio.wait_for(asyncio.gather(*racing), grace + EXIT_SLACK + 1)
        for number in range(racers):
            code, after, events = ended[f"late-{number}"]
            assert code in REFUSED, (number, code)
            assert events == [], number
            assert after < 1.0, f"late-{number} ended {after:.2f} s after the stop began"
        await asyncio.wait_for(stopping, grace + EXIT_SLACK)
