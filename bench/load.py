"""The load generator, as it runs inside one load process: many agents and a trigger client on
one asyncio loop, over real gRPC channels to the server under test.

A load process is started with `spawn` by `bench.workers.LoadPool` and obeys commands that arrive
on a pipe (`(name, arguments)`, answered with `("ok", result)` or `("error", text)`). Agents run in
the background between commands, so one process can host agents while another triggers runs.

Latency is measured without any clock shared through the orchestrator: the trigger client puts
`time.monotonic()` (CLOCK_MONOTONIC, one clock for every process of the machine) into the run's
input as `t0`, which the server lays over each task's input; an agent completing a task puts its
own clock into the output as `t`, which the server hands to the dependent task as a dependency
output. The agent that receives a task thus computes trigger -> first assignment and complete ->
dependent's assignment itself, and the agent completing a run's last task (named in the input as
`last`) computes trigger -> run succeeded.

Completions are counted in two counters shared by all load processes (tasks done, runs done):
the trigger client reads them to keep a closed loop's runs in flight, to wait for one run at a
time, and to measure a throughput window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import grpc
from google.protobuf import struct_pb2
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from bench.servers import OPERATOR, bearer

MAX_SAMPLES = 200_000
"""Most samples one process keeps per (tag, kind): bounds memory on long windows."""

RPC_TIMEOUT = 30.0
"""Seconds any unary RPC of the load generator may take before it counts as failed."""

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # One TCP connection per channel, as separate agent hosts would have; without it gRPC shares
    # one subchannel between every channel of the process with the same target.
    ("grpc.use_local_subchannel_pool", 1),
    # A server that is restarting (recovery) is reached as soon as it listens.
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def bump(counter: Synchronized[int], by: int = 1) -> None:
    """Add to a shared counter under its lock (several processes write it)."""
    with counter.get_lock():
        counter.value += by


def run_input(tag: str, last: str) -> struct_pb2.Struct:
    """The input of a run: the trigger time, the phase it belongs to, its last task's name."""
    value = struct_pb2.Struct()
    value.fields["t0"].number_value = time.monotonic()
    value.fields["tag"].string_value = tag
    value.fields["last"].string_value = last
    return value


