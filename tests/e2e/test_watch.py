"""WatchWorkflowRun over a real gRPC channel, on both backends: a watcher is sent the run as it
is, then each committed change in order, and the stream ends with the run final; several
watchers each get every change; a watcher that does not read falls back to the latest state
and never holds the run back; a final run is one response; an unknown run is NOT_FOUND."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import auth
import grpc
from conftest import ServerFactory, serve
from helpers import WAIT, Agent, Client, definition, refused, seconds, task
from opscore.v1 import workflow_pb2, workflow_service_pb2, workflow_service_pb2_grpc

FINAL = (workflow_pb2.RUN_STATE_SUCCEEDED, workflow_pb2.RUN_STATE_FAILED)


def watch(client: Client | workflow_service_pb2_grpc.WorkflowServiceStub, run_id: str) -> Any:
    """The WatchWorkflowRun call for `run_id` (iterate it for its responses)."""
    stub = client.workflows if isinstance(client, Client) else client
    return stub.WatchWorkflowRun(workflow_service_pb2.WatchWorkflowRunRequest(run_id=run_id))


async def responses(call: Any) -> AsyncIterator[workflow_service_pb2.WatchWorkflowRunResponse]:
    """The call's responses until it ends, each within `WAIT`."""
    iterator = call.__aiter__()
    while True:
        try:
            # Yielded outside the timeout: a timeout armed while the caller does other things
            # between two responses would cancel the caller.
            async with asyncio.timeout(WAIT):
                response = await anext(iterator)
        except StopAsyncIteration:
            return
        yield response


