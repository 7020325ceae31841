"""Failure semantics end to end, over a real server and a real gRPC channel: retries with
backoff, fallbacks, leases that time out or are extended, agents that are lost or come back
within their grace, and cancellations pushed to the agents that hold tasks.

The rules over time are tested on virtual time in tests/engine; these tests show each of them
wired through gRPC and the database, with real timers of a fraction of a second. Timing
assertions are lower bounds only (the machine is noisy), every wait is bounded, and none is
blind: where a test must know that a time has passed without effect, it waits for another timer,
set later, to fire.

Each test runs against one server (on SQLite) and, when OPSCORE_TEST_POSTGRES_URL is set, against
two replicas on one PostgreSQL database (tests/replicas.py's `two_replicas`): there the agents
stream from one replica and every other call goes to the other, so each assignment, result,
cancellation and timer crosses from one replica to the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import helpers
import pytest
from conftest import ServerFactory, blocking, postgres_database, serve
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import (
    WAIT,
    Agent,
    Client,
    as_dict,
    bad_request,
    complete_request,
    definition,
    refused,
    seconds,
    task,
    tasks_of,
)
from opscore.v1 import agent_pb2, workflow_pb2, workflow_service_pb2
from replicas import DEPLOYMENTS, settle_replicas, two_replicas

from opscore.domain.retry import ResolvedRetryPolicy

SHORT = WAIT
"""Seconds to wait for something that should happen soon (a push, a retry after its backoff):
only a failing test waits this long, so it is as long as a loaded machine may need."""

SLACK = 0.01
"""Seconds of rounding allowed when comparing the server's timestamps with the local clock."""


Deployment = Callable[..., AbstractAsyncContextManager[Client]]
"""`async with deployment(**overrides) as client:` a deployment whose servers have `Settings`
fields overridden, and a Client on it."""


@pytest.fixture(params=DEPLOYMENTS)
def deployment(
    request: pytest.FixtureRequest, start_server: ServerFactory, tmp_path: Path
) -> Iterator[Deployment]:
    """One server on a fresh SQLite file, or two replicas on a fresh PostgreSQL database."""
    if request.param == "one server":
        url = f"sqlite:///{tmp_path / 'opscore.db'}"
        yield lambda **overrides: serve(start_server, url, **overrides)
        return
    template = request.getfixturevalue("migrated_postgres")
    with blocking(postgres_database(template)) as url:
        yield lambda **overrides: two_replicas(start_server, url, **overrides)


async def expect_quiet(*agents: Agent) -> None:
    """helpers.expect_quiet, once every replica of the deployment has settled."""
    await settle_replicas(agents[0].client)
    await helpers.expect_quiet(*agents)


# Helpers -------------------------------------------------------------------------------------


def policy(
    max_attempts: int = 0,
    initial_backoff: float | None = None,
    backoff_multiplier: float = 0.0,
    max_backoff: float | None = None,
) -> workflow_pb2.RetryPolicy:
    """A RetryPolicy; fields left at None or 0 are unset (the server's defaults apply)."""
    message = workflow_pb2.RetryPolicy(
        max_attempts=max_attempts, backoff_multiplier=backoff_multiplier
    )
    if initial_backoff is not None:
        message.initial_backoff.CopyFrom(seconds(initial_backoff))
    if max_backoff is not None:
        message.max_backoff.CopyFrom(seconds(max_backoff))
    return message


def spec(
    name: str,
    *,
    capability: str = "",
    depends_on: tuple[str, ...] = (),
    fallback: str = "",
    timeout: float | None = None,
    retry: workflow_pb2.RetryPolicy | None = None,
) -> workflow_pb2.TaskSpec:
    """A TaskSpec with an optional timeout (seconds) and retry policy."""
    message = task(name, capability=capability, depends_on=depends_on, fallback=fallback)
    if timeout is not None:
        message.timeout.CopyFrom(seconds(timeout))
    if retry is not None:
        message.retry_policy.CopyFrom(retry)
    return message


def fetch_with_fallback(
    name: str, retry: workflow_pb2.RetryPolicy | None = None
) -> workflow_pb2.WorkflowDefinition:
    """A definition: `fetch` (with `retry`) and its fallback `cache`, then `report` depending on
    `fetch`."""
    return definition(
        name,
        spec("fetch", fallback="cache", retry=retry),
        spec("cache"),
        spec("report", depends_on=("fetch",)),
    )


def retry_settings(
    max_attempts: int = 3, initial_backoff: float = 0.05, max_backoff: float = 1.0
) -> ResolvedRetryPolicy:
    """The server's retry defaults, with short backoffs."""
    return ResolvedRetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=timedelta(seconds=initial_backoff),
        backoff_multiplier=2.0,
        max_backoff=timedelta(seconds=max_backoff),
    )