def inline_definition(
    capability: str, name: str = "bench-probe"
) -> workflow_pb2.WorkflowDefinition:
    """A one-task definition given inline, for a task only agents with `capability` can take."""
    return workflow_pb2.WorkflowDefinition(
        workflow_name=name, tasks=[workflow_pb2.TaskSpec(name="t0", capability=capability)]
    )


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What one TriggerWorkflow asks for: a stored definition by name, or an inline one-task
    definition for `capability`; optionally pinned to an agent. `last` names the task whose
    completion finishes the run (the agent measures trigger -> succeeded there)."""

    workflow_name: str = ""
    capability: str = ""
    agent_id: str = ""
    last: str = "t0"

    def request(self, tag: str) -> workflow_service_pb2.TriggerWorkflowRequest:
        """The request, stamped with the trigger time now."""
        request = workflow_service_pb2.TriggerWorkflowRequest(
            agent_id=self.agent_id, input=run_input(tag, self.last)
        )
        if self.workflow_name:
            request.workflow_name = self.workflow_name
        else:
            request.definition.CopyFrom(inline_definition(self.capability))
        return request


@dataclass
class Samples:
    """What the agents of this process measured, by `tag/kind`, in seconds; and the first time
    (monotonic) any task of each tag was received (the recovery's first push)."""

    values: dict[str, list[float]] = field(default_factory=dict)
    first_received: dict[str, float] = field(default_factory=dict)
    errors: int = 0

    def add(self, tag: str, kind: str, value: float) -> None:
        """Keep one sample (up to MAX_SAMPLES per key)."""
        bucket = self.values.setdefault(f"{tag}/{kind}", [])
        if len(bucket) < MAX_SAMPLES:
            bucket.append(value)


class Agent:
    """One agent: registered, its task stream open, completing every assignment at once."""

    def __init__(
        self, worker: Worker, agent_id: str, channel: grpc.aio.Channel, token: str
    ) -> None:
        self.worker = worker
        self.agent_id = agent_id
        self.credentials = bearer(token)
        """Its own token, which its stream and its results carry, as a deployed agent's do."""
        self.stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        self.call: Any = None

    async def run(self) -> None:
        """Read the stream until it ends (server gone, agent stopped); an agent that loses its
        stream is done: the benchmark starts new agents rather than reconnect."""
        self.call = self.stub.StreamTasks(
            workflow_service_pb2.StreamTasksRequest(agent_id=self.agent_id),
            metadata=self.credentials,
        )
        try:
            async for event in self.call:
                if event.WhichOneof("event") == "assignment":
                    await self.handle(event.assignment)
        except grpc.aio.AioRpcError:
            return

    async def handle(self, assignment: workflow_pb2.TaskAssignment) -> None:
        """Measure what the assignment carries, then complete it at once."""
        received = time.monotonic()
        samples = self.worker.samples
        fields = assignment.input.fields
        tag = fields["tag"].string_value if "tag" in fields else ""
        samples.first_received.setdefault(tag, received)
        t0 = fields["t0"].number_value if "t0" in fields else None
        if assignment.dependency_outputs:
            for output in assignment.dependency_outputs.values():
                if "t" in output.fields:
                    samples.add(tag, "next", received - output.fields["t"].number_value)
        elif t0 is not None:
            samples.add(tag, "first", received - t0)
        output = struct_pb2.Struct()
        output.fields["t"].number_value = time.monotonic()
        try:
            await self.stub.CompleteTask(
                workflow_service_pb2.CompleteTaskRequest(
                    task_id=assignment.task_id,
                    agent_id=self.agent_id,
                    attempt=assignment.attempt,
                    output=output,
                ),
                timeout=RPC_TIMEOUT,
                metadata=self.credentials,
            )
        except grpc.aio.AioRpcError:
            samples.errors += 1
            return
        bump(self.worker.tasks_done)
        if "last" in fields and fields["last"].string_value == assignment.task_name:
            if t0 is not None:
                samples.add(tag, "run", time.monotonic() - t0)
            bump(self.worker.runs_done)


class Worker:
    """One load process: its agents, its channels, and the commands it obeys."""

    def __init__(
        self, conn: Connection, tasks_done: Synchronized[int], runs_done: Synchronized[int]
    ) -> None:
        self.conn = conn
        self.tasks_done = tasks_done
        self.runs_done = runs_done
        self.samples = Samples()
        self.agents: list[Agent] = []
        self.agent_tasks: list[asyncio.Task[None]] = []
        self.channels: list[grpc.aio.Channel] = []
        self.trigger_channels: dict[str, grpc.aio.Channel] = {}
        self.trigger_errors = 0

    async def serve(self) -> None:
        """Obey commands until `exit` or until the orchestrator goes away (the pipe closes)."""
        loop = asyncio.get_running_loop()
        handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            "start_agents": self.start_agents,
            "stop_agents": self.stop_agents,
            "collect": self.collect,
            "define": self.define,
            "closed_loop": self.closed_loop,
            "open_loop": self.open_loop,
            "sequential": self.sequential,
            "interleaved": self.interleaved,
            "fill": self.fill,
        }
        try:
            while True:
                try:
                    name, arguments = await loop.run_in_executor(None, self.conn.recv)
                except (EOFError, OSError):
                    return
                if name == "exit":
                    self.conn.send(("ok", None))
                    return
                try:
                    result = await handlers[name](**arguments)
                except Exception:  # noqa: BLE001 - every failure goes back to the orchestrator
                    self.conn.send(("error", traceback.format_exc()))
                else:
                    self.conn.send(("ok", result))
        finally:
            await self.stop_agents()
            for channel in self.trigger_channels.values():
                await channel.close()

    # Agents -------------------------------------------------------------------------------

    async def start_agents(
        self,
        target: str,
        agents: list[tuple[str, list[str]]],
        per_channel: int = 1,
        concurrency: int = 64,
        wait_for_ready: bool = False,
    ) -> int:
        """Register `agents` (id, capabilities) and open their task streams, `per_channel` agents
        sharing one connection. With `wait_for_ready` the registrations wait for a server that
        is not listening yet (the recovery measurement starts its agent before its server).
        Returns how many agents have their stream call under way."""
        channels = [
            grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            for _ in range(math.ceil(len(agents) / max(1, per_channel)))
        ]
        self.channels.extend(channels)
        gate = asyncio.Semaphore(concurrency)

        async def start(index: int, agent_id: str, capabilities: list[str]) -> None:
            channel = channels[index // max(1, per_channel)]
            request = agent_lifecycle_pb2.RegisterAgentRequest(
                agent_id=agent_id, name=agent_id, version="bench", capabilities=capabilities
            )
            async with gate:
                registered = await agent_lifecycle_pb2_grpc.AgentLifecycleStub(
                    channel
                ).RegisterAgent(
                    request, timeout=RPC_TIMEOUT, wait_for_ready=wait_for_ready, metadata=OPERATOR
                )
            agent = Agent(self, agent_id, channel, registered.agent_token)
            self.agents.append(agent)
            self.agent_tasks.append(asyncio.create_task(agent.run()))

        await asyncio.gather(
            *(start(index, agent_id, caps) for index, (agent_id, caps) in enumerate(agents))
        )
        # Give every stream call the chance to go out before the orchestrator moves on.
        await asyncio.sleep(0)
        return len(agents)

    async def stop_agents(self) -> int:
        """Close every agent's stream and channel; returns how many agents there were."""
        count = len(self.agents)
        for agent in self.agents:
            if agent.call is not None:
                agent.call.cancel()
        for task in self.agent_tasks:
            task.cancel()
        if self.agent_tasks:
            await asyncio.wait(self.agent_tasks, timeout=10.0)
        for channel in self.channels:
            await channel.close()
        self.agents.clear()
        self.agent_tasks.clear()
        self.channels.clear()
        return count

    async def collect(self) -> dict[str, Any]:
        """Hand over (and forget) what the agents measured since the last collection."""
        samples, self.samples = self.samples, Samples()
        return {
            "values": samples.values,
            "first_received": samples.first_received,
            "errors": samples.errors,
        }

    # Trigger client -----------------------------------------------------------------------

    def _stub(self, target: str) -> workflow_service_pb2_grpc.WorkflowServiceAsyncStub:
        """The trigger client's stub on its channel to `target`: one channel a server, kept
        while the process lives, so that steps taking turns between servers never measure a
        new connection (a channel whose server is gone stays idle until the process ends)."""
        channel = self.trigger_channels.get(target)
        if channel is None:
            channel = self.trigger_channels[target] = grpc.aio.insecure_channel(
                target, options=CHANNEL_OPTIONS
            )
        return workflow_service_pb2_grpc.WorkflowServiceStub(channel)

    async def define(self, target: str, definitions: list[bytes]) -> int:
        """Create the stored definitions (serialized WorkflowDefinition messages)."""
        stub = self._stub(target)
        for raw in definitions:
            definition = workflow_pb2.WorkflowDefinition.FromString(raw)
            await stub.CreateWorkflowDefinition(
                workflow_service_pb2.CreateWorkflowDefinitionRequest(definition=definition),
                timeout=RPC_TIMEOUT,
                metadata=OPERATOR,
            )
        return len(definitions)

    async def _trigger(
        self, stub: workflow_service_pb2_grpc.WorkflowServiceAsyncStub, spec: RunSpec, tag: str
    ) -> bool:
        """Trigger one run; False (counted) if the server refused or did not answer."""
        try:
            await stub.TriggerWorkflow(spec.request(tag), timeout=RPC_TIMEOUT, metadata=OPERATOR)
        except grpc.aio.AioRpcError:
            self.trigger_errors += 1
            return False
        return True

    async def _drain(self, expected: int, timeout: float) -> bool:
        """Wait (bounded) until `expected` runs are done: the step leaves nothing held."""
        deadline = time.monotonic() + timeout
        while self.runs_done.value < expected:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def closed_loop(
        self,
        target: str | list[str],
        spec: RunSpec,
        in_flight: int,
        warmup: float,
        window: float,
        tag: str = "throughput",
        drain: float = 15.0,
    ) -> dict[str, float]:
        """Keep `in_flight` runs triggered and not yet done, as fast as they are taken; count the
        tasks completed over `window` seconds after `warmup`. Given several targets (replicas),
        the triggers go to each in turn. The shared counters must be zero at the start."""
        stubs = [self._stub(each) for each in ([target] if isinstance(target, str) else target)]
        triggered = 0
        failed = 0
        pending: set[asyncio.Task[bool]] = set()
        start = time.monotonic()
        window_start = start + warmup
        end = window_start + window
        done_at_start: int | None = None
        while (now := time.monotonic()) < end:
            if done_at_start is None and now >= window_start:
                done_at_start = self.tasks_done.value
                window_start = now
            missing = in_flight - (triggered - failed - self.runs_done.value)
            for _ in range(max(0, missing)):
                stub = stubs[triggered % len(stubs)]
                task = asyncio.create_task(self._trigger(stub, spec, tag))
                pending.add(task)
                triggered += 1
            finished = {task for task in pending if task.done()}
            failed += sum(1 for task in finished if not task.result())
            pending -= finished
            await asyncio.sleep(0.001)
        done_at_end = self.tasks_done.value
        measured = time.monotonic() - window_start
        if pending:
            results = await asyncio.gather(*pending)
            failed += sum(1 for ok in results if not ok)
        drained = await self._drain(triggered - failed, drain)
        return {
            "tasks_per_s": (done_at_end - (done_at_start or 0)) / measured,
            "runs_triggered": triggered,
            "trigger_errors": failed,
            "drained": float(drained),
        }

    async def open_loop(
        self,
        target: str,
        spec: RunSpec,
        rate: float,
        duration: float,
        tag: str,
        max_outstanding: int = 512,
        drain: float = 15.0,
    ) -> dict[str, float]:
        """Trigger runs at a fixed `rate` (runs/s, evenly spaced) for `duration` seconds, whatever
        the server does with them (open loop); a trigger due while `max_outstanding` calls are
        still unanswered is skipped and counted. Then wait (bounded) for every run to finish."""
        stub = self._stub(target)
        pending: set[asyncio.Task[bool]] = set()
        interval = 1.0 / rate
        start = time.monotonic()
        total = max(1, int(rate * duration))
        skipped = 0
        errors_before = self.trigger_errors
        for index in range(total):
            delay = start + index * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending = {task for task in pending if not task.done()}
            if len(pending) >= max_outstanding:
                skipped += 1
                continue
            pending.add(asyncio.create_task(self._trigger(stub, spec, tag)))
        await asyncio.gather(*pending)
        failed = self.trigger_errors - errors_before
        sent = total - skipped
        drained = await self._drain(sent - failed, drain)
        return {
            "runs_triggered": sent,
            "skipped": skipped,
            "trigger_errors": failed,
            "achieved_rate": sent / max(1e-9, time.monotonic() - start),
            "drained": float(drained),
        }

    async def sequential(
        self, target: str, specs: list[RunSpec], tag: str, timeout: float = 10.0
    ) -> dict[str, float]:
        """One run at a time: trigger, wait until it is done, trigger the next (a trickle; the
        probes of the queue-depth and fleet scenarios; readiness pings). Stops at the first
        run that does not finish within `timeout` seconds."""
        return await self.interleaved([(target, spec, tag) for spec in specs], timeout)

    async def interleaved(
        self, steps: list[tuple[str, RunSpec, str]], timeout: float = 10.0
    ) -> dict[str, float]:
        """`sequential`, each run with a target and a tag of its own (`(target, spec, tag)`): a
        trickle that takes turns between servers, or between replicas of one."""
        completed = 0
        for target, spec, tag in steps:
            expected = self.runs_done.value + 1
            if not await self._trigger(self._stub(target), spec, tag):
                break
            if not await self._drain(expected, timeout):
                break
            completed += 1
        return {"completed": completed, "asked": len(steps)}

    async def fill(
        self, target: str, workflow_name: str, runs: int, concurrency: int = 4
    ) -> dict[str, float]:
        """Queue `runs` runs of a stored definition no connected agent can take, `concurrency`
        TriggerWorkflow calls at a time; the tasks stay queued."""
        stub = self._stub(target)
        gate = asyncio.Semaphore(concurrency)
        start = time.monotonic()
        spec = RunSpec(workflow_name=workflow_name, last="")

        async def one() -> bool:
            async with gate:
                return await self._trigger(stub, spec, "backlog")

        results = await asyncio.gather(*(one() for _ in range(runs)))
        return {"runs": sum(results), "seconds": time.monotonic() - start}


def worker_main(
    conn: Connection, tasks_done: Synchronized[int], runs_done: Synchronized[int]
) -> None:
    """Entry point of a load process (spawned): obey the orchestrator's commands."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Worker(conn, tasks_done, runs_done).serve())
