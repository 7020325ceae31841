"""The walk-through of the README, as a test: register, stream, define, trigger, complete."""

from __future__ import annotations

from helpers import Client, definition, task

from opscore.v1 import workflow_pb2


async def test_single_task_run_succeeds(client: Client) -> None:
    agent = await client.agent("worker-1", capabilities=["echo"])
    created = await client.create(definition("hello", task("greet", capability="echo")))
    run = await client.trigger(definition_id=created.definition_id, input={"who": "world"})
    assignment = await agent.next_assignment()
    assert assignment.task_name == "greet"
    assert assignment.attempt == 1
    await agent.complete(assignment, {"greeting": "hello world"})
    done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    assert done.tasks[0].state == workflow_pb2.TASK_STATE_SUCCEEDED