def when(message: Timestamp) -> datetime:
    """A Timestamp as an aware datetime."""
    return message.ToDatetime(tzinfo=UTC)


def now() -> datetime:
    """The local wall clock (the server runs on the same machine)."""
    return datetime.now(UTC)


async def task_of(client: Client, run_id: str, name: str) -> workflow_pb2.TaskRun:
    """One task of a run, as GetWorkflowRun shows it now."""
    return tasks_of(await client.run(run_id))[name]


async def wait_task(
    client: Client,
    run_id: str,
    name: str,
    predicate: Callable[[workflow_pb2.TaskRun], bool],
    timeout: float = SHORT,
) -> workflow_pb2.TaskRun:
    """Poll GetWorkflowRun until `predicate` holds of the named task; fails after `timeout`."""
    async with asyncio.timeout(timeout):
        while True:
            found = await task_of(client, run_id, name)
            if predicate(found):
                return found
            await asyncio.sleep(0.02)


async def wait_failed_finally(
    client: Client, run_id: str, name: str, attempt: int, error: str
) -> workflow_pb2.WorkflowRun:
    """Wait until the run has FAILED with its task `name` failed finally: at `attempt`, with
    `error`, and no retry pending. Returns the failed run."""
    failed = await client.wait_run(run_id, workflow_pb2.RUN_STATE_FAILED)
    job = tasks_of(failed)[name]
    assert (job.state, job.attempt, job.error) == (workflow_pb2.TASK_STATE_FAILED, attempt, error)
    assert not job.HasField("not_before")
    return failed


def assert_cancels(
    cancellation: workflow_pb2.TaskCancellation,
    assignment: workflow_pb2.TaskAssignment,
    reason: str,
) -> None:
    """The cancellation names the assignment's task, run and attempt, with `reason`."""
    assert (
        cancellation.task_id,
        cancellation.run_id,
        cancellation.attempt,
        cancellation.reason,
    ) == (assignment.task_id, assignment.run_id, assignment.attempt, reason)


def fail_request(
    assignment: workflow_pb2.TaskAssignment, agent_id: str, error: str = "late"
) -> workflow_service_pb2.FailTaskRequest:
    """A FailTaskRequest for an assignment, from any agent."""
    return workflow_service_pb2.FailTaskRequest(
        task_id=assignment.task_id,
        agent_id=agent_id,
        attempt=assignment.attempt,
        error=error,
        retryable=True,
    )


def extend(
    client: Client,
    assignment: workflow_pb2.TaskAssignment,
    agent_id: str,
    extend_by: Duration | None,
    *,
    attempt: int | None = None,
) -> Awaitable[workflow_service_pb2.ExtendTaskLeaseResponse]:
    """An ExtendTaskLease call for an assignment (extend_by None leaves the field unset)."""
    request = workflow_service_pb2.ExtendTaskLeaseRequest(
        task_id=assignment.task_id,
        agent_id=agent_id,
        attempt=assignment.attempt if attempt is None else attempt,
    )
    if extend_by is not None:
        request.extend_by.CopyFrom(extend_by)
    return client.workflows.ExtendTaskLease(request)


