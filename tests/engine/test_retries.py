"""Retries and final failures on virtual time: a retry is not sent before its backoff ends and
is sent the moment it does; a task that fails finally hands over to its fallback, or fails its
run, whose other holders are told to stop."""

from __future__ import annotations

from datetime import datetime, timedelta

from engine.harness import T0, TICK, World, running
from opscore.domain.engine import DEFAULT_TASK_TIMEOUT, EngineSettings
from opscore.domain.models import Cancellation, RetryPolicy, RunState, TaskSpec, TaskState
from opscore.domain.retry import ResolvedRetryPolicy

BACKOFF = RetryPolicy(
    max_attempts=3,
    initial_backoff=timedelta(seconds=10),
    backoff_multiplier=2.0,
    max_backoff=timedelta(seconds=15),
)
"""Attempt 1's retry waits 5-10 s, attempt 2's 7.5-15 s (capped), and there is no attempt 4."""


async def waiting_retry(world: World, run_id: str, name: str) -> datetime:
    """The time the named task's retry is due (the task must be waiting for it)."""
    task = await world.task(run_id, name)
    assert task.state is TaskState.QUEUED, task
    assert task.not_before is not None, task
    return task.not_before


async def test_a_retry_is_sent_when_its_backoff_ends_and_not_before() -> None:
    async with running(EngineSettings()) as world:
        await world.agent("worker", "flaky")
        run = await world.trigger(
            TaskSpec("flaky", capability="flaky", retry_policy=BACKOFF),
            TaskSpec("after", capability="flaky", depends_on=("flaky",)),
        )
        assignment = world.assignment("worker")
        for failed, (shortest, longest) in ((1, (5.0, 10.0)), (2, (7.5, 15.0))):
            failed_at = world.clock.now()
            await world.fail(assignment, f"blip {failed}", retryable=True)
            task = await world.task(run.run_id, "flaky")
            assert (task.attempt, task.error) == (failed, f"blip {failed}")
            due = await waiting_retry(world, run.run_id, "flaky")
            assert failed_at + timedelta(seconds=shortest) <= due
            assert due <= failed_at + timedelta(seconds=longest)
            assert (await world.engine.get_run(run.run_id)).state is RunState.RUNNING

            await world.advance_to(due - TICK)
            assert world.take("worker") == []
            await world.advance(TICK)
            assignment = world.assignment("worker")
            assert (assignment.attempt, assignment.redelivered) == (failed + 1, False)

        await world.complete(assignment, {"third": "time lucky"})
        after = world.assignment("worker")
        assert (after.task_name, after.dependency_outputs) == (
            "after",
            {"flaky": {"third": "time lucky"}},
        )


async def test_the_last_retryable_failure_is_final() -> None:
    async with running(EngineSettings()) as world:
        await world.agent("worker", "job")
        run = await world.trigger(
            TaskSpec("job", capability="job", retry_policy=BACKOFF),
            TaskSpec("next", depends_on=("job",)),
        )
        for _ in range(2):
            await world.fail(world.assignment("worker"), "still broken", retryable=True)
            await world.advance_to(await waiting_retry(world, run.run_id, "job"))
        last = world.assignment("worker")
        assert last.attempt == 3
        await world.fail(last, "still broken", retryable=True)

        failed = await world.engine.get_run(run.run_id)
        assert failed.state is RunState.FAILED
        job, following = failed.tasks
        assert (job.state, job.attempt, job.not_before) == (TaskState.FAILED, 3, None)
        assert following.state is TaskState.SKIPPED
        # Long past any backoff: no fourth attempt.
        await world.advance(timedelta(hours=1))
        assert world.take("worker") == []


async def test_tasks_without_a_policy_take_the_servers_defaults() -> None:
    defaults = ResolvedRetryPolicy(max_attempts=2, initial_backoff=timedelta(minutes=1))
    async with running(EngineSettings(), retry=defaults) as world:
        await world.agent("worker")
        run = await world.trigger(TaskSpec("job"))
        failed_at = world.clock.now()
        await world.fail(world.assignment("worker"), "one", retryable=True)
        due = await waiting_retry(world, run.run_id, "job")
        assert failed_at + timedelta(seconds=30) <= due <= failed_at + timedelta(minutes=1)
        await world.advance_to(due)
        await world.fail(world.assignment("worker"), "two", retryable=True)
        assert (await world.engine.get_run(run.run_id)).state is RunState.FAILED


