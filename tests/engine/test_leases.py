"""Leases on virtual time: an attempt whose lease ends is failed ("timed out"), its holder told
to stop and the task retried; an agent whose leases end too often in a row is quarantined until
it reports IDLE, and a success starts its count again; an extended lease runs to its new end."""

from __future__ import annotations

from datetime import timedelta

from engine.harness import T0, TICK, running
from opscore.domain.engine import EngineSettings
from opscore.domain.errors import FailedPrecondition
from opscore.domain.models import (
    AgentState,
    Cancellation,
    ReportedState,
    RetryPolicy,
    RunState,
    TaskSpec,
    TaskState,
)

LEASE = timedelta(minutes=5)
SETTINGS = EngineSettings(quarantine_after=3)
QUICK_RETRY = RetryPolicy(
    max_attempts=10, initial_backoff=timedelta(seconds=2), max_backoff=timedelta(seconds=2)
)
"""Retries due between 1 and 2 s after the failure."""


async def test_an_expired_lease_stops_the_holder_and_the_task_is_retried_elsewhere() -> None:
    async with running(SETTINGS, timeout=LEASE) as world:
        await world.agent("slow", "job")  # idle longest: it gets attempt 1
        await world.agent("spare", "job")
        run = await world.trigger(TaskSpec("job", capability="job"))
        first = world.assignment("slow")
        assert (first.attempt, first.deadline) == (1, T0 + LEASE)
        # Busy: the retry can only go to the spare.
        await world.engine.report_state("slow", ReportedState.BUSY, "thinking")

        await world.advance(LEASE - TICK)
        assert world.take("slow") == world.take("spare") == []
        held = await world.task(run.run_id, "job")
        assert (held.state, held.attempt, held.agent_id) == (TaskState.ASSIGNED, 1, "slow")

        await world.advance(TICK)
        assert world.take("slow") == [
            Cancellation("slow", first.task_id, run.run_id, 1, "timed out")
        ]
        waiting = await world.task(run.run_id, "job")
        assert (waiting.state, waiting.attempt, waiting.error) == (
            TaskState.QUEUED,
            1,
            "timed out",
        )
        assert waiting.not_before is not None
        assert T0 + LEASE + timedelta(seconds=0.5) <= waiting.not_before
        assert (await world.engine.get_agent("slow")).running_tasks == 0

        await world.advance_to(waiting.not_before - TICK)
        assert world.take("spare") == []
        await world.advance(TICK)
        second = world.assignment("spare")
        assert (second.task_id, second.attempt, second.redelivered) == (first.task_id, 2, False)
        assert second.deadline == waiting.not_before + LEASE

        # The slow agent's late result for attempt 1 is refused and changes nothing.
        try:
            await world.engine.complete_task(first.task_id, "slow", 1, {"late": True})
        except FailedPrecondition:
            pass
        else:
            raise AssertionError("a result for an expired attempt was accepted")
        await world.complete(second, {"by": "spare"})
        done = await world.engine.get_run(run.run_id)
        assert done.state is RunState.SUCCEEDED
        assert (done.tasks[0].attempt, done.tasks[0].output) == (2, {"by": "spare"})
        assert world.take("slow") == world.take("spare") == []


async def test_the_last_attempt_timing_out_fails_the_task_finally() -> None:
    async with running(SETTINGS, timeout=LEASE) as world:
        await world.agent("slow", "job")
        await world.agent("other", "side")
        run = await world.trigger(
            TaskSpec("job", capability="job", retry_policy=RetryPolicy(max_attempts=1)),
            TaskSpec("side", capability="side"),
        )
        job, side = world.assignment("slow"), world.assignment("other")

        await world.advance(LEASE)
        assert world.take("slow") == [Cancellation("slow", job.task_id, run.run_id, 1, "timed out")]
        assert world.take("other") == [
            Cancellation("other", side.task_id, run.run_id, 1, "run failed")
        ]
        failed = await world.engine.get_run(run.run_id)
        assert failed.state is RunState.FAILED
        states = {task.name: (task.state, task.error) for task in failed.tasks}
        assert states == {
            "job": (TaskState.FAILED, "timed out"),
            "side": (TaskState.SKIPPED, ""),
        }


async def test_leases_ending_in_a_row_quarantine_the_agent_until_it_reports_idle() -> None:
    async with running(SETTINGS, timeout=LEASE) as world:
        await world.agent("sleepy", "job")
        run = await world.trigger(TaskSpec("job", capability="job", retry_policy=QUICK_RETRY))
        for expiries in (1, 2, 3):
            attempt = world.assignment("sleepy")
            assert attempt.attempt == expiries
            await world.advance(LEASE)
            assert world.take("sleepy") == [
                Cancellation("sleepy", attempt.task_id, run.run_id, expiries, "timed out")
            ]
            assert world.store.lease_expiries("sleepy") == expiries
            await world.advance(timedelta(seconds=2))  # past the retry's backoff

        # The third expiry in a row put it in ERROR: it takes nothing, not even the retry.
        quarantined = await world.engine.get_agent("sleepy")
        assert quarantined.state is AgentState.ERROR
        assert quarantined.state_detail.startswith("quarantined: 3 task leases expired in a row")
        assert world.take("sleepy") == []
        assert (await world.task(run.run_id, "job")).state is TaskState.QUEUED

        # Reporting IDLE lifts it: the retry comes to it, and the count starts again.
        await world.engine.report_state("sleepy", ReportedState.IDLE, "")
        await world.settle()
        assert world.assignment("sleepy").attempt == 4
        assert world.store.lease_expiries("sleepy") == 0


async def test_a_success_starts_the_count_of_expiries_in_a_row_again() -> None:
    async with running(SETTINGS, timeout=LEASE) as world:
        await world.agent("flaky", "job")
        for run_number in range(2):
            await world.trigger(TaskSpec("job", capability="job", retry_policy=QUICK_RETRY))
            for _ in range(2):
                world.assignment("flaky")
                await world.advance(LEASE)
                world.cancellation("flaky")
                await world.advance(timedelta(seconds=2))
            assert world.store.lease_expiries("flaky") == 2
            # Two in a row, then a success: never three in a row, never quarantined.
            await world.complete(world.assignment("flaky"))
            assert world.store.lease_expiries("flaky") == 0, run_number
        assert (await world.engine.get_agent("flaky")).state is AgentState.IDLE


async def test_an_extended_lease_runs_to_its_new_end() -> None:
    async with running(SETTINGS, timeout=LEASE) as world:
        await world.agent("holder", "long")
        run = await world.trigger(TaskSpec("long", capability="long", timeout=timedelta(minutes=1)))
        held = world.assignment("holder")
        assert held.deadline == T0 + timedelta(minutes=1)

        await world.advance(timedelta(seconds=50))
        extended = await world.engine.extend_lease(held.task_id, "holder", 1, timedelta(minutes=10))
        assert extended == T0 + timedelta(seconds=50, minutes=10)
        # A shorter extension never moves the end earlier.
        again = await world.engine.extend_lease(held.task_id, "holder", 1, timedelta(seconds=1))
        assert again == extended

        # Past the original end: no cancellation, the same attempt still held.
        await world.advance_to(extended - TICK)
        assert world.take("holder") == []
        still = await world.task(run.run_id, "long")
        assert (still.state, still.attempt, still.deadline) == (TaskState.ASSIGNED, 1, extended)

        await world.advance(TICK)
        assert world.cancellation("holder").reason == "timed out"