async def refuse_late_results(
    client: Client,
    assignment: workflow_pb2.TaskAssignment,
    agent_id: str,
    *,
    server_error: str = "",
) -> None:
    """CompleteTask, FailTask and ExtendTaskLease for an attempt the agent no longer holds are
    FAILED_PRECONDITION and change nothing. With `server_error` (the error the server recorded
    when it failed the attempt itself), a late FailTask quoting that same text is refused too:
    the agent never reported that failure, so it is no repeat of one."""
    before = await client.run(assignment.run_id)
    await refused(
        client.workflows.CompleteTask(
            complete_request(assignment, agent_id, output={"late": True})
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"late CompleteTask from {agent_id} for attempt {assignment.attempt}",
    )
    for error in ("late", server_error) if server_error else ("late",):
        await refused(
            client.workflows.FailTask(fail_request(assignment, agent_id, error)),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"late FailTask(error={error!r}) from {agent_id} for attempt {assignment.attempt}",
        )
    await refused(
        extend(client, assignment, agent_id, seconds(5)),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"late ExtendTaskLease from {agent_id} for attempt {assignment.attempt}",
    )
    assert await client.run(assignment.run_id) == before


# 1. Retries with backoff ---------------------------------------------------------------------


async def test_retryable_failures_back_off_and_third_attempt_succeeds(
    deployment: Deployment,
) -> None:
    flaky = spec(
        "flaky",
        capability="flaky",
        retry=policy(max_attempts=3, initial_backoff=1, backoff_multiplier=2, max_backoff=2),
    )
    async with deployment() as client:
        worker = await client.agent("worker", capabilities=["flaky"])
        run = await client.trigger(
            definition=definition("retry", flaky, spec("after", depends_on=("flaky",)))
        )
        assignment = await worker.next_assignment()
        assert (assignment.task_name, assignment.attempt, assignment.redelivered) == (
            "flaky",
            1,
            False,
        )
        first_id = assignment.task_id

        # Attempt n fails: the retry waits between half and all of 1 s x 2^(n-1), long enough
        # for the task to be seen waiting for it on a loaded machine.
        for failed, backoff in ((1, 1.0), (2, 2.0)):
            started = time.monotonic()
            before = now()
            await worker.fail(assignment, f"blip {failed}", retryable=True)
            after = now()
            waiting = await task_of(client, run.run_id, "flaky")
            assert waiting.state == workflow_pb2.TASK_STATE_QUEUED, waiting
            assert (waiting.attempt, waiting.error) == (failed, f"blip {failed}")
            assert waiting.HasField("not_before"), waiting
            not_before = when(waiting.not_before)
            assert not_before >= before + timedelta(seconds=backoff / 2 - SLACK), waiting
            # Not a timing bound: the server drew the delay before it answered FailTask.
            assert not_before <= after + timedelta(seconds=backoff + SLACK), waiting
            assert (await client.run(run.run_id)).state == workflow_pb2.RUN_STATE_RUNNING

            assignment = await worker.next_assignment()
            gap = time.monotonic() - started
            assert gap >= backoff / 2, (failed, gap)
            assert (assignment.task_id, assignment.attempt) == (first_id, failed + 1)
            assert not assignment.redelivered
            assert now() >= not_before - timedelta(seconds=SLACK)
            held = await task_of(client, run.run_id, "flaky")
            assert (held.state, held.attempt, held.agent_id) == (
                workflow_pb2.TASK_STATE_ASSIGNED,
                failed + 1,
                "worker",
            )
            assert not held.HasField("not_before"), held
            assert held.deadline == assignment.deadline

        await worker.complete(assignment, {"third": "time lucky"})
        after_task = await worker.next_assignment()
        assert after_task.task_name == "after"
        assert as_dict(after_task.dependency_outputs["flaky"]) == {"third": "time lucky"}
        await worker.complete(after_task)
        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        finished = tasks_of(done)["flaky"]
        assert (finished.state, finished.attempt) == (workflow_pb2.TASK_STATE_SUCCEEDED, 3)
        assert as_dict(finished.output) == {"third": "time lucky"}
        await expect_quiet(worker)


async def test_non_retryable_failure_fails_at_once(deployment: Deployment) -> None:
    async with deployment(retry=retry_settings()) as client:
        worker = await client.agent("worker")
        run = await client.trigger(
            definition=definition(
                "fatal",
                spec("job", retry=policy(max_attempts=5, initial_backoff=0.05)),
                spec("next", depends_on=("job",)),
            )
        )
        assignment = await worker.next_assignment()
        await worker.fail(assignment, "bad input", retryable=False)

        failed = await wait_failed_finally(client, run.run_id, "job", 1, "bad input")
        assert tasks_of(failed)["next"].state == workflow_pb2.TASK_STATE_SKIPPED
        # No second attempt is sent, nor waits for its time (see wait_failed_finally).
        await expect_quiet(worker)
        assert await client.run(run.run_id) == failed


async def test_exhausting_max_attempts_fails_the_task_finally(deployment: Deployment) -> None:
    # The task sets max_attempts only: the backoffs are the server's (0.05 s, then 0.1 s).
    async with deployment(retry=retry_settings(max_attempts=9)) as client:
        worker = await client.agent("worker")
        run = await client.trigger(
            definition=definition("exhaust", spec("job", retry=policy(max_attempts=2)))
        )
        first = await worker.next_assignment()
        await worker.fail(first, "try again", retryable=True)
        second = await worker.next_assignment()
        assert (second.task_id, second.attempt) == (first.task_id, 2)
        await worker.fail(second, "still broken", retryable=True)

        await wait_failed_finally(client, run.run_id, "job", 2, "still broken")
        await expect_quiet(worker)


async def test_server_default_max_attempts_applies_to_tasks_without_policy(
    deployment: Deployment,
) -> None:
    async with deployment(retry=retry_settings(max_attempts=2)) as client:
        worker = await client.agent("worker")
        run = await client.trigger(definition=definition("defaults", spec("job")))
        first = await worker.next_assignment()
        await worker.fail(first, "one", retryable=True)
        second = await worker.next_assignment()
        assert second.attempt == 2
        await worker.fail(second, "two", retryable=True)
        failed = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_FAILED)
        assert (failed.tasks[0].attempt, failed.tasks[0].error) == (2, "two")
        await expect_quiet(worker)


# 2. Fallbacks --------------------------------------------------------------------------------


