"""The live world the hostile requests are aimed at: agents (a connected worker and idle ones),
definitions, runs and the assignments the worker holds, built before the examples and torn down
after them; and `resolve`, which turns a drawn placeholder into one of those assignments.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

import auth
from google.protobuf.message import Message
from helpers import WAIT, Agent, Client, definition, task
from opscore.v1 import (
    agent_lifecycle_pb2,
    workflow_pb2,
    workflow_service_pb2,
)

from hostile.contract import ACCEPTABLE

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
    worker = await client.agent(
        "worker-1", capabilities=["work"], max_concurrent_tasks=20, connect=False
    )
    # Streamed as the operator: a hostile RegisterAgent of the worker rotates its token, which
    # would end a stream opened with it (as tests/e2e/test_tokens.py checks).
    await worker.connect(auth.bearer(auth.OPERATOR_TOKEN))
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
