"""Crash recovery: `opscore serve` is killed with SIGKILL in the middle of a load and started again
on the same database. Nothing it acknowledged is lost, no result is recorded twice, and the load
runs to the end once the agents are back.

The server runs as a separate process (a `ServerProcess` of tests/processes.py); the
agents are scripted ones (tests/helpers.py) in the test's process, each completing every
assignment at once with an output naming itself, the task and the attempt, and keeping every
completion the server acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import auth
import grpc
from helpers import Agent, Client, as_dict, definition, struct, task
from opscore.v1 import workflow_pb2, workflow_service_pb2
from processes import ServerProcess, free_port

SETTINGS = {
    "OPSCORE_AGENT_GRACE": "1",
    "OPSCORE_DEFAULT_TASK_TIMEOUT": "10",
    "OPSCORE_LOG_FORMAT": "json",
    "OPSCORE_LOG_LEVEL": "DEBUG",
}
"""The environment both lives of the server run with."""

AGENTS = 4
SLOTS = 2
"""Agents, and the tasks each runs at once."""

RUNS = 8
"""Runs of the load: chains and fan-outs, alternately, 10 tasks each."""

KILL_AT = 0.3
"""Share of the load's tasks acknowledged when the server is killed."""

LOAD_WAIT = 10.0
"""Seconds the load may take to reach the kill."""

FINISH_WAIT = 15.0
"""Seconds the restarted server may take to finish every run."""

CALL_TIMEOUT = 5.0
"""Deadline of each unary call an agent makes."""

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]
"""Agents retry their connection often, so that they are back soon after the restart."""


def chain(name: str, length: int) -> workflow_pb2.WorkflowDefinition:
    """`length` tasks, each depending on the one before."""
    return definition(
        name,
        *(
            task(f"step-{i}", depends_on=[f"step-{i - 1}"] if i else [], input={"i": i})
            for i in range(length)
        ),
    )


def fan_out(name: str, width: int) -> workflow_pb2.WorkflowDefinition:
    """One task, `width` tasks depending on it, and one depending on all of those."""
    branches = [f"branch-{i}" for i in range(width)]
    return definition(
        name,
        task("split"),
        *(task(branch, depends_on=["split"], input={"branch": branch}) for branch in branches),
        task("join", depends_on=branches),
    )


@dataclass(frozen=True)
class Completion:
    """A CompleteTask the server answered OK."""

    agent_id: str
    task_id: str
    attempt: int
    output: dict[str, Any]
    before_kill: bool
    """Whether the OK came back before the SIGKILL was sent."""