async def test_fallback_runs_after_final_failure_and_feeds_dependents(
    deployment: Deployment,
) -> None:
    async with deployment(retry=retry_settings()) as client:
        # Two slots: a fallback dispatched too early would arrive alongside the main task.
        worker = await client.agent("worker", max_concurrent_tasks=2)
        run = await client.trigger(
            definition=fetch_with_fallback("with-fallback", retry=policy(max_attempts=2))
        )
        first = await worker.next_assignment()
        assert (first.task_name, first.fallback_for, first.fallback_error) == ("fetch", "", "")
        await expect_quiet(worker)
        states = {name: t.state for name, t in tasks_of(await client.run(run.run_id)).items()}
        assert states == {
            "fetch": workflow_pb2.TASK_STATE_ASSIGNED,
            "cache": workflow_pb2.TASK_STATE_PENDING,
            "report": workflow_pb2.TASK_STATE_PENDING,
        }

        # A retryable failure with attempts left retries the task, not the fallback.
        await worker.fail(first, "upstream 502", retryable=True)
        second = await worker.next_assignment()
        assert (second.task_name, second.attempt) == ("fetch", 2)
        assert (await task_of(client, run.run_id, "cache")).state == (
            workflow_pb2.TASK_STATE_PENDING
        )

        await worker.fail(second, "upstream 503", retryable=True)
        stand_in = await worker.next_assignment()
        assert (stand_in.task_name, stand_in.attempt, stand_in.redelivered) == ("cache", 1, False)
        assert (stand_in.fallback_for, stand_in.fallback_error) == ("fetch", "upstream 503")
        assert dict(stand_in.dependency_outputs) == {}
        during = await client.run(run.run_id)
        assert during.state == workflow_pb2.RUN_STATE_RUNNING
        tasks = tasks_of(during)
        assert (tasks["fetch"].state, tasks["fetch"].error, tasks["fetch"].attempt) == (
            workflow_pb2.TASK_STATE_FAILED,
            "upstream 503",
            2,
        )
        assert tasks["cache"].state == workflow_pb2.TASK_STATE_ASSIGNED
        assert tasks["report"].state == workflow_pb2.TASK_STATE_PENDING

        await worker.complete(stand_in, {"source": "cache", "rows": 7})
        report = await worker.next_assignment()
        assert (report.task_name, report.fallback_for, report.fallback_error) == ("report", "", "")
        outputs = {name: as_dict(out) for name, out in report.dependency_outputs.items()}
        assert outputs == {"fetch": {"source": "cache", "rows": 7}}
        await worker.complete(report, {"ok": True})

        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        final = {name: t.state for name, t in tasks_of(done).items()}
        assert final == {
            "fetch": workflow_pb2.TASK_STATE_FAILED,
            "cache": workflow_pb2.TASK_STATE_SUCCEEDED,
            "report": workflow_pb2.TASK_STATE_SUCCEEDED,
        }
        assert as_dict(tasks_of(done)["cache"].output) == {"source": "cache", "rows": 7}
        await expect_quiet(worker)


async def test_failing_fallback_fails_the_run_and_cancels_other_holders(
    deployment: Deployment,
) -> None:
    async with deployment(retry=retry_settings()) as client:
        main = await client.agent("main-agent", capabilities=["main"])
        backup = await client.agent("backup-agent", capabilities=["backup"])
        side = await client.agent("side-agent", capabilities=["side"])
        run = await client.trigger(
            definition=definition(
                "fallback-fails",
                spec("fetch", capability="main", fallback="cache"),
                spec("cache", capability="backup"),
                spec("side", capability="side"),
                spec("report", capability="main", depends_on=("fetch",)),
            )
        )
        fetch = await main.next_assignment()
        side_task = await side.next_assignment()
        assert (fetch.task_name, side_task.task_name) == ("fetch", "side")
        await expect_quiet(backup)

        await main.fail(fetch, "no route", retryable=False)
        cache = await backup.next_assignment()
        assert (cache.task_name, cache.fallback_for, cache.fallback_error) == (
            "cache",
            "fetch",
            "no route",
        )
        assert (await client.run(run.run_id)).state == workflow_pb2.RUN_STATE_RUNNING

        await backup.fail(cache, "cache cold", retryable=False)
        assert_cancels(await side.next_cancellation(SHORT), side_task, "run failed")
        failed = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_FAILED)
        tasks = tasks_of(failed)
        assert (tasks["fetch"].state, tasks["fetch"].error) == (
            workflow_pb2.TASK_STATE_FAILED,
            "no route",
        )
        assert (tasks["cache"].state, tasks["cache"].error) == (
            workflow_pb2.TASK_STATE_FAILED,
            "cache cold",
        )
        assert tasks["side"].state == workflow_pb2.TASK_STATE_SKIPPED
        assert tasks["report"].state == workflow_pb2.TASK_STATE_SKIPPED
        await refuse_late_results(client, side_task, "side-agent")
        await expect_quiet(main, backup, side)


