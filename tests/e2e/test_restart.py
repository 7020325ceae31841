"""Restarts: what one server committed to its database, the next server on the same file serves.

Each test runs a first server on a SQLite file, leaves it (a real drain, with agents' task streams
still open), starts a second server on the same file and checks the state it shows and the work
it hands out.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import grpc
from conftest import ServerFactory
from google.protobuf.duration_pb2 import Duration
from helpers import WAIT, Agent, Client, as_dict, connect, definition, task
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_pb2,
    workflow_pb2,
    workflow_service_pb2,
)


async def reconnect(client: Client, agent_id: str, cleanup: AsyncExitStack) -> Agent:
    """Open the task stream of an agent registered earlier, without registering it again."""
    agent = Agent(client, agent_id)
    cleanup.push_async_callback(agent.disconnect)
    await agent.connect()
    return agent


async def agents_by_id(client: Client) -> dict[str, agent_pb2.Agent]:
    response = await client.lifecycle.ListAgents(agent_lifecycle_pb2.ListAgentsRequest())
    assert not response.next_page_token
    return {agent.agent_id: agent for agent in response.agents}


async def all_definitions(client: Client) -> list[workflow_pb2.WorkflowDefinition]:
    response = await client.workflows.ListWorkflowDefinitions(
        workflow_service_pb2.ListWorkflowDefinitionsRequest()
    )
    assert not response.next_page_token
    return list(response.definitions)


async def all_runs(client: Client) -> dict[str, workflow_pb2.WorkflowRun]:
    response = await client.workflows.ListWorkflowRuns(
        workflow_service_pb2.ListWorkflowRunsRequest(view=workflow_pb2.WORKFLOW_RUN_VIEW_FULL)
    )
    assert not response.next_page_token
    return {run.run_id: run for run in response.runs}


async def wait_stream_ended(*agents: Agent) -> None:
    """The server's drain ends every open task stream, with UNAVAILABLE."""
    for agent in agents:
        code = await agent.wait_stream_ended()
        assert code == grpc.StatusCode.UNAVAILABLE, agent.stream_error


def assert_same_registration(before: agent_pb2.Agent, after: agent_pb2.Agent) -> None:
    assert after.agent_id == before.agent_id
    assert after.name == before.name
    assert after.version == before.version
    assert list(after.capabilities) == list(before.capabilities)
    assert dict(after.labels) == dict(before.labels)
    assert after.max_concurrent_tasks == before.max_concurrent_tasks
    assert after.registered_at == before.registered_at
    assert after.last_seen_at.ToDatetime() >= before.last_seen_at.ToDatetime()


def compile_spec() -> workflow_pb2.TaskSpec:
    """A task spec using every field, to see each survive the restart."""
    spec = task(
        "compile",
        capability="build",
        labels={"zone": "eu"},
        input={"lang": "py", "flags": ["-O", "-W"], "jobs": 4, "nested": {"debug": False}},
    )
    spec.timeout.CopyFrom(Duration(seconds=90))
    spec.retry_policy.CopyFrom(
        workflow_pb2.RetryPolicy(
            max_attempts=3,
            initial_backoff=Duration(seconds=1, nanos=500_000_000),
            backoff_multiplier=2.5,
            max_backoff=Duration(seconds=30),
        )
    )
    return spec


