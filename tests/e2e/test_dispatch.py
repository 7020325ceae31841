"""Dispatch end to end: which agent receives which task, when, and what happens to a task when its
agent's stream is replaced, closed or the agent is removed. Every test runs a real server and
talks to it over a real gRPC channel, with scripted agents (tests/helpers.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from helpers import Agent, Client, as_dict, definition, expect_quiet, task, tasks_of
from opscore.v1 import agent_lifecycle_pb2, agent_pb2, workflow_pb2

SHORT = 1.0
"""Seconds to wait for something that should happen at once (a push, a state change)."""


def outputs(assignment: workflow_pb2.TaskAssignment) -> dict[str, dict[str, object]]:
    """An assignment's dependency outputs as plain dicts, by task name."""
    return {name: as_dict(output) for name, output in assignment.dependency_outputs.items()}


# 1. Capabilities and dependency order --------------------------------------------------------


async def test_diamond_runs_in_dependency_order_on_capable_agents(client: Client) -> None:
    # Two slots for `extractor`, so C could be sent alongside A if dependencies were ignored.
    extractor = await client.agent("extractor", capabilities=["extract"], max_concurrent_tasks=2)
    transformer = await client.agent("transformer", capabilities=["transform"])
    created = await client.create(
        definition(
            "diamond",
            task("A", capability="extract", input={"source": "s3://bucket", "mode": "spec"}),
            task("B", capability="transform", depends_on=["A"], input={"step": "b"}),
            task("C", capability="extract", depends_on=["A"], input={"step": "c", "mode": "x"}),
            task("D", capability="transform", depends_on=["B", "C"], input={"step": "d"}),
        )
    )
    run = await client.trigger(
        definition_id=created.definition_id, input={"mode": "run", "tenant": "acme"}
    )

    a = await extractor.next_assignment()
    assert (a.task_name, a.run_id, a.attempt, a.capability) == ("A", run.run_id, 1, "extract")
    assert not a.redelivered
    assert as_dict(a.input) == {"source": "s3://bucket", "mode": "run", "tenant": "acme"}
    assert outputs(a) == {}
    # Neither B (transformer is idle) nor C (extractor has a free slot) before A completes.
    await expect_quiet(extractor, transformer)
    states = {name: t.state for name, t in tasks_of(await client.run(run.run_id)).items()}
    assert states == {
        "A": workflow_pb2.TASK_STATE_ASSIGNED,
        "B": workflow_pb2.TASK_STATE_PENDING,
        "C": workflow_pb2.TASK_STATE_PENDING,
        "D": workflow_pb2.TASK_STATE_PENDING,
    }

    await extractor.complete(a, {"rows": 3})
    b = await transformer.next_assignment()
    c = await extractor.next_assignment()
    assert (b.task_name, b.capability) == ("B", "transform")
    assert (c.task_name, c.capability) == ("C", "extract")
    assert as_dict(b.input) == {"step": "b", "mode": "run", "tenant": "acme"}
    assert as_dict(c.input) == {"step": "c", "mode": "run", "tenant": "acme"}
    assert outputs(b) == {"A": {"rows": 3}}
    assert outputs(c) == {"A": {"rows": 3}}

    # D waits for both: B alone is not enough (transformer is idle again and gets nothing).
    await transformer.complete(b, {"from": "b", "n": 1})
    await expect_quiet(extractor, transformer)
    assert tasks_of(await client.run(run.run_id))["D"].state == workflow_pb2.TASK_STATE_PENDING

    await extractor.complete(c, {"from": "c", "tags": ["x", "y"]})
    d = await transformer.next_assignment()
    assert (d.task_name, d.capability, d.attempt) == ("D", "transform", 1)
    assert as_dict(d.input) == {"step": "d", "mode": "run", "tenant": "acme"}
    assert outputs(d) == {"B": {"from": "b", "n": 1}, "C": {"from": "c", "tags": ["x", "y"]}}
    await transformer.complete(d, {"done": True})

    done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    tasks = tasks_of(done)
    assert [t.name for t in done.tasks] == ["A", "B", "C", "D"]
    assert all(t.state == workflow_pb2.TASK_STATE_SUCCEEDED for t in done.tasks)
    assert {name: t.agent_id for name, t in tasks.items()} == {
        "A": "extractor",
        "B": "transformer",
        "C": "extractor",
        "D": "transformer",
    }
    assert {name: as_dict(t.output) for name, t in tasks.items()} == {
        "A": {"rows": 3},
        "B": {"from": "b", "n": 1},
        "C": {"from": "c", "tags": ["x", "y"]},
        "D": {"done": True},
    }
    assert all(t.attempt == 1 for t in done.tasks)
    await expect_quiet(extractor, transformer)