async def test_succeeding_task_skips_its_fallback(deployment: Deployment) -> None:
    async with deployment(retry=retry_settings()) as client:
        worker = await client.agent("worker", max_concurrent_tasks=2)
        run = await client.trigger(definition=fetch_with_fallback("fallback-unused"))
        fetch = await worker.next_assignment()
        assert fetch.task_name == "fetch"
        await worker.complete(fetch, {"source": "origin"})
        report = await worker.next_assignment()
        assert report.task_name == "report"
        assert as_dict(report.dependency_outputs["fetch"]) == {"source": "origin"}
        cache = await task_of(client, run.run_id, "cache")
        assert cache.state == workflow_pb2.TASK_STATE_SKIPPED
        assert (cache.attempt, cache.agent_id) == (0, "")
        await worker.complete(report)

        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        final = {name: t.state for name, t in tasks_of(done).items()}
        assert final == {
            "fetch": workflow_pb2.TASK_STATE_SUCCEEDED,
            "cache": workflow_pb2.TASK_STATE_SKIPPED,
            "report": workflow_pb2.TASK_STATE_SUCCEEDED,
        }
        await expect_quiet(worker)


INVALID_FALLBACKS = [
    pytest.param(
        definition("wf", task("a"), task("b", fallback="c"), task("c", depends_on=["a"])),
        {"definition.tasks[1].fallback", "definition.tasks[2].depends_on"},
        id="fallback-has-depends-on",
    ),
    pytest.param(
        definition("wf", task("a", fallback="b"), task("b"), task("c", depends_on=["b"])),
        {
            "definition.tasks[0].fallback",
            "definition.tasks[2].depends_on",
            "definition.tasks[2].depends_on[0]",
        },
        id="fallback-is-depended-on",
    ),
    pytest.param(
        definition("wf", task("a", fallback="b"), task("b", fallback="c"), task("c")),
        {"definition.tasks[0].fallback", "definition.tasks[1].fallback"},
        id="fallback-has-fallback",
    ),
    pytest.param(
        definition("wf", task("a", fallback="c"), task("b", fallback="c"), task("c")),
        {"definition.tasks[0].fallback", "definition.tasks[1].fallback"},
        id="fallback-of-two-tasks",
    ),
]


async def _stored(client: Client) -> tuple[int, int]:
    """How many definitions and runs are stored."""
    definitions = await client.workflows.ListWorkflowDefinitions(
        workflow_service_pb2.ListWorkflowDefinitionsRequest(page_size=1000)
    )
    runs = await client.workflows.ListWorkflowRuns(
        workflow_service_pb2.ListWorkflowRunsRequest(page_size=1000)
    )
    return len(definitions.definitions), len(runs.runs)


@pytest.mark.parametrize("how", ["create", "trigger-inline"])
@pytest.mark.parametrize(("bad", "allowed"), INVALID_FALLBACKS)
async def test_invalid_fallback_is_refused_naming_the_field(
    client: Client, bad: workflow_pb2.WorkflowDefinition, allowed: set[str], how: str
) -> None:
    call = client.create(bad) if how == "create" else client.trigger(definition=bad)
    error = await refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    violations = bad_request(error)
    assert violations, error.details()
    assert set(violations) <= allowed, violations
    message = error.details() or ""
    for field in violations:
        assert field in message, (field, message)
        assert violations[field], f"{field} has no description"
    assert await _stored(client) == (0, 0)


# 3. Leases: timeouts and extensions ----------------------------------------------------------


async def test_expired_lease_cancels_holder_and_retries_with_next_attempt(
    deployment: Deployment,
) -> None:
    async with deployment(
        default_task_timeout=timedelta(seconds=0.3),
        retry=retry_settings(initial_backoff=1.0),  # long enough to see the task wait for it
    ) as client:
        slow = await client.agent("slow", capabilities=["job"])  # idle longest: gets attempt 1
        spare = await client.agent("spare", capabilities=["job"])
        run = await client.trigger(definition=definition("lease", spec("job", capability="job")))
        first = await slow.next_assignment()
        assert first.attempt == 1
        deadline = when(first.deadline)
        held = await task_of(client, run.run_id, "job")
        assert held.state == workflow_pb2.TASK_STATE_ASSIGNED
        assert held.deadline == first.deadline
        assert abs(deadline - when(held.assigned_at) - timedelta(seconds=0.3)) <= timedelta(
            seconds=SLACK
        )
        # The slow agent says it is busy, so attempt 2 can only go to the spare.
        await slow.report(agent_pb2.REPORTED_AGENT_STATE_BUSY, "thinking")
        await expect_quiet(spare)

        cancellation = await slow.next_cancellation(SHORT)
        assert now() >= deadline - timedelta(seconds=SLACK)
        assert_cancels(cancellation, first, "timed out")
        waiting = await task_of(client, run.run_id, "job")
        assert (waiting.state, waiting.attempt, waiting.error) == (
            workflow_pb2.TASK_STATE_QUEUED,
            1,
            "timed out",
        )
        assert waiting.HasField("not_before")
        assert not waiting.HasField("deadline")
        assert (await slow.get()).running_tasks == 0

        second = await spare.next_assignment()
        assert (second.task_id, second.attempt, second.redelivered) == (first.task_id, 2, False)
        assert when(second.deadline) > deadline

        # The slow agent's result for attempt 1 comes too late and changes nothing.
        await refuse_late_results(client, first, "slow", server_error="timed out")
        retried = await task_of(client, run.run_id, "job")
        assert (retried.state, retried.attempt, retried.agent_id) == (
            workflow_pb2.TASK_STATE_ASSIGNED,
            2,
            "spare",
        )

        await spare.complete(second, {"by": "spare"})
        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        job = tasks_of(done)["job"]
        assert (job.attempt, job.agent_id, as_dict(job.output)) == (2, "spare", {"by": "spare"})
        await expect_quiet(slow, spare)