async def test_agents_definitions_and_runs_survive_a_restart(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with AsyncExitStack() as cleanup:
        # The first server: two agents, two workflows (one with two versions), three runs.
        async with start_server(sqlite_url) as first:
            client = await cleanup.enter_async_context(connect(first.port, first))
            alpha = await client.agent(
                "alpha",
                capabilities=["build", "lint"],
                labels={"zone": "eu", "tier": "gold"},
                max_concurrent_tasks=2,
            )
            beta = await client.agent("beta", capabilities=["test"], labels={"zone": "us"})

            v1 = await client.create(
                definition(
                    "release",
                    compile_spec(),
                    task("test", capability="test", depends_on=["compile"]),
                )
            )
            v2_draft = definition(
                "release",
                compile_spec(),
                task("ship", capability="ship", depends_on=["compile"], input={"target": "prod"}),
            )
            v2_draft.description = "compile, then ship"
            v2 = await client.create(v2_draft)
            check = await client.create(definition("check", task("lint", capability="test")))
            assert (v1.version, v2.version, check.version) == (1, 2, 1)

            # A run that completes fully.
            done = await client.trigger(definition_id=v1.definition_id, input={"sha": "aaa"})
            compile_1 = await alpha.next_assignment()
            assert (compile_1.run_id, compile_1.task_name) == (done.run_id, "compile")
            await alpha.complete(compile_1, {"artifact": "app-aaa.whl", "size": 3})
            test_1 = await beta.next_assignment()
            assert (test_1.run_id, test_1.task_name) == (done.run_id, "test")
            await beta.complete(test_1, {"passed": 12, "failed": 0})
            await client.wait_run(done.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)

            # A run whose first task completed and whose second waits for a "ship" agent.
            waiting = await client.trigger(workflow_name="release", input={"sha": "bbb"})
            assert waiting.definition_id == v2.definition_id
            compile_2 = await alpha.next_assignment()
            assert (compile_2.run_id, compile_2.task_name) == (waiting.run_id, "compile")
            await alpha.complete(compile_2, {"artifact": "app-bbb.whl"})
            async with asyncio.timeout(WAIT):
                while (await client.run(waiting.run_id)).tasks[
                    1
                ].state != workflow_pb2.TASK_STATE_QUEUED:
                    await asyncio.sleep(0.02)

            # A run pinned to beta, whose task beta holds when the server stops.
            pinned = await client.trigger(
                definition_id=check.definition_id, agent_id="beta", input={"strict": True}
            )
            lint = await beta.next_assignment()
            assert (lint.run_id, lint.task_name, lint.attempt) == (pinned.run_id, "lint", 1)
            await client.wait_run(pinned.run_id, workflow_pb2.RUN_STATE_RUNNING)
            await alpha.expect_nothing()
            await beta.expect_nothing()

            agents_before = await agents_by_id(client)
            definitions_before = await all_definitions(client)
            runs_before = await all_runs(client)

        # The first server has drained: the agents' streams ended.
        await wait_stream_ended(alpha, beta)

        assert set(agents_before) == {"alpha", "beta"}
        assert agents_before["beta"].running_tasks == 1
        assert [d.definition_id for d in definitions_before] == [
            v1.definition_id,
            v2.definition_id,
            check.definition_id,
        ]
        assert set(runs_before) == {done.run_id, waiting.run_id, pinned.run_id}
        before_done = runs_before[done.run_id]
        assert before_done.state == workflow_pb2.RUN_STATE_SUCCEEDED
        before_waiting = runs_before[waiting.run_id]
        assert before_waiting.state == workflow_pb2.RUN_STATE_RUNNING
        assert [t.state for t in before_waiting.tasks] == [
            workflow_pb2.TASK_STATE_SUCCEEDED,
            workflow_pb2.TASK_STATE_QUEUED,
        ]
        before_pinned = runs_before[pinned.run_id]
        assert before_pinned.agent_id == "beta"
        assert before_pinned.tasks[0].state == workflow_pb2.TASK_STATE_ASSIGNED

        # The second server, on the same file.
        async with start_server(sqlite_url) as second:
            client2 = await cleanup.enter_async_context(connect(second.port, second))

            # Agents: the same registrations, none connected.
            agents_after = await agents_by_id(client2)
            assert set(agents_after) == {"alpha", "beta"}
            for agent_id, before in agents_before.items():
                after = agents_after[agent_id]
                assert_same_registration(before, after)
                assert after.connected is False
                assert after.state == agent_pb2.AGENT_STATE_OFFLINE
                single = await client2.lifecycle.GetAgent(
                    agent_lifecycle_pb2.GetAgentRequest(agent_id=agent_id)
                )
                assert single.agent == after
            assert agents_after["alpha"].running_tasks == 0
            assert agents_after["beta"].running_tasks == 1
            offline = await client2.lifecycle.ListAgents(
                agent_lifecycle_pb2.ListAgentsRequest(state=agent_pb2.AGENT_STATE_OFFLINE)
            )
            assert {a.agent_id for a in offline.agents} == {"alpha", "beta"}
            idle = await client2.lifecycle.ListAgents(
                agent_lifecycle_pb2.ListAgentsRequest(state=agent_pb2.AGENT_STATE_IDLE)
            )
            assert list(idle.agents) == []

            # Definitions: the same ids, versions, task specs and timestamps.
            assert await all_definitions(client2) == definitions_before
            for before_definition in definitions_before:
                got = await client2.workflows.GetWorkflowDefinition(
                    workflow_service_pb2.GetWorkflowDefinitionRequest(
                        definition_id=before_definition.definition_id
                    )
                )
                assert got.definition == before_definition
            v2_after = next(d for d in definitions_before if d.definition_id == v2.definition_id)
            assert v2_after.description == "compile, then ship"
            assert v2_after.tasks[0] == v2.tasks[0]
            assert v2_after.tasks[0].timeout == Duration(seconds=90)
            assert v2_after.tasks[0].retry_policy.max_attempts == 3
            assert v2_after.tasks[0].retry_policy.backoff_multiplier == 2.5
            assert as_dict(v2_after.tasks[0].input) == {
                "lang": "py",
                "flags": ["-O", "-W"],
                "jobs": 4,
                "nested": {"debug": False},
            }
            assert list(v2_after.tasks[1].depends_on) == ["compile"]
            latest = await client2.workflows.ListWorkflowDefinitions(
                workflow_service_pb2.ListWorkflowDefinitionsRequest(workflow_name="release")
            )
            assert [d.version for d in latest.definitions] == [1, 2]

            # Runs: the same states, task states, outputs and timestamps.
            assert await all_runs(client2) == runs_before
            for run_id, before_run in runs_before.items():
                assert await client2.run(run_id) == before_run
            assert as_dict(before_done.tasks[0].output) == {"artifact": "app-aaa.whl", "size": 3}
            assert as_dict(before_done.tasks[1].output) == {"passed": 12, "failed": 0}
            assert as_dict(before_waiting.tasks[0].output) == {"artifact": "app-bbb.whl"}
            for stamp in ("created_at", "started_at", "finished_at"):
                assert before_done.HasField(stamp), stamp

            # A reconnecting agent that cannot ship gets nothing; the queued task stays queued.
            alpha2 = await reconnect(client2, "alpha", cleanup)
            await alpha2.expect_nothing()
            assert (await client2.run(waiting.run_id)).tasks[
                1
            ].state == workflow_pb2.TASK_STATE_QUEUED

            # A new agent that can ship receives the queued task, with its dependency's output.
            gamma = await client2.agent("gamma", capabilities=["ship"])
            ship = await gamma.next_assignment()
            assert ship.task_id == before_waiting.tasks[1].task_id
            assert (ship.run_id, ship.task_name, ship.attempt) == (waiting.run_id, "ship", 1)
            assert ship.redelivered is False
            assert ship.capability == "ship"
            assert as_dict(ship.input) == {"target": "prod", "sha": "bbb"}
            assert set(ship.dependency_outputs) == {"compile"}
            assert as_dict(ship.dependency_outputs["compile"]) == {"artifact": "app-bbb.whl"}
            await gamma.complete(ship, {"shipped": True})
            finished = await client2.wait_run(waiting.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
            assert [t.state for t in finished.tasks] == [workflow_pb2.TASK_STATE_SUCCEEDED] * 2
            assert finished.tasks[0] == before_waiting.tasks[0]
            assert finished.tasks[1].agent_id == "gamma"
            assert as_dict(finished.tasks[1].output) == {"shipped": True}
            assert finished.created_at == before_waiting.created_at
            assert finished.started_at == before_waiting.started_at
            assert finished.HasField("finished_at")

            # The pinned run's held task goes back to beta, and to nobody else.
            beta2 = await reconnect(client2, "beta", cleanup)
            again = await beta2.next_assignment()
            assert again.redelivered is True
            assert (again.task_id, again.run_id, again.attempt) == (lint.task_id, lint.run_id, 1)
            assert again.deadline == lint.deadline
            assert as_dict(again.input) == as_dict(lint.input) == {"strict": True}
            await beta2.complete(again, {"warnings": 0})
            pinned_done = await client2.wait_run(pinned.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
            assert pinned_done.agent_id == "beta"
            assert pinned_done.tasks[0].agent_id == "beta"
            assert pinned_done.tasks[0].attempt == 1
            assert as_dict(pinned_done.tasks[0].output) == {"warnings": 0}

            # The run that had finished before the restart is untouched by all this.
            assert await client2.run(done.run_id) == before_done
            await alpha2.expect_nothing()
            await gamma.expect_nothing()
            await beta2.expect_nothing()


async def test_held_assignment_is_redelivered_after_restart(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with AsyncExitStack() as cleanup:
        async with start_server(sqlite_url) as first:
            client = await cleanup.enter_async_context(connect(first.port, first))
            holder = await client.agent("holder", capabilities=["work"], labels={"pool": "a"})
            created = await client.create(
                definition("job", task("step", capability="work", input={"n": 1}))
            )
            run = await client.trigger(definition_id=created.definition_id, input={"m": 2})
            held = await holder.next_assignment()
            assert (held.run_id, held.attempt, held.redelivered) == (run.run_id, 1, False)
            # The server stops while the agent holds the attempt and its stream is open.

        await wait_stream_ended(holder)

        async with start_server(sqlite_url) as second:
            client2 = await cleanup.enter_async_context(connect(second.port, second))
            stored = await client2.run(run.run_id)
            assert stored.state == workflow_pb2.RUN_STATE_RUNNING
            assert stored.tasks[0].state == workflow_pb2.TASK_STATE_ASSIGNED
            assert (stored.tasks[0].agent_id, stored.tasks[0].attempt) == ("holder", 1)

            # Another capable agent does not get the attempt the holder still holds.
            other = await client2.agent("other", capabilities=["work"], labels={"pool": "a"})
            await other.expect_nothing()

            # The holder restarted: it registers again (idempotent) and reconnects.
            holder2 = await client2.agent("holder", capabilities=["work"], labels={"pool": "a"})
            again = await holder2.next_assignment()
            assert again.redelivered is True
            assert again.task_id == held.task_id
            assert again.run_id == held.run_id
            assert again.task_name == held.task_name == "step"
            assert again.attempt == held.attempt == 1
            assert again.deadline == held.deadline
            assert again.capability == "work"
            assert as_dict(again.input) == as_dict(held.input) == {"n": 1, "m": 2}
            assert (await holder2.get()).running_tasks == 1

            await holder2.complete(again, {"result": 42})
            done = await client2.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
            assert done.tasks[0].state == workflow_pb2.TASK_STATE_SUCCEEDED
            assert (done.tasks[0].agent_id, done.tasks[0].attempt) == ("holder", 1)
            assert as_dict(done.tasks[0].output) == {"result": 42}
            assert done.started_at == stored.started_at
            assert (await holder2.get()).running_tasks == 0
            await other.expect_nothing()
            await holder2.expect_nothing()
