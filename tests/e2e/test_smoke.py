"""The walk-through of the README, as a test, on every backend: register, stream, define,
trigger, complete, get the run."""

from __future__ import annotations

from conftest import ServerFactory, serve
from helpers import definition, task
from opscore.v1 import workflow_pb2


async def test_chain_runs_to_success_on_every_backend(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        agent = await client.agent("worker-1", capabilities=["echo"])
        created = await client.create(
            definition(
                "hello",
                task("greet", capability="echo", input={"greeting": "hello"}),
                task("shout", capability="echo", depends_on=["greet"]),
            )
        )
        run = await client.trigger(definition_id=created.definition_id, input={"who": "world"})
        first = await agent.next_assignment()
        assert (first.task_name, first.attempt) == ("greet", 1)
        await agent.complete(first, {"text": "hello world"})
        second = await agent.next_assignment()
        assert second.task_name == "shout"
        assert dict(second.dependency_outputs["greet"]) == {"text": "hello world"}
        await agent.complete(second, {"text": "HELLO WORLD"})
        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        assert [t.state for t in done.tasks] == [workflow_pb2.TASK_STATE_SUCCEEDED] * 2
