"""After the examples, the server must still serve: health answers SERVING, and a normal flow
(register, stream, create, trigger, complete) still ends in a SUCCEEDED run.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import WAIT, Client, definition, task
from opscore.v1 import (
    workflow_pb2,
)

from opscore.server import SERVICE_NAMES


async def assert_serving(channel: grpc.aio.Channel) -> None:
    """Health answers SERVING, for the server and each service."""
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICE_NAMES):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


async def assert_normal_flow(via: grpc.aio.Channel | Client) -> None:
    """Register, stream, create, trigger, complete both tasks of a chain: the run SUCCEEDED and
    the second task saw the first's output. `via` is a channel (for a Client of its own) or a
    Client (a deployment's, whose agents may stream from another replica than its calls go
    to); its agents' streams are closed after."""
    client = via if isinstance(via, Client) else Client(via)
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