# 2. Pinned runs and labels -------------------------------------------------------------------


async def test_pinned_run_goes_only_to_its_agent(client: Client) -> None:
    # Connected first: the bystander has waited longest and would win any unpinned task.
    bystander = await client.agent("bystander", capabilities=["build"])
    pinned = await client.agent("pinned", capabilities=["build"])
    created = await client.create(
        definition("pinned-flow", task("one", capability="build"), task("two", capability="build"))
    )
    run = await client.trigger(definition_id=created.definition_id, agent_id="pinned")
    assert run.agent_id == "pinned"

    first = await pinned.next_assignment()
    assert first.run_id == run.run_id
    # The other task waits for the pinned agent's only slot, though the bystander is idle.
    await expect_quiet(bystander, pinned)
    current = await client.run(run.run_id)
    assert sorted(t.state for t in current.tasks) == [
        workflow_pb2.TASK_STATE_QUEUED,
        workflow_pb2.TASK_STATE_ASSIGNED,
    ]

    # The bystander is capable and free: an unpinned run goes to it at once.
    loose = await client.trigger(definition=definition("loose", task("any", capability="build")))
    other = await bystander.next_assignment(SHORT)
    assert other.run_id == loose.run_id
    await bystander.complete(other)

    # The bystander is now idle longer than the pinned agent, which still gets the pinned task.
    await pinned.complete(first)
    second = await pinned.next_assignment(SHORT)
    assert second.run_id == run.run_id
    assert {first.task_name, second.task_name} == {"one", "two"}
    await pinned.complete(second)

    done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    assert [t.agent_id for t in done.tasks] == ["pinned", "pinned"]
    await expect_quiet(bystander, pinned)


async def test_labelled_task_goes_only_to_agent_with_all_labels_equal(client: Client) -> None:
    lacking = await client.agent("lacking", labels={"region": "eu"})
    differing = await client.agent("differing", labels={"region": "eu", "gpu": "a100"})
    unlabelled = await client.agent("unlabelled")
    run = await client.trigger(
        definition=definition("labelled", task("train", labels={"region": "eu", "gpu": "h100"}))
    )
    await expect_quiet(lacking, differing, unlabelled)
    queued = (await client.run(run.run_id)).tasks[0]
    assert queued.state == workflow_pb2.TASK_STATE_QUEUED
    assert queued.agent_id == ""

    # Extra labels do not matter; every label of the task must be there with the same value.
    matching = await client.agent("matching", labels={"region": "eu", "gpu": "h100", "rack": "7"})
    assignment = await matching.next_assignment(SHORT)
    assert (assignment.run_id, assignment.task_name) == (run.run_id, "train")
    await matching.complete(assignment)
    done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    assert done.tasks[0].agent_id == "matching"
    await expect_quiet(lacking, differing, unlabelled)


# 3. Reported states and slots ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("report", "state", "detail"),
    [
        pytest.param(
            agent_pb2.REPORTED_AGENT_STATE_ERROR,
            agent_pb2.AGENT_STATE_ERROR,
            "disk full",
            id="error",
        ),
        pytest.param(
            agent_pb2.REPORTED_AGENT_STATE_BUSY,
            agent_pb2.AGENT_STATE_BUSY,
            "warming caches",
            id="busy",
        ),
    ],
)
async def test_agent_reporting_unavailable_state_gets_task_once_idle(
    client: Client, report: int, state: int, detail: str
) -> None:
    agent = await client.agent("moody", capabilities=["probe"])
    reported = await agent.report(report, detail)
    assert (reported.state, reported.state_detail) == (state, detail)
    seen = await agent.get()
    assert (seen.state, seen.state_detail, seen.connected) == (state, detail, True)

    run = await client.trigger(definition=definition("probe", task("check", capability="probe")))
    await agent.expect_nothing()
    waiting = await client.run(run.run_id)
    assert waiting.tasks[0].state == workflow_pb2.TASK_STATE_QUEUED
    assert waiting.state == workflow_pb2.RUN_STATE_PENDING
    assert (await agent.get()).state == state

    idle = await agent.report(agent_pb2.REPORTED_AGENT_STATE_IDLE)
    assert (idle.state, idle.state_detail) == (agent_pb2.AGENT_STATE_IDLE, "")
    assignment = await agent.next_assignment(SHORT)
    assert (assignment.run_id, assignment.task_name, assignment.attempt) == (run.run_id, "check", 1)
    await agent.complete(assignment)
    await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)


