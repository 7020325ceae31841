"""An agent's grace on virtual time: an agent whose stream closes keeps its tasks for the grace
period; back within it, it is sent them again (the same attempts); gone past it, it loses them
("agent lost"), and they are retried elsewhere."""

from __future__ import annotations

from datetime import timedelta

from engine.harness import TICK, running
from opscore.domain.engine import EngineSettings
from opscore.domain.models import AgentState, RunState, TaskSpec, TaskState

GRACE = timedelta(seconds=30)
SETTINGS = EngineSettings(agent_grace=GRACE)


async def test_an_agent_back_within_its_grace_keeps_its_task_and_is_sent_it_again() -> None:
    async with running(SETTINGS) as world:
        await world.agent("roamer", "job")  # idle longest
        await world.agent("steady", "job")
        run = await world.trigger(TaskSpec("job", capability="job"))
        first = world.assignment("roamer")

        await world.advance(timedelta(seconds=1))
        await world.disconnect("roamer")
        assert (await world.engine.get_agent("roamer")).state is AgentState.OFFLINE
        await world.advance(GRACE - TICK)
        away = await world.task(run.run_id, "job")
        assert (away.state, away.attempt, away.agent_id) == (TaskState.ASSIGNED, 1, "roamer")
        assert world.take("steady") == []

        await world.connect("roamer")
        again = world.assignment("roamer")
        assert again.redelivered
        assert (again.task_id, again.attempt, again.deadline) == (
            first.task_id,
            1,
            first.deadline,
        )

        # The grace that began at the disconnection ends: nothing is lost, nothing moves.
        await world.advance(GRACE)
        assert world.take("roamer") == world.take("steady") == []
        still = await world.task(run.run_id, "job")
        assert (still.state, still.attempt, still.agent_id, still.error) == (
            TaskState.ASSIGNED,
            1,
            "roamer",
            "",
        )
        await world.complete(again, {"back": True})
        assert (await world.engine.get_run(run.run_id)).state is RunState.SUCCEEDED


async def test_an_agent_gone_past_its_grace_loses_its_task_to_a_retry_elsewhere() -> None:
    async with running(SETTINGS) as world:
        await world.agent("fragile", "job")  # idle longest
        await world.agent("steady", "job")
        run = await world.trigger(TaskSpec("job", capability="job"))
        first = world.assignment("fragile")

        await world.disconnect("fragile")
        await world.advance(GRACE - TICK)
        kept = await world.task(run.run_id, "job")
        assert (kept.state, kept.agent_id) == (TaskState.ASSIGNED, "fragile")
        assert world.take("steady") == []

        await world.advance(TICK)
        lost = await world.task(run.run_id, "job")
        assert (lost.state, lost.attempt, lost.error) == (TaskState.QUEUED, 1, "agent lost")
        assert lost.not_before is not None
        assert (await world.engine.get_agent("fragile")).running_tasks == 0
        assert world.take("fragile") == []  # its stream is closed: nobody to tell

        await world.advance_to(lost.not_before)
        second = world.assignment("steady")
        assert (second.task_id, second.attempt, second.redelivered) == (first.task_id, 2, False)

        # Back too late, the agent is sent nothing: the attempt it held is over.
        await world.connect("fragile")
        assert world.take("fragile") == []
        await world.complete(second)
        assert (await world.engine.get_run(run.run_id)).state is RunState.SUCCEEDED