@pytest.mark.parametrize("then", ["retry-waits", "finally-failed"])
@pytest.mark.parametrize("how", ["timed-out", "agent-lost"])
async def test_late_results_for_attempt_the_server_failed_are_refused(
    deployment: Deployment, how: str, then: str
) -> None:
    """The server fails the attempt itself (its lease ran out, or its agent was lost); the task
    then waits for its retry, or has failed finally. The agent never reported that failure, so
    its late results for the attempt are refused, even a FailTask quoting the server's error."""
    async with deployment(
        agent_grace=timedelta(seconds=0.1),
        retry=retry_settings(initial_backoff=4.0, max_backoff=4.0),  # the retry waits >= 2 s
    ) as client:
        worker = await client.agent("worker")
        job = spec(
            "job",
            timeout=0.1 if how == "timed-out" else 60,
            retry=policy(max_attempts=3 if then == "retry-waits" else 1),
        )
        run = await client.trigger(definition=definition("late", job))
        first = await worker.next_assignment()
        if how == "timed-out":
            assert_cancels(await worker.next_cancellation(SHORT), first, "timed out")
            expected_error = "timed out"
        else:
            await worker.disconnect()
            expected_error = "agent lost"
        failed = await wait_task(
            client, run.run_id, "job", lambda t: t.state != workflow_pb2.TASK_STATE_ASSIGNED
        )
        expected_state = (
            workflow_pb2.TASK_STATE_QUEUED
            if then == "retry-waits"
            else workflow_pb2.TASK_STATE_FAILED
        )
        assert (failed.state, failed.attempt, failed.error) == (expected_state, 1, expected_error)
        assert failed.HasField("not_before") == (then == "retry-waits")

        await refuse_late_results(client, first, "worker", server_error=expected_error)
        assert await task_of(client, run.run_id, "job") == failed
        if then == "retry-waits":
            await client.workflows.CancelWorkflowRun(
                workflow_service_pb2.CancelWorkflowRunRequest(run_id=run.run_id)
            )