async def test_a_non_retryable_failure_hands_over_to_the_fallback_which_feeds_dependents() -> None:
    async with running(EngineSettings()) as world:
        # Two slots: a fallback sent too early would arrive alongside its task.
        await world.agent("worker", slots=2)
        run = await world.trigger(
            TaskSpec("fetch", fallback="cache", retry_policy=BACKOFF),
            TaskSpec("cache"),
            TaskSpec("report", depends_on=("fetch",)),
        )
        fetch = world.assignment("worker")
        assert (fetch.task_name, fetch.fallback_for) == ("fetch", "")

        await world.fail(fetch, "no route", retryable=False)
        stand_in = world.assignment("worker")
        assert (stand_in.task_name, stand_in.fallback_for, stand_in.fallback_error) == (
            "cache",
            "fetch",
            "no route",
        )
        during = await world.engine.get_run(run.run_id)
        assert during.state is RunState.RUNNING
        assert [(task.name, task.state) for task in during.tasks] == [
            ("fetch", TaskState.FAILED),
            ("cache", TaskState.ASSIGNED),
            ("report", TaskState.PENDING),
        ]

        await world.complete(stand_in, {"source": "cache"})
        report = world.assignment("worker")
        assert (report.task_name, report.dependency_outputs) == (
            "report",
            {"fetch": {"source": "cache"}},
        )
        await world.complete(report)
        done = await world.engine.get_run(run.run_id)
        assert done.state is RunState.SUCCEEDED
        assert [task.state for task in done.tasks] == [
            TaskState.FAILED,
            TaskState.SUCCEEDED,
            TaskState.SUCCEEDED,
        ]


async def test_a_failing_fallback_fails_the_run_and_stops_the_other_holders() -> None:
    async with running(EngineSettings()) as world:
        await world.agent("main", "main")
        await world.agent("backup", "backup")
        await world.agent("side", "side")
        run = await world.trigger(
            TaskSpec("fetch", capability="main", fallback="cache"),
            TaskSpec("cache", capability="backup"),
            TaskSpec("side", capability="side"),
            TaskSpec("report", capability="main", depends_on=("fetch",)),
        )
        fetch, side = world.assignment("main"), world.assignment("side")
        assert world.take("backup") == []

        await world.fail(fetch, "no route", retryable=False)
        cache = world.assignment("backup")
        await world.fail(cache, "cache cold", retryable=False)
        assert world.take("side") == [
            Cancellation("side", side.task_id, run.run_id, 1, "run failed")
        ]
        failed = await world.engine.get_run(run.run_id)
        assert failed.state is RunState.FAILED
        assert {task.name: (task.state, task.error) for task in failed.tasks} == {
            "fetch": (TaskState.FAILED, "no route"),
            "cache": (TaskState.FAILED, "cache cold"),
            "side": (TaskState.SKIPPED, ""),
            "report": (TaskState.SKIPPED, ""),
        }
        assert world.take("main") == world.take("backup") == []


async def test_a_cancelled_run_drops_the_retry_it_was_waiting_for() -> None:
    async with running(EngineSettings()) as world:
        await world.agent("holder", "held")
        await world.agent("retrier", "retry")
        run = await world.trigger(
            TaskSpec("held", capability="held"),
            TaskSpec("retrying", capability="retry", retry_policy=BACKOFF),
        )
        held = world.assignment("holder")
        await world.fail(world.assignment("retrier"), "transient", retryable=True)
        due = await waiting_retry(world, run.run_id, "retrying")

        cancelled = await world.engine.cancel_run(run.run_id)
        await world.settle()
        assert cancelled.state is RunState.CANCELLED
        assert world.take("holder") == [
            Cancellation("holder", held.task_id, run.run_id, 1, "run cancelled")
        ]
        # Past the retry's time and the holder's lease: no retry, no "timed out".
        await world.advance_to(max(due, T0 + DEFAULT_TASK_TIMEOUT))
        assert world.take("holder") == world.take("retrier") == []
        assert await world.engine.get_run(run.run_id) == cancelled