class Seen:
    """What a watcher learnt: each task's (state, attempt) in the order it was sent, and the
    run's states."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[tuple[int, int]]] = {}
        self.runs: list[int] = []
        self.responses = 0

    def take(self, response: workflow_service_pb2.WatchWorkflowRunResponse) -> None:
        self.responses += 1
        if not self.runs or self.runs[-1] != response.run.state:
            self.runs.append(response.run.state)
        for each in [*response.run.tasks, *response.changed_tasks]:
            self.tasks.setdefault(each.name, []).append((each.state, each.attempt))

    def last(self) -> dict[str, tuple[int, int]]:
        return {name: states[-1] for name, states in self.tasks.items()}


async def follow(call: Any) -> Seen:
    """Read the whole watch."""
    seen = Seen()
    async for response in responses(call):
        seen.take(response)
    return seen


async def test_a_watcher_sees_each_change_in_order_and_the_stream_ends_with_the_run(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        worker = await client.agent("w", capabilities=["work"], connect=False)
        retried = task("first", capability="work")
        retried.retry_policy.CopyFrom(
            # Long enough that the failure's commit never finds the retry due already (a write
            # places a task that is due in its own commit, and the wait would not be seen).
            workflow_pb2.RetryPolicy(max_attempts=2, initial_backoff=seconds(1))
        )
        run = await client.trigger(
            definition=definition(
                "watched", retried, task("second", capability="work", depends_on=["first"])
            )
        )
        seen = Seen()
        call = watch(client, run.run_id)
        reading = responses(call)
        seen.take(await anext(reading))  # the run as it is: nobody has taken anything yet

        async def next_change() -> None:
            seen.take(await anext(reading))

        await worker.connect()
        first = await worker.next_assignment()
        await next_change()
        await worker.fail(first, "once", retryable=True)
        await next_change()
        first = await worker.next_assignment()  # after the backoff
        await next_change()
        await worker.complete(first)
        second = await worker.next_assignment()
        await next_change()
        await worker.complete(second)
        async for response in reading:
            seen.take(response)

    queued, assigned, succeeded = (
        workflow_pb2.TASK_STATE_QUEUED,
        workflow_pb2.TASK_STATE_ASSIGNED,
        workflow_pb2.TASK_STATE_SUCCEEDED,
    )
    assert seen.tasks["first"] == [
        (queued, 0),
        (assigned, 1),
        (queued, 1),  # waiting out its backoff
        (assigned, 2),
        (succeeded, 2),
    ]
    # Made ready and placed by the completion of the first, in one commit.
    assert seen.tasks["second"] == [
        (workflow_pb2.TASK_STATE_PENDING, 0),
        (assigned, 1),
        (succeeded, 1),
    ]
    assert seen.runs == [
        workflow_pb2.RUN_STATE_PENDING,
        workflow_pb2.RUN_STATE_RUNNING,
        workflow_pb2.RUN_STATE_SUCCEEDED,
    ]


async def complete_all(worker: Agent, count: int, output: dict[str, Any]) -> None:
    for _ in range(count):
        await worker.complete(await worker.next_assignment(), output)


async def test_watchers_each_get_every_change_and_one_that_does_not_read_gets_the_latest(
    start_server: ServerFactory, db_url: str
) -> None:
    count = 120
    # Large outputs fill the reader's flow-control window long before the run ends.
    output = {"text": "x" * 4096}
    async with serve(start_server, db_url) as client:
        assert client.server is not None
        # A channel whose receive window stays at gRPC's initial 64 KiB (no growing it to the
        # link's measured capacity): unread, it holds a few responses.
        slow_channel = auth.channel(
            f"127.0.0.1:{client.server.port}", options=[("grpc.http2.bdp_probe", 0)]
        )
        worker = await client.agent("w", capabilities=["work"], max_concurrent_tasks=count)
        many = definition("many", *(task(f"t{i:03}", capability="work") for i in range(count)))
        await worker.disconnect()
        run = await client.trigger(definition=many)
        fast = [asyncio.create_task(follow(watch(client, run.run_id))) for _ in range(2)]
        slow_call = watch(workflow_service_pb2_grpc.WorkflowServiceStub(slow_channel), run.run_id)
        slow_reading = responses(slow_call)
        slow = Seen()
        slow.take(await anext(slow_reading))  # open, then not read until the run is over
        await worker.connect()
        await complete_all(worker, count, output)
        # The run finished while the slow watcher read nothing: it held nothing back.
        await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        seen_fast = await asyncio.gather(*fast)
        async for response in slow_reading:
            slow.take(response)
        await slow_channel.close()

    done = (workflow_pb2.TASK_STATE_SUCCEEDED, 1)
    for seen in [*seen_fast, slow]:
        assert seen.last() == {f"t{i:03}": done for i in range(count)}
        assert seen.runs[-1] == workflow_pb2.RUN_STATE_SUCCEEDED
    for seen in seen_fast:
        # Every task was seen assigned before it was seen done: each change, in order.
        for states in seen.tasks.values():
            assert states[-2:] == [(workflow_pb2.TASK_STATE_ASSIGNED, 1), done], states
    # The slow one was sent the latest state instead of each change it could not take.
    assert slow.responses < min(seen.responses for seen in seen_fast)


async def test_a_finished_run_is_one_response(start_server: ServerFactory, db_url: str) -> None:
    async with serve(start_server, db_url) as client:
        worker = await client.agent("w", capabilities=["work"])
        run = await client.trigger(definition=definition("one", task("only", capability="work")))
        await worker.complete(await worker.next_assignment())
        await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        got = [response async for response in responses(watch(client, run.run_id))]
    assert len(got) == 1
    assert got[0].run.state == workflow_pb2.RUN_STATE_SUCCEEDED
    assert [t.state for t in got[0].run.tasks] == [workflow_pb2.TASK_STATE_SUCCEEDED]


async def test_an_unknown_run_is_not_found_and_a_bad_id_is_refused(
    start_server: ServerFactory, db_url: str
) -> None:
    async with serve(start_server, db_url) as client:
        await refused(
            follow(watch(client, "0123456789abcdef0123456789abcdef")), grpc.StatusCode.NOT_FOUND
        )
        await refused(follow(watch(client, "")), grpc.StatusCode.INVALID_ARGUMENT)
