"""Assignments that fit a client at gRPC's default receive limit: a task whose dependency outputs
together are larger than one message is still delivered, with the outputs that fit, the names
of the rest, and those outputs readable through ListWorkflowRunTasks."""

from __future__ import annotations

from conftest import ServerFactory, client_at
from helpers import Client, as_dict, definition, task
from opscore.v1 import workflow_pb2, workflow_service_pb2

from opscore.domain.validation import Limits

KIB = 1024
PAYLOAD, MESSAGE = 64 * KIB, 256 * KIB
"""The limits scaled down by 16, keeping their ratio: outputs of 1 MiB against 4 MiB messages."""
DEPENDENCIES = ["d4", "d3", "d2", "d1", "d0"]
"""In dependency order, which is not the order of their names."""


def output_at_limit(name: str) -> dict[str, str]:
    """An output of exactly PAYLOAD bytes as compact JSON, different for each task."""
    return {"text": name + "o" * (PAYLOAD - len('{"text":""}') - len(name))}


async def outputs_of(client: Client, run_id: str) -> dict[str, dict[str, object]]:
    """Every task's output in a run, read page by page through ListWorkflowRunTasks."""
    outputs: dict[str, dict[str, object]] = {}
    token = ""
    while True:
        page = await client.workflows.ListWorkflowRunTasks(
            workflow_service_pb2.ListWorkflowRunTasksRequest(run_id=run_id, page_token=token)
        )
        outputs.update({item.name: as_dict(item.output) for item in page.tasks})
        token = page.next_page_token
        if not token:
            return outputs


async def test_an_assignment_too_large_for_one_message_leaves_outputs_out_and_names_them(
    start_server: ServerFactory, db_url: str
) -> None:
    """Five dependency outputs at the payload limit are more than one message: the task is
    delivered (first and again on reconnection) to a client whose receive limit is the server's
    message limit, with the first outputs in dependency order, the others named, and readable."""
    limits = Limits(max_payload_bytes=PAYLOAD)
    async with client_at(
        start_server, db_url, MESSAGE, limits=limits, max_message_bytes=MESSAGE
    ) as client:
        await client.create(
            definition(
                "fan-in",
                *(task(name) for name in DEPENDENCIES),
                task("join", depends_on=DEPENDENCIES, input={"mode": "merge"}),
            )
        )
        run = await client.trigger(workflow_name="fan-in")
        agent = await client.agent("worker", max_concurrent_tasks=5)
        for _ in DEPENDENCIES:
            dependency = await agent.next_assignment()
            await agent.complete(dependency, output_at_limit(dependency.task_name))

        joined = await agent.next_assignment()
        assert joined.task_name == "join"
        assert as_dict(joined.input) == {"mode": "merge"}
        assert list(joined.omitted_dependency_outputs) == ["d1", "d0"]
        assert {name: as_dict(out) for name, out in joined.dependency_outputs.items()} == {
            name: output_at_limit(name) for name in ["d4", "d3", "d2"]
        }
        assert joined.ByteSize() <= MESSAGE
        stored = await outputs_of(client, run.run_id)
        for name in joined.omitted_dependency_outputs:
            assert stored[name] == output_at_limit(name)

        # A redelivery after a reconnection is cut the same way.
        await agent.disconnect()
        await agent.connect()
        again = await agent.next_assignment()
        assert again.redelivered
        assert (again.task_id, again.attempt) == (joined.task_id, joined.attempt)
        assert list(again.omitted_dependency_outputs) == ["d1", "d0"]
        assert sorted(again.dependency_outputs) == ["d2", "d3", "d4"]

        await agent.complete(again, {"done": True})
        await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)


async def test_an_assignment_that_fits_carries_every_output_and_names_none(
    start_server: ServerFactory, db_url: str
) -> None:
    async with client_at(start_server, db_url) as client:
        await client.create(
            definition("pair", task("a"), task("b"), task("join", depends_on=["a", "b"]))
        )
        await client.trigger(workflow_name="pair")
        agent = await client.agent("worker", max_concurrent_tasks=2)
        for _ in range(2):
            dependency = await agent.next_assignment()
            await agent.complete(dependency, {"from": dependency.task_name})

        joined = await agent.next_assignment()
        assert not joined.omitted_dependency_outputs
        assert {name: as_dict(out) for name, out in joined.dependency_outputs.items()} == {
            "a": {"from": "a"},
            "b": {"from": "b"},
        }