async def test_agent_with_two_slots_holds_two_tasks_and_third_waits(client: Client) -> None:
    agent = await client.agent("wide", capabilities=["crunch"], max_concurrent_tasks=2)
    assert (await agent.get()).max_concurrent_tasks == 2
    created = await client.create(definition("crunch", task("work", capability="crunch")))

    runs = [await client.trigger(definition_id=created.definition_id)]
    first = await agent.next_assignment(SHORT)
    assert first.run_id == runs[0].run_id
    one = await agent.get()
    assert (one.state, one.running_tasks) == (agent_pb2.AGENT_STATE_IDLE, 1)

    runs.append(await client.trigger(definition_id=created.definition_id))
    second = await agent.next_assignment(SHORT)
    assert second.run_id == runs[1].run_id
    full = await agent.get()
    assert (full.state, full.running_tasks) == (agent_pb2.AGENT_STATE_BUSY, 2)

    runs.append(await client.trigger(definition_id=created.definition_id))
    await agent.expect_nothing()
    assert (await client.run(runs[2].run_id)).tasks[0].state == workflow_pb2.TASK_STATE_QUEUED
    assert (await agent.get()).running_tasks == 2

    await agent.complete(first)
    third = await agent.next_assignment(SHORT)
    assert third.run_id == runs[2].run_id
    assert (await agent.get()).running_tasks == 2

    await agent.complete(second)
    await agent.complete(third)
    for run in runs:
        await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    after = await agent.get()
    assert (after.state, after.running_tasks) == (agent_pb2.AGENT_STATE_IDLE, 0)


# 4. Fairness and order -----------------------------------------------------------------------


async def test_agent_idle_longest_gets_the_task(client: Client) -> None:
    pool = [await client.agent(f"pool-{i}", capabilities=["render"]) for i in range(3)]
    p0, p1, p2 = pool
    created = await client.create(definition("render", task("frame", capability="render")))

    async def send_to(expected: Agent) -> workflow_pb2.TaskAssignment:
        run = await client.trigger(definition_id=created.definition_id)
        assignment = await expected.next_assignment(SHORT)
        assert assignment.run_id == run.run_id
        return assignment

    # Idle since they connected, in connection order.
    r1 = await send_to(p0)
    r2 = await send_to(p1)
    await p1.complete(r2)  # p1 idle again from now: p2 has waited longer
    r3 = await send_to(p2)
    await p0.complete(r1)
    await p2.complete(r3)
    # Idle since: p1, then p0, then p2.
    for expected in (p1, p0, p2):
        await send_to(expected)
    await expect_quiet(*pool)


async def test_ready_tasks_are_pushed_in_the_order_they_became_ready(client: Client) -> None:
    agent = await client.agent("solo", capabilities=["a", "b"], connect=False)
    # Two different capabilities: the order holds across different kinds of tasks too.
    runs = [
        await client.trigger(definition=definition(f"ordered-{i}", task("t", capability=cap)))
        for i, cap in enumerate(["a", "b", "a"])
    ]
    await agent.connect()
    received = []
    for _ in runs:
        assignment = await agent.next_assignment(SHORT)
        received.append(assignment.run_id)
        await agent.complete(assignment)
    assert received == [run.run_id for run in runs]
    for run in runs:
        await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)


async def test_ready_tasks_fill_free_slots_in_trigger_order(client: Client) -> None:
    agent = await client.agent("many", capabilities=["a", "b"], max_concurrent_tasks=3)
    await agent.report(agent_pb2.REPORTED_AGENT_STATE_BUSY)
    runs = [
        await client.trigger(definition=definition(f"slots-{i}", task("t", capability=cap)))
        for i, cap in enumerate(["b", "a", "b"])
    ]
    await agent.expect_nothing()
    await agent.report(agent_pb2.REPORTED_AGENT_STATE_IDLE)
    received = [(await agent.next_assignment(SHORT)).run_id for _ in runs]
    assert received == [run.run_id for run in runs]


# 5. Waiting for a capable agent --------------------------------------------------------------


async def test_task_stays_queued_until_capable_agent_connects(client: Client) -> None:
    other = await client.agent("other", capabilities=["unrelated"])
    capable = await client.agent("capable", capabilities=["rare"], connect=False)
    run = await client.trigger(definition=definition("orphan", task("job", capability="rare")))

    # Neither an incapable connected agent nor a capable one without a stream gets it.
    await expect_quiet(other, capable)
    waiting = await client.run(run.run_id)
    assert waiting.state == workflow_pb2.RUN_STATE_PENDING
    queued = waiting.tasks[0]
    assert (queued.state, queued.attempt, queued.agent_id) == (
        workflow_pb2.TASK_STATE_QUEUED,
        0,
        "",
    )

    await capable.connect()
    assignment = await capable.next_assignment(SHORT)
    assert (assignment.task_id, assignment.attempt) == (queued.task_id, 1)
    running = await client.run(run.run_id)
    assert running.state == workflow_pb2.RUN_STATE_RUNNING
    assert (running.tasks[0].state, running.tasks[0].agent_id) == (
        workflow_pb2.TASK_STATE_ASSIGNED,
        "capable",
    )
    await capable.complete(assignment)
    await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    await other.expect_nothing()