async def test_extended_lease_keeps_task_past_its_original_deadline(deployment: Deployment) -> None:
    # The TaskSpec's own timeout (0.2 s) overrides the server default (60 s).
    async with deployment(default_task_timeout=timedelta(seconds=60)) as client:
        holder = await client.agent("holder", capabilities=["long"])
        other = await client.agent("other", capabilities=["elsewhere"])
        run = await client.trigger(
            definition=definition("long", spec("job", capability="long", timeout=0.2))
        )
        assignment = await holder.next_assignment()
        original = when(assignment.deadline)
        held = await task_of(client, run.run_id, "job")
        assert abs(original - when(held.assigned_at) - timedelta(seconds=0.2)) <= timedelta(
            seconds=SLACK
        )

        asked = now()
        extended = when((await extend(client, assignment, "holder", seconds(60))).deadline)
        assert extended >= asked + timedelta(seconds=60 - SLACK)
        assert extended > original
        assert when((await task_of(client, run.run_id, "job")).deadline) == extended

        # A shorter extension never moves the deadline earlier.
        again = await extend(client, assignment, "holder", seconds(0.01))
        assert when(again.deadline) == extended

        # Someone else, or another attempt, may not extend it.
        await refused(
            extend(client, assignment, "other", seconds(5)), grpc.StatusCode.FAILED_PRECONDITION
        )
        await refused(
            extend(client, assignment, "holder", seconds(5), attempt=2),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert when((await task_of(client, run.run_id, "job")).deadline) == extended

        # A lease that ends after the original deadline: once it has ended, the timers have
        # gone past that deadline, and the extended lease has outlived it.
        marker = await client.trigger(
            definition=definition("marker", spec("mark", capability="elsewhere", timeout=0.3))
        )
        mark = await other.next_assignment()
        assert when(mark.deadline) > original
        assert_cancels(await other.next_cancellation(SHORT), mark, "timed out")
        await expect_quiet(holder, other)
        still = await task_of(client, run.run_id, "job")
        assert (still.state, still.attempt, still.agent_id) == (
            workflow_pb2.TASK_STATE_ASSIGNED,
            1,
            "holder",
        )
        assert when(still.deadline) == extended

        await holder.complete(assignment, {"long": "done"})
        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        job = tasks_of(done)["job"]
        assert (job.attempt, job.error, as_dict(job.output)) == (1, "", {"long": "done"})
        await client.workflows.CancelWorkflowRun(
            workflow_service_pb2.CancelWorkflowRunRequest(run_id=marker.run_id)
        )


async def test_extend_lease_refuses_bad_extend_by(client: Client) -> None:
    holder = await client.agent("holder")
    run = await client.trigger(definition=definition("lease", task("job")))
    assignment = await holder.next_assignment()
    before = await task_of(client, run.run_id, "job")
    for extend_by in (None, seconds(0), seconds(-1), seconds(-0.001), seconds(365 * 86400)):
        error = await refused(
            extend(client, assignment, "holder", extend_by), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert set(bad_request(error)) == {"extend_by"}, (extend_by, error.details())
        assert "extend_by" in (error.details() or "")
    assert await task_of(client, run.run_id, "job") == before
    await holder.complete(assignment)
    await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)


# 4. Agent loss -------------------------------------------------------------------------------


async def test_lost_agent_task_is_retried_elsewhere_after_the_grace(deployment: Deployment) -> None:
    async with deployment(
        agent_grace=timedelta(seconds=0.2),
        retry=retry_settings(initial_backoff=1.0),  # long enough to see the task wait for it
    ) as client:
        fragile = await client.agent("fragile", capabilities=["job"])  # idle longest
        steady = await client.agent("steady", capabilities=["job"])
        run = await client.trigger(definition=definition("lost", spec("job", capability="job")))
        first = await fragile.next_assignment()
        assert first.attempt == 1

        cut = time.monotonic()
        await fragile.disconnect()
        offline = await fragile.wait_until(lambda a: not a.connected, SHORT)
        assert offline.state == agent_pb2.AGENT_STATE_OFFLINE
        kept = await task_of(client, run.run_id, "job")
        assert (kept.state, kept.attempt, kept.agent_id) == (
            workflow_pb2.TASK_STATE_ASSIGNED,
            1,
            "fragile",
        )
        await expect_quiet(steady)

        lost = await wait_task(
            client, run.run_id, "job", lambda t: t.state != workflow_pb2.TASK_STATE_ASSIGNED
        )
        assert time.monotonic() - cut >= 0.2
        assert (lost.state, lost.attempt, lost.error) == (
            workflow_pb2.TASK_STATE_QUEUED,
            1,
            "agent lost",
        )
        assert lost.HasField("not_before")

        second = await steady.next_assignment()
        assert (second.task_id, second.attempt, second.redelivered) == (first.task_id, 2, False)
        await refuse_late_results(client, first, "fragile", server_error="agent lost")
        await steady.complete(second, {"by": "steady"})
        done = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        job = tasks_of(done)["job"]
        assert (job.attempt, job.agent_id, as_dict(job.output)) == (2, "steady", {"by": "steady"})
        assert (await fragile.get()).running_tasks == 0
        assert fragile.events.empty()


async def test_agent_reconnecting_within_grace_gets_same_attempt_redelivered(
    deployment: Deployment,
) -> None:
    async with deployment(
        agent_grace=timedelta(seconds=0.3),
        retry=retry_settings(initial_backoff=4.0, max_backoff=4.0),
    ) as client:
        roamer = await client.agent("roamer", capabilities=["job"])  # idle longest
        steady = await client.agent("steady", capabilities=["job"])
        marker = await client.agent("marker", capabilities=["mark"])
        run = await client.trigger(
            definition=definition(
                "back", spec("job", capability="job"), spec("mark", capability="mark")
            )
        )
        first = await roamer.next_assignment()
        await marker.next_assignment()

        await roamer.disconnect()
        await roamer.wait_until(lambda a: a.state == agent_pb2.AGENT_STATE_OFFLINE, SHORT)
        await expect_quiet(steady)
        away = await task_of(client, run.run_id, "job")
        assert (away.state, away.attempt, away.agent_id) == (
            workflow_pb2.TASK_STATE_ASSIGNED,
            1,
            "roamer",
        )

        await roamer.connect()
        again = await roamer.next_assignment()
        assert again.redelivered
        assert (again.task_id, again.run_id, again.task_name, again.attempt) == (
            first.task_id,
            first.run_id,
            first.task_name,
            1,
        )
        assert again.deadline == first.deadline

        # A grace that starts later than the roamer's: once it has ended (the marker loses
        # its task), the roamer's has ended too, and it lost nothing.
        await marker.disconnect()
        await wait_task(
            client,
            run.run_id,
            "mark",
            lambda t: t.state == workflow_pb2.TASK_STATE_QUEUED,
        )
        await expect_quiet(roamer, steady)
        still = await task_of(client, run.run_id, "job")
        assert (still.state, still.attempt, still.agent_id, still.error) == (
            workflow_pb2.TASK_STATE_ASSIGNED,
            1,
            "roamer",
            "",
        )
        assert (await roamer.get()).connected

        await roamer.complete(again, {"back": True})
        job = await wait_task(
            client, run.run_id, "job", lambda t: t.state == workflow_pb2.TASK_STATE_SUCCEEDED
        )
        assert (job.attempt, job.agent_id, job.error) == (1, "roamer", "")
        assert as_dict(job.output) == {"back": True}


# 5. Cancellations pushed to holders ----------------------------------------------------------


async def test_cancel_run_tells_holder_and_drops_waiting_retry(deployment: Deployment) -> None:
    async with deployment(retry=retry_settings(initial_backoff=4.0)) as client:
        holder = await client.agent("holder", capabilities=["held"])
        retrier = await client.agent("retrier", capabilities=["retry"])
        run = await client.trigger(
            definition=definition(
                "to-cancel",
                spec("held", capability="held"),
                spec("retrying", capability="retry"),
                spec("pending", depends_on=("held",)),
            )
        )
        held = await holder.next_assignment()
        flaky = await retrier.next_assignment()
        await retrier.fail(flaky, "transient", retryable=True)
        waiting = await task_of(client, run.run_id, "retrying")
        assert waiting.state == workflow_pb2.TASK_STATE_QUEUED
        assert waiting.HasField("not_before")

        response = await client.workflows.CancelWorkflowRun(
            workflow_service_pb2.CancelWorkflowRunRequest(run_id=run.run_id)
        )
        cancelled = response.run
        assert cancelled.state == workflow_pb2.RUN_STATE_CANCELLED
        for name, task_run in tasks_of(cancelled).items():
            assert task_run.state == workflow_pb2.TASK_STATE_CANCELLED, name

        assert_cancels(await holder.next_cancellation(SHORT), held, "run cancelled")
        # (That the retry and the holder's lease are dropped for good: see tests/engine.)
        await expect_quiet(holder, retrier)
        assert await client.run(run.run_id) == cancelled
        await refuse_late_results(client, held, "holder")
        assert (await holder.get()).running_tasks == 0
        await refused(
            client.workflows.CancelWorkflowRun(
                workflow_service_pb2.CancelWorkflowRunRequest(run_id=run.run_id)
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )


@pytest.mark.parametrize("how", ["not-retryable", "attempts-exhausted", "timed-out", "agent-lost"])
async def test_final_failure_cancels_other_holders_with_run_failed(
    deployment: Deployment, how: str
) -> None:
    async with deployment(agent_grace=timedelta(seconds=0.1), retry=retry_settings()) as client:
        left_agent = await client.agent("left-agent", capabilities=["left"])
        right_agent = await client.agent("right-agent", capabilities=["right"])
        run = await client.trigger(
            definition=definition(
                "fan-in",
                spec(
                    "left",
                    capability="left",
                    timeout=0.1 if how == "timed-out" else 60,
                    retry=policy(max_attempts=1),
                ),
                spec("right", capability="right", timeout=60),
                spec("join", depends_on=("left", "right")),
            )
        )
        left = await left_agent.next_assignment()
        right = await right_agent.next_assignment()

        if how == "timed-out":
            expected_error = "timed out"
            assert_cancels(await left_agent.next_cancellation(SHORT), left, "timed out")
        elif how == "agent-lost":
            expected_error = "agent lost"
            await left_agent.disconnect()
        else:
            expected_error = "boom"
            await left_agent.fail(left, "boom", retryable=how == "attempts-exhausted")

        assert_cancels(await right_agent.next_cancellation(SHORT), right, "run failed")
        failed = await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_FAILED)
        tasks = tasks_of(failed)
        assert (tasks["left"].state, tasks["left"].attempt, tasks["left"].error) == (
            workflow_pb2.TASK_STATE_FAILED,
            1,
            expected_error,
        )
        assert tasks["right"].state == workflow_pb2.TASK_STATE_SKIPPED
        assert tasks["join"].state == workflow_pb2.TASK_STATE_SKIPPED
        await refuse_late_results(client, right, "right-agent")
        if how in ("timed-out", "agent-lost"):  # (the agent's own FailTask again is OK)
            await refuse_late_results(client, left, "left-agent")
        assert (await right_agent.get()).running_tasks == 0
        await expect_quiet(left_agent, right_agent)