@dataclass
class Load:
    """What the agents did and saw, shared by them and the test."""

    tasks: int
    phase: str = "before kill"
    """"before kill", then "outage" (from just before the SIGKILL), then "restarted"."""
    completions: list[Completion] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)
    """(task_id, attempt) of completions answered FAILED_PRECONDITION after the restart."""
    lost: int = 0
    """Completions that failed with the server gone: their outcome is unknown to the agent."""
    retried: int = 0
    """Completions of unknown outcome sent again once the agent was back."""
    unexpected: list[str] = field(default_factory=list)
    """Anything an agent met that a correct server never causes."""
    redelivered: int = 0
    reconnect_errors: int = 0
    kill_now: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by the first CompleteTask sent once KILL_AT of the tasks are acknowledged."""

    def sending(self) -> None:
        """A CompleteTask is about to go out."""
        if self.phase == "before kill" and len(self.completions) >= KILL_AT * self.tasks:
            self.kill_now.set()


class Worker:
    """A scripted agent that keeps itself connected and completes each assignment at once."""

    def __init__(self, client: Client, agent_id: str, load: Load) -> None:
        self.client = client
        self.agent_id = agent_id
        self.load = load
        self.streams: list[Agent] = []
        """Each task stream the agent has had, in order."""
        self.uncertain: list[workflow_pb2.TaskAssignment] = []
        """Assignments whose CompleteTask failed with the server gone: done or not, unknown."""
        self.calls: set[asyncio.Task[None]] = set()
        """CompleteTask calls under way (one per assignment: each is completed at once)."""

    async def run(self) -> None:
        """Connect (again and again, through any outage), send again the completions whose
        outcome is unknown, and work each stream until it ends.
        """
        while True:
            agent = await self._connect()
            self.streams.append(agent)
            uncertain, self.uncertain = self.uncertain, []
            for assignment in uncertain:
                self.load.retried += 1
                self._start_completing(agent, assignment)
            try:
                await self._work(agent)
            finally:
                if self.calls:
                    await asyncio.wait(self.calls)

    async def _connect(self) -> Agent:
        while True:
            try:
                return await self.client.agent(self.agent_id, max_concurrent_tasks=SLOTS)
            except (grpc.aio.AioRpcError, TimeoutError):
                self.load.reconnect_errors += 1
                await asyncio.sleep(0.05)

    async def _work(self, agent: Agent) -> None:
        while True:
            getting = asyncio.ensure_future(agent.events.get())
            ending = asyncio.ensure_future(agent.stream_ended.wait())
            try:
                await asyncio.wait({getting, ending}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ending.cancel()
                got = getting.done()
                if not got:
                    getting.cancel()
            if not got:
                return
            event = getting.result()
            if event.WhichOneof("event") == "assignment":
                self._start_completing(agent, event.assignment)
            else:
                self.load.unexpected.append(f"{self.agent_id} got {event}")

    def _start_completing(self, agent: Agent, assignment: workflow_pb2.TaskAssignment) -> None:
        call = asyncio.create_task(self._complete(agent, assignment))
        self.calls.add(call)
        call.add_done_callback(self.calls.discard)

    async def _complete(self, agent: Agent, assignment: workflow_pb2.TaskAssignment) -> None:
        load = self.load
        if assignment.redelivered:
            load.redelivered += 1
        output = {
            "agent_id": self.agent_id,
            "task_id": assignment.task_id,
            "attempt": assignment.attempt,
        }
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                load.sending()
                await agent.complete(assignment, output)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if load.phase == "before kill":
                load.unexpected.append(f"{code.name} before the kill: {error.details()}")
            elif code == grpc.StatusCode.FAILED_PRECONDITION and load.phase == "restarted":
                load.refused.append((assignment.task_id, assignment.attempt))
            elif code == grpc.StatusCode.UNAVAILABLE or load.phase == "outage":
                load.lost += 1
                self.uncertain.append(assignment)
            else:
                load.unexpected.append(f"{code.name} after the restart: {error.details()}")
        except TimeoutError:
            if load.phase == "before kill":
                load.unexpected.append(f"CompleteTask took over {CALL_TIMEOUT} s")
            load.lost += 1
            self.uncertain.append(assignment)
        else:
            before_kill = load.phase == "before kill"
            load.completions.append(
                Completion(
                    self.agent_id, assignment.task_id, assignment.attempt, output, before_kill
                )
            )


async def complete_again(
    client: Client, done: Completion, attempt: int, output: dict[str, Any]
) -> grpc.StatusCode:
    """Send CompleteTask for an acknowledged result's task, from its agent, for `attempt`, with
    `output`; the status it gets.
    """
    try:
        await client.workflows.CompleteTask(
            workflow_service_pb2.CompleteTaskRequest(
                task_id=done.task_id,
                agent_id=done.agent_id,
                attempt=attempt,
                output=struct(output),
            ),
            timeout=CALL_TIMEOUT,
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def check_workers(workers: list[asyncio.Task[None]]) -> None:
    """Fail the test with the error of any worker that stopped (they run until cancelled)."""
    for worker in workers:
        if worker.done():
            worker.result()
            raise AssertionError(f"{worker} stopped")


async def wait_all_succeeded(
    client: Client, run_ids: list[str], workers: list[asyncio.Task[None]], timeout: float
) -> dict[str, workflow_pb2.WorkflowRun]:
    """Poll until every run has SUCCEEDED; fails the test after `timeout` (or if one fails)."""
    finished: dict[str, workflow_pb2.WorkflowRun] = {}
    async with asyncio.timeout(timeout):
        while len(finished) < len(run_ids):
            check_workers(workers)
            for run_id in run_ids:
                if run_id in finished:
                    continue
                run = await client.run(run_id)
                assert run.state in (
                    workflow_pb2.RUN_STATE_PENDING,
                    workflow_pb2.RUN_STATE_RUNNING,
                    workflow_pb2.RUN_STATE_SUCCEEDED,
                ), run
                if run.state == workflow_pb2.RUN_STATE_SUCCEEDED:
                    finished[run_id] = run
            await asyncio.sleep(0.05)
    return finished


async def test_sigkill_mid_load_loses_nothing_and_records_each_result_once(
    tmp_path: Path,
) -> None:
    database = tmp_path / "crash.db"
    port = free_port()
    target = f"127.0.0.1:{port}"
    first = ServerProcess.on_sqlite(database, port, tmp_path / "first.log", **SETTINGS)
    second = ServerProcess.on_sqlite(database, port, tmp_path / "second.log", **SETTINGS)
    started = time.monotonic()
    await first.start()
    workers: list[asyncio.Task[None]] = []
    try:
        async with (
            contextlib.AsyncExitStack() as stack,
            auth.channel(target, options=CHANNEL_OPTIONS) as channel,
        ):
            client = Client(channel)
            try:
                chains = await client.create(chain("chain", 10))
                fans = await client.create(fan_out("fan-out", 8))
                load = Load(tasks=RUNS * 10)
                agents = [Worker(client, f"agent-{i}", load) for i in range(AGENTS)]
                workers = [asyncio.create_task(agent.run()) for agent in agents]

                # The load: every run triggered at once, the agents working them off.
                runs = await asyncio.gather(
                    *(
                        client.trigger(
                            definition_id=(chains if n % 2 == 0 else fans).definition_id,
                            request_id=f"load-{n}",
                            input={"run": n},
                        )
                        for n in range(RUNS)
                    )
                )
                run_ids = [run.run_id for run in runs]
                assert sum(len(run.tasks) for run in runs) == load.tasks

                # SIGKILL once KILL_AT of the tasks are acknowledged, a moment after a
                # CompleteTask went out: it may be committed or not, its answer is lost.
                async with asyncio.timeout(LOAD_WAIT):
                    while not load.kill_now.is_set():
                        check_workers(workers)
                        await asyncio.sleep(0.001)
                await asyncio.sleep(0.002)
                load.phase = "outage"
                first.kill()
                killed_at = time.monotonic()
                assert await first.wait(5.0) == -signal.SIGKILL
                before_kill = [c for c in load.completions if c.before_kill]
                assert len(before_kill) < load.tasks, "the load ended before the kill"

                # Every agent's stream ends with UNAVAILABLE.
                for agent in agents:
                    code = await agent.streams[0].wait_stream_ended(5.0)
                    assert code == grpc.StatusCode.UNAVAILABLE, (agent.agent_id, code)

                # The same file, the same port: the agents find the server again themselves.
                await second.start()
                load.phase = "restarted"
                restarted_at = time.monotonic()

                # Nothing acknowledged before the kill is lost. (The test looks on a channel of
                # its own: the agents' one may still be waiting to reconnect.)
                looker = Client(await stack.enter_async_context(auth.channel(target)))
                stored = {
                    t.task_id: t for run_id in run_ids for t in (await looker.run(run_id)).tasks
                }
                for completion in before_kill:
                    found = stored[completion.task_id]
                    assert found.state == workflow_pb2.TASK_STATE_SUCCEEDED, (completion, found)
                    assert as_dict(found.output) == completion.output, (completion, found)
                unfinished = [
                    t for t in stored.values() if t.state != workflow_pb2.TASK_STATE_SUCCEEDED
                ]
                assert unfinished, "the kill came after the load was done"

                # Every run finishes, every task SUCCEEDED.
                finished = await wait_all_succeeded(looker, run_ids, workers, FINISH_WAIT)
                finished_at = time.monotonic()

                # A result acknowledged before the kill, sent again to the new server: the same
                # result is OK and changes nothing; another output, or another attempt, is
                # refused.
                again = before_kill[0]
                same, other = again.output, {"again": True}
                assert await complete_again(looker, again, again.attempt, same) == (
                    grpc.StatusCode.OK
                )
                for attempt, output in ((again.attempt, other), (again.attempt + 1, same)):
                    assert await complete_again(looker, again, attempt, output) == (
                        grpc.StatusCode.FAILED_PRECONDITION
                    )
                run_of = {t.task_id: run.run_id for run in runs for t in run.tasks}
                rerun = await looker.run(run_of[again.task_id])
                assert rerun == finished[rerun.run_id], "a repeated result changed the run"
            finally:
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await client.close()
    finally:
        await second.close()
        await first.close()

    # Each task SUCCEEDED once: with the output of an acknowledged completion, and no two
    # attempts of it acknowledged.
    acknowledged: dict[str, list[Completion]] = defaultdict(list)
    for completion in load.completions:
        acknowledged[completion.task_id].append(completion)
    final_tasks = [t for run in finished.values() for t in run.tasks]
    assert len(final_tasks) == load.tasks
    for final in final_tasks:
        assert final.state == workflow_pb2.TASK_STATE_SUCCEEDED, final
        ok = acknowledged[final.task_id]
        assert ok, f"task {final.task_id} succeeded with no acknowledged completion"
        attempts = {(c.agent_id, c.attempt) for c in ok}
        assert len(attempts) == 1, f"task {final.task_id}: OK for two attempts: {attempts}"
        # Every acknowledged completion, before or after the kill, is the recorded one.
        for completion in ok:
            assert as_dict(final.output) == completion.output, (completion, final)
        assert (final.agent_id, final.attempt) == attempts.pop()
    assert set(acknowledged) == {t.task_id for t in final_tasks}
    assert load.unexpected == []
    # Every agent came back: registered again and opened a new stream on the new server.
    assert all(len(agent.streams) >= 2 for agent in agents), [len(a.streams) for a in agents]

    # The server's own record: no task completed twice, over both lives of the server.
    recorded = Counter(
        record.get("task_id")
        for server in (first, second)
        for record in server.log_records(strict=False)
        if record.get("event") == "task completed"
    )
    assert recorded, "no `task completed` record in the servers' logs"
    assert max(recorded.values()) == 1, [key for key, count in recorded.items() if count > 1]

    print(
        f"\ncrash: {load.tasks} tasks in {RUNS} runs; killed after {len(before_kill)} "
        f"acknowledged ({killed_at - started:.2f} s), restarted in "
        f"{restarted_at - killed_at:.2f} s, done {finished_at - restarted_at:.2f} s later; "
        f"{len(unfinished)} unfinished at the restart, {load.redelivered} redelivered, "
        f"{load.lost} completions lost to the outage ({load.retried} sent again), "
        f"{len(load.refused)} refused, "
        f"{load.reconnect_errors} failed reconnects"
    )