# 6. Stream lifecycle -------------------------------------------------------------------------


async def test_second_stream_replaces_the_first(client: Client) -> None:
    first = await client.agent("twin", capabilities=["x"])
    second = Agent(client, "twin")  # same agent, a new stream
    await second.connect()
    async with asyncio.timeout(SHORT):
        await first.stream_ended.wait()
    assert first.stream_error is not None
    assert first.stream_error.code() == grpc.StatusCode.ABORTED

    run = await client.trigger(definition=definition("twin", task("t", capability="x")))
    assignment = await second.next_assignment(SHORT)
    assert assignment.run_id == run.run_id
    assert first.events.empty()
    seen = await second.get()
    assert seen.connected
    assert (seen.state, seen.running_tasks) == (agent_pb2.AGENT_STATE_BUSY, 1)
    await second.complete(assignment)
    await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    assert (await second.get()).connected
    await second.disconnect()


async def test_cancelled_stream_makes_agent_offline(client: Client) -> None:
    agent = await client.agent("leaver", capabilities=["x"])
    assert (await agent.get()).state == agent_pb2.AGENT_STATE_IDLE
    await agent.disconnect()
    seen = await agent.wait_until(lambda a: not a.connected, SHORT)
    assert seen.state == agent_pb2.AGENT_STATE_OFFLINE

    # An offline agent receives nothing: a task for it waits.
    run = await client.trigger(definition=definition("later", task("t", capability="x")))
    await agent.expect_nothing()
    assert (await client.run(run.run_id)).tasks[0].state == workflow_pb2.TASK_STATE_QUEUED


async def test_deregistered_agent_loses_stream_and_its_task_is_reassigned(client: Client) -> None:
    doomed = await client.agent("doomed", capabilities=["job"])
    heir = await client.agent("heir", capabilities=["job"])
    run = await client.trigger(definition=definition("inherit", task("t", capability="job")))
    held = await doomed.next_assignment(SHORT)  # idle longest
    assert held.attempt == 1
    await heir.expect_nothing()

    await client.lifecycle.DeregisterAgent(
        agent_lifecycle_pb2.DeregisterAgentRequest(agent_id="doomed")
    )
    async with asyncio.timeout(SHORT):
        await doomed.stream_ended.wait()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await doomed.get()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    again = await heir.next_assignment(SHORT)
    assert (again.task_id, again.run_id, again.attempt) == (held.task_id, run.run_id, 2)
    assert not again.redelivered
    await heir.complete(again, {"by": "heir"})
    done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    finished = done.tasks[0]
    assert (finished.agent_id, finished.attempt) == ("heir", 2)
    assert as_dict(finished.output) == {"by": "heir"}
    assert doomed.events.empty()


async def test_reconnecting_agent_gets_its_held_task_again_first(client: Client) -> None:
    agent = await client.agent("roamer", capabilities=["job"], max_concurrent_tasks=2)
    created = await client.create(definition("roam", task("t", capability="job", input={"k": 1})))
    held_run = await client.trigger(definition_id=created.definition_id)
    held = await agent.next_assignment(SHORT)
    assert (held.run_id, held.attempt, held.redelivered) == (held_run.run_id, 1, False)

    await agent.disconnect()
    await agent.wait_until(lambda a: not a.connected, SHORT)
    # The agent keeps the task while away.
    away = (await client.run(held_run.run_id)).tasks[0]
    assert (away.state, away.agent_id, away.attempt) == (
        workflow_pb2.TASK_STATE_ASSIGNED,
        "roamer",
        1,
    )
    queued_run = await client.trigger(definition_id=created.definition_id)

    await agent.connect()
    again = await agent.next_assignment(SHORT)
    assert again.redelivered
    assert (again.task_id, again.run_id, again.task_name, again.attempt) == (
        held.task_id,
        held.run_id,
        held.task_name,
        held.attempt,
    )
    assert as_dict(again.input) == as_dict(held.input) == {"k": 1}
    assert again.deadline == held.deadline
    fresh = await agent.next_assignment(SHORT)
    assert (fresh.run_id, fresh.attempt, fresh.redelivered) == (queued_run.run_id, 1, False)

    await agent.complete(again, {"ok": True})
    done = await client.wait_run(held_run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    assert (done.tasks[0].attempt, as_dict(done.tasks[0].output)) == (1, {"ok": True})
    await agent.complete(fresh)
    await client.wait_run(queued_run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
