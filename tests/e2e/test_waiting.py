"""Work that cannot run says why, over a real gRPC channel on both backends: a trigger pinned
to an agent that lacks what its tasks need is refused, a deregistered agent's pinned tasks fail
instead of waiting forever, and a queued task read says why it waits."""

from __future__ import annotations

from datetime import UTC

import grpc
from conftest import ServerFactory, serve
from helpers import Client, definition, reason_of, refused, resource_of, seconds, task, tasks_of
from opscore.v1 import agent_lifecycle_pb2, workflow_pb2, workflow_service_pb2


async def deregister(client: Client, agent_id: str) -> None:
    """Deregister an agent."""
    await client.lifecycle.DeregisterAgent(
        agent_lifecycle_pb2.DeregisterAgentRequest(agent_id=agent_id)
    )


async def reasons(client: Client, run_id: str) -> dict[str, str]:
    """Each task's waiting reason, by name, as GetWorkflowRun answers."""
    return {name: t.waiting_reason for name, t in tasks_of(await client.run(run_id)).items()}


async def test_trigger_pinned_to_an_agent_that_lacks_a_need_is_refused(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        await client.agent("a-1", capabilities=["cpu"], labels={"zone": "us"}, connect=False)
        needy = definition(
            "needy",
            task("fetch", capability="cpu"),
            task("train", capability="gpu", depends_on=["fetch"]),
            task("ship", capability="cpu", labels={"zone": "eu"}, depends_on=["train"]),
        )
        error = await refused(
            client.trigger(definition=needy, agent_id="a-1"), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert reason_of(error) == "PINNED_AGENT_UNFIT"
        assert resource_of(error) == ("opscore.v1.Agent", "a-1")
        message = error.details() or ""
        assert "task 'train' needs capability 'gpu'" in message
        assert "task 'ship' needs label zone=eu" in message
        assert "'fetch'" not in message
        listed = await client.workflows.ListWorkflowRuns(
            workflow_service_pb2.ListWorkflowRunsRequest(view=workflow_pb2.WORKFLOW_RUN_VIEW_FULL)
        )
        assert list(listed.runs) == []

        fit = definition("fit", task("fetch", capability="cpu", labels={"zone": "us"}))
        run = await client.trigger(definition=fit, agent_id="a-1")
        assert run.agent_id == "a-1"


async def test_pinned_tasks_of_a_deregistered_agent_fail_and_the_run_follows(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        agent = await client.agent("a-1", max_concurrent_tasks=1)
        held = await client.trigger(definition=definition("held", task("x")), agent_id="a-1")
        assert (await agent.next_assignment()).run_id == held.run_id
        waiting = await client.trigger(
            definition=definition(
                "waiting",
                task("first", fallback="rescue"),
                task("rescue"),
                task("then", depends_on=["first"]),
            ),
            agent_id="a-1",
        )
        other = await client.trigger(definition=definition("free", task("y")))

        await deregister(client, "a-1")

        error = "pinned agent 'a-1' was deregistered"
        for run_id in (held.run_id, waiting.run_id):
            failed = await client.wait_run(run_id, workflow_pb2.RUN_STATE_FAILED)
            assert any(t.error == error for t in failed.tasks), failed
            assert all(t.state != workflow_pb2.TASK_STATE_QUEUED for t in failed.tasks)
        after = tasks_of(await client.run(waiting.run_id))
        # The fallback ran in its task's place, pinned too, and failed likewise.
        assert after["rescue"].state == workflow_pb2.TASK_STATE_FAILED
        assert after["rescue"].error == error
        # Work that was not pinned waits for any agent, as before.
        assert tasks_of(await client.run(other.run_id))["y"].state == (
            workflow_pb2.TASK_STATE_QUEUED
        )


async def test_a_queued_task_says_why_it_waits(start_server: ServerFactory, db_url: str) -> None:
    async with serve(start_server, db_url) as client:
        gpu = definition("gpu", task("train", capability="gpu"))
        run = await client.trigger(definition=gpu)
        assert await reasons(client, run.run_id) == {
            "train": "no registered agent offers capability 'gpu'"
        }
        labelled = await client.trigger(
            definition=definition("eu", task("t", labels={"zone": "eu"}))
        )
        assert await reasons(client, labelled.run_id) == {
            "t": "no registered agent offers label zone=eu"
        }
        anything = await client.trigger(definition=definition("any", task("t")))
        assert await reasons(client, anything.run_id) == {"t": "no agent is registered"}

        worker = await client.agent("a-1", capabilities=["gpu"], connect=False)
        assert await reasons(client, run.run_id) == {"train": "every capable agent is offline"}
        pinned = await client.trigger(definition=gpu, agent_id="a-1")
        assert await reasons(client, pinned.run_id) == {"train": "pinned agent 'a-1' is offline"}

        await worker.connect()
        first = await worker.next_assignment()
        assert first.run_id == run.run_id  # the earliest ready task it can take
        # It holds that task in its one slot: whatever else it could take waits.
        listed = await client.workflows.ListWorkflowRuns(
            workflow_service_pb2.ListWorkflowRunsRequest(view=workflow_pb2.WORKFLOW_RUN_VIEW_FULL)
        )
        assert {
            (listed_run.run_id, t.name): t.waiting_reason
            for listed_run in listed.runs
            for t in listed_run.tasks
        } == {
            (run.run_id, "train"): "",
            (labelled.run_id, "t"): "no registered agent offers label zone=eu",
            (anything.run_id, "t"): "every capable agent is busy",
            (pinned.run_id, "train"): "pinned agent 'a-1' is busy",
        }
        await client.agent("eu-1", labels={"zone": "eu", "tier": "gold"}, connect=False)
        assert await reasons(client, labelled.run_id) == {"t": "every capable agent is offline"}


async def test_a_task_in_backoff_says_until_when(start_server: ServerFactory, db_url: str) -> None:
    async with serve(start_server, db_url) as client:
        worker = await client.agent("a-1")
        spec = task("flaky")
        spec.retry_policy.initial_backoff.CopyFrom(seconds(600))
        spec.retry_policy.max_backoff.CopyFrom(seconds(600))
        run = await client.trigger(definition=definition("flaky", spec))
        await worker.fail(await worker.next_assignment(), "try again", retryable=True)
        queued = tasks_of(await client.run(run.run_id))["flaky"]
        assert queued.state == workflow_pb2.TASK_STATE_QUEUED
        until = queued.not_before.ToDatetime(UTC)
        assert queued.waiting_reason == f"backoff until {until:%H:%M:%S} UTC"


async def test_labels_with_awkward_keys_are_matched_when_read(
    start_server: ServerFactory, db_url: str
) -> None:
    """Keys with quotes, backslashes or letters beyond ASCII, which SQLite's JSON paths miss."""
    async with serve(start_server, db_url) as client:
        awkward = {'z"one': "eu", "t\\er": "gold", "région": "nord", "plain": "yes"}
        await client.agent("a-1", labels=awkward, connect=False)
        for key, value in awkward.items():
            run = await client.trigger(definition=definition("wf", task("t", labels={key: value})))
            assert await reasons(client, run.run_id) == {"t": "every capable agent is offline"}
            other = await client.trigger(
                definition=definition("wf", task("t", labels={key: "else"}))
            )
            assert await reasons(client, other.run_id) == {
                "t": f"no registered agent offers label {key}=else"
            }
