"""The ceiling: a bare grpc.aio server with Ops-Core's RPC shapes and nothing else.

It implements, with the generated `opscore.v1` services, what the load generator calls
(RegisterAgent, CreateWorkflowDefinition, TriggerWorkflow by stored name or inline definition,
GetWorkflowRun, StreamTasks, CompleteTask) with the same observable behaviour as Ops-Core on the
happy path: a FIFO of ready tasks per requirement (capability, or the agent a run is pinned to),
pushes only to connected agents with a free slot (the one that has waited longest), dependents
queued when their dependencies succeed (a chain: completing task k pushes task k+1), the run's
input laid over each task's input, dependency outputs handed on. What it leaves out is exactly
what Ops-Core adds: no database, no commit before an answer, no leases, retries, timers or
validation beyond what the happy path needs. Whatever the load generator measures here is the
cost of gRPC and Python on this machine, the bound for a server written the same way.

    python -m bench.ceiling --listen 127.0.0.1:PORT [--preload N]

`--preload N` queues N tasks nobody can take before serving, as a recovered database would hold
(the recovery scenario's counterpart).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import secrets
import signal
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    agent_pb2,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from opscore.cli import runner

Context = grpc.aio.ServicerContext[Any, Any]

LEASE_SECONDS = 300
"""The deadline put on assignments (Ops-Core's default lease); nothing enforces it here."""


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp for wall-clock `seconds`, as the real server sets on what it returns."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


@dataclass(eq=False, slots=True)
class Task:
    """One task of a run, in memory only."""

    task_id: str
    run: Run
    spec: workflow_pb2.TaskSpec
    key: str
    """The requirement: a capability (empty: any agent), or `@agent` for a pinned run."""
    waiting: int
    """Dependencies not yet succeeded."""
    dependents: list[Task] = field(default_factory=list)
    state: int = workflow_pb2.TASK_STATE_PENDING
    attempt: int = 0
    agent: Agent | None = None
    output: struct_pb2.Struct | None = None
    ready_seq: int = 0


@dataclass(eq=False, slots=True)
class Run:
    """One run: its tasks by name, how many are unfinished, its input."""

    run_id: str
    name: str
    input: struct_pb2.Struct
    agent_id: str
    tasks: dict[str, Task] = field(default_factory=dict)
    remaining: int = 0
    state: int = workflow_pb2.RUN_STATE_PENDING
    created_at: float = field(default_factory=time.time)


@dataclass(eq=False, slots=True)
class Agent:
    """A registered agent: what it can take, its slots, its open stream's queue if any."""

    agent_id: str
    capabilities: list[str]
    slots: int
    running: int = 0
    queue: asyncio.Queue[workflow_service_pb2.StreamTasksResponse | None] | None = None

    @property
    def keys(self) -> list[str]:
        """Every requirement this agent satisfies: any-agent, its capabilities, its pin."""
        return ["", *self.capabilities, f"@{self.agent_id}"]


class Core:
    """The in-memory state and the dispatch rule (earliest-ready task to the longest-idle agent
    that can take it), shared by both servicers."""

    def __init__(self) -> None:
        self.agents: dict[str, Agent] = {}
        self.definitions: dict[str, workflow_pb2.WorkflowDefinition] = {}
        self.runs: dict[str, Run] = {}
        self.tasks: dict[str, Task] = {}
        self.queues: dict[str, deque[Task]] = {}
        self.free: dict[str, dict[str, Agent]] = {}
        """Free agents by requirement; dict order is the order they became free."""
        self._seq = itertools.count()

    def trigger(
        self,
        definition: workflow_pb2.WorkflowDefinition,
        run_input: struct_pb2.Struct,
        agent_id: str,
    ) -> Run:
        """Create a run: its root tasks are ready at once, the others wait."""
        run = Run(str(uuid.uuid4()), definition.workflow_name, run_input, agent_id)
        for spec in definition.tasks:
            key = f"@{agent_id}" if agent_id else spec.capability
            task = Task(str(uuid.uuid4()), run, spec, key, waiting=len(spec.depends_on))
            run.tasks[spec.name] = task
            self.tasks[task.task_id] = task
        for task in run.tasks.values():
            for name in task.spec.depends_on:
                run.tasks[name].dependents.append(task)
        run.remaining = len(run.tasks)
        self.runs[run.run_id] = run
        for task in list(run.tasks.values()):
            if task.waiting == 0:
                self.ready(task)
        return run

    def ready(self, task: Task) -> None:
        """The task can run: give it to the longest-free agent that can take it, or queue it."""
        task.state = workflow_pb2.TASK_STATE_QUEUED
        task.ready_seq = next(self._seq)
        free = self.free.get(task.key)
        if free:
            self.assign(task, next(iter(free.values())))
        else:
            self.queues.setdefault(task.key, deque()).append(task)

    def assign(self, task: Task, agent: Agent) -> None:
        """Hand the task to the agent's stream; an agent whose slots are all taken is no longer
        free."""
        assert agent.queue is not None
        task.state = workflow_pb2.TASK_STATE_ASSIGNED
        task.attempt += 1
        task.agent = agent
        agent.running += 1
        if agent.running >= agent.slots:
            self.unfree(agent)
        run = task.run
        if run.state == workflow_pb2.RUN_STATE_PENDING:
            run.state = workflow_pb2.RUN_STATE_RUNNING
        task_input = struct_pb2.Struct()
        task_input.CopyFrom(task.spec.input)
        for name, value in run.input.fields.items():
            task_input.fields[name].CopyFrom(value)
        assignment = workflow_pb2.TaskAssignment(
            task_id=task.task_id,
            run_id=run.run_id,
            task_name=task.spec.name,
            attempt=task.attempt,
            input=task_input,
            deadline=_timestamp(time.time() + LEASE_SECONDS),
            capability=task.spec.capability,
        )
        for name in task.spec.depends_on:
            output = run.tasks[name].output
            if output is not None:
                assignment.dependency_outputs[name].CopyFrom(output)
        agent.queue.put_nowait(workflow_service_pb2.StreamTasksResponse(assignment=assignment))

    def unfree(self, agent: Agent) -> None:
        """Take the agent out of every free list."""
        for key in agent.keys:
            free = self.free.get(key)
            if free is not None:
                free.pop(agent.agent_id, None)
                if not free:
                    del self.free[key]

    def became_free(self, agent: Agent) -> None:
        """The agent has a free slot (stream opened, task done): give it the earliest-ready
        task it can take, or list it as free."""
        while agent.queue is not None and agent.running < agent.slots:
            best: deque[Task] | None = None
            for key in agent.keys:
                queue = self.queues.get(key)
                if queue and (best is None or queue[0].ready_seq < best[0].ready_seq):
                    best = queue
            if best is None:
                for key in agent.keys:
                    self.free.setdefault(key, {})[agent.agent_id] = agent
                return
            self.assign(best.popleft(), agent)

    def complete(self, task: Task, output: struct_pb2.Struct) -> None:
        """Record the output, queue the dependents it satisfies, free the agent's slot."""
        task.state = workflow_pb2.TASK_STATE_SUCCEEDED
        task.output = output
        run = task.run
        run.remaining -= 1
        for dependent in task.dependents:
            dependent.waiting -= 1
            if dependent.waiting == 0:
                self.ready(dependent)
        if run.remaining == 0:
            run.state = workflow_pb2.RUN_STATE_SUCCEEDED
            for finished in run.tasks.values():
                self.tasks.pop(finished.task_id, None)
        agent = task.agent
        if agent is not None:
            agent.running -= 1
            self.became_free(agent)

    def disconnect(self, agent: Agent) -> None:
        """The agent's stream ended: it is free no more (what it held stays held)."""
        self.unfree(agent)
        agent.queue = None


def _run_message(run: Run) -> workflow_pb2.WorkflowRun:
    """The run as Ops-Core returns it: state and tasks."""
    return workflow_pb2.WorkflowRun(
        run_id=run.run_id,
        agent_id=run.agent_id,
        state=run.state,  # type: ignore[arg-type]
        input=run.input,
        workflow_name=run.name,
        created_at=_timestamp(run.created_at),
        tasks=[
            workflow_pb2.TaskRun(
                task_id=task.task_id,
                name=name,
                state=task.state,  # type: ignore[arg-type]
                attempt=task.attempt,
                agent_id=task.agent.agent_id if task.agent else "",
            )
            for name, task in run.tasks.items()
        ],
    )


async def _unimplemented(context: Context) -> NoReturn:
    """The load generator never calls this RPC; the ceiling does not pretend to offer it."""
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the ceiling")
    raise AssertionError  # abort raises


class Lifecycle(agent_lifecycle_pb2_grpc.AgentLifecycleServicer):
    """AgentLifecycle: registration only (the load generator calls nothing else)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def RegisterAgent(  # noqa: N802 - the contract's method name
        self, request: agent_lifecycle_pb2.RegisterAgentRequest, context: Context
    ) -> agent_lifecycle_pb2.RegisterAgentResponse:
        """Register or update an agent, as Ops-Core does (idempotent: agents restart)."""
        agent_id = request.agent_id or str(uuid.uuid4())
        agent = self.core.agents.get(agent_id)
        slots = max(1, request.max_concurrent_tasks)
        if agent is None:
            agent = Agent(agent_id, list(request.capabilities), slots)
            self.core.agents[agent_id] = agent
        else:
            self.core.unfree(agent)
            agent.capabilities = list(request.capabilities)
            agent.slots = slots
            self.core.became_free(agent)
        now = _timestamp(time.time())
        return agent_lifecycle_pb2.RegisterAgentResponse(
            agent=agent_pb2.Agent(
                agent_id=agent_id,
                name=request.name,
                version=request.version,
                capabilities=request.capabilities,
                max_concurrent_tasks=slots,
                state=agent_pb2.AGENT_STATE_OFFLINE,
                registered_at=now,
                last_seen_at=now,
            ),
            # A token of the same size as Ops-Core's, which the clients then send as Ops-Core's.
            agent_token=secrets.token_urlsafe(46),
        )

    async def DeregisterAgent(  # noqa: N802
        self, request: agent_lifecycle_pb2.DeregisterAgentRequest, context: Context
    ) -> agent_lifecycle_pb2.DeregisterAgentResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def Heartbeat(  # noqa: N802
        self, request: agent_lifecycle_pb2.HeartbeatRequest, context: Context
    ) -> agent_lifecycle_pb2.HeartbeatResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def ReportState(  # noqa: N802
        self, request: agent_lifecycle_pb2.ReportStateRequest, context: Context
    ) -> agent_lifecycle_pb2.ReportStateResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def GetAgent(  # noqa: N802
        self, request: agent_lifecycle_pb2.GetAgentRequest, context: Context
    ) -> agent_lifecycle_pb2.GetAgentResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def ListAgents(  # noqa: N802
        self, request: agent_lifecycle_pb2.ListAgentsRequest, context: Context
    ) -> agent_lifecycle_pb2.ListAgentsResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)


class Workflows(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """WorkflowService: definitions, triggers, runs, task streams and results, in memory."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def CreateWorkflowDefinition(  # noqa: N802
        self, request: workflow_service_pb2.CreateWorkflowDefinitionRequest, context: Context
    ) -> workflow_service_pb2.CreateWorkflowDefinitionResponse:
        """Store a definition under its name (the latest version is what a name runs)."""
        definition = workflow_pb2.WorkflowDefinition()
        definition.CopyFrom(request.definition)
        previous = self.core.definitions.get(definition.workflow_name)
        definition.definition_id = str(uuid.uuid4())
        definition.version = previous.version + 1 if previous else 1
        definition.created_at.CopyFrom(_timestamp(time.time()))
        self.core.definitions[definition.workflow_name] = definition
        return workflow_service_pb2.CreateWorkflowDefinitionResponse(definition=definition)

    async def TriggerWorkflow(  # noqa: N802
        self,
        request: workflow_service_pb2.TriggerWorkflowRequest,
        context: Context,
    ) -> workflow_service_pb2.TriggerWorkflowResponse:
        """Start a run of a stored definition (by name) or of an inline one."""
        source = request.WhichOneof("source")
        if source == "definition":
            definition = request.definition
        elif source == "workflow_name" and request.workflow_name in self.core.definitions:
            definition = self.core.definitions[request.workflow_name]
        else:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such definition")
        run = self.core.trigger(definition, request.input, request.agent_id)
        return workflow_service_pb2.TriggerWorkflowResponse(run=_run_message(run))

    async def GetWorkflowRun(  # noqa: N802
        self, request: workflow_service_pb2.GetWorkflowRunRequest, context: Context
    ) -> workflow_service_pb2.GetWorkflowRunResponse:
        """Return one run with its tasks."""
        run = self.core.runs.get(request.run_id)
        if run is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such run")
        return workflow_service_pb2.GetWorkflowRunResponse(run=_run_message(run))

    async def StreamTasks(  # noqa: N802
        self, request: workflow_service_pb2.StreamTasksRequest, context: Context
    ) -> AsyncIterator[workflow_service_pb2.StreamTasksResponse]:
        """The agent's stream: it is free while open, and its assignments go out here."""
        agent = self.core.agents.get(request.agent_id)
        if agent is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "agent not registered")
            return
        if agent.queue is not None:
            agent.queue.put_nowait(None)  # a newer stream replaces the older
            self.core.disconnect(agent)
        queue: asyncio.Queue[workflow_service_pb2.StreamTasksResponse | None] = asyncio.Queue()
        agent.queue = queue
        self.core.became_free(agent)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            if agent.queue is queue:
                self.core.disconnect(agent)

    async def CompleteTask(  # noqa: N802
        self, request: workflow_service_pb2.CompleteTaskRequest, context: Context
    ) -> workflow_service_pb2.CompleteTaskResponse:
        """Record a result from the agent holding the attempt."""
        task = self.core.tasks.get(request.task_id)
        if (
            task is None
            or task.state != workflow_pb2.TASK_STATE_ASSIGNED
            or task.agent is None
            or task.agent.agent_id != request.agent_id
            or task.attempt != request.attempt
        ):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "attempt not held")
            raise AssertionError  # abort raises
        self.core.complete(task, request.output)
        return workflow_service_pb2.CompleteTaskResponse()

    async def GetWorkflowDefinition(  # noqa: N802
        self, request: workflow_service_pb2.GetWorkflowDefinitionRequest, context: Context
    ) -> workflow_service_pb2.GetWorkflowDefinitionResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def ListWorkflowDefinitions(  # noqa: N802
        self, request: workflow_service_pb2.ListWorkflowDefinitionsRequest, context: Context
    ) -> workflow_service_pb2.ListWorkflowDefinitionsResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def ListWorkflowRuns(  # noqa: N802
        self, request: workflow_service_pb2.ListWorkflowRunsRequest, context: Context
    ) -> workflow_service_pb2.ListWorkflowRunsResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def ListWorkflowRunTasks(  # noqa: N802
        self, request: workflow_service_pb2.ListWorkflowRunTasksRequest, context: Context
    ) -> workflow_service_pb2.ListWorkflowRunTasksResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def CancelWorkflowRun(  # noqa: N802
        self, request: workflow_service_pb2.CancelWorkflowRunRequest, context: Context
    ) -> workflow_service_pb2.CancelWorkflowRunResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def WatchWorkflowRun(  # noqa: N802
        self, request: workflow_service_pb2.WatchWorkflowRunRequest, context: Context
    ) -> AsyncIterator[workflow_service_pb2.WatchWorkflowRunResponse]:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)
        yield workflow_service_pb2.WatchWorkflowRunResponse()  # never reached: a stream's shape

    async def FailTask(  # noqa: N802
        self, request: workflow_service_pb2.FailTaskRequest, context: Context
    ) -> workflow_service_pb2.FailTaskResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)

    async def ExtendTaskLease(  # noqa: N802
        self, request: workflow_service_pb2.ExtendTaskLeaseRequest, context: Context
    ) -> workflow_service_pb2.ExtendTaskLeaseResponse:
        """Not offered (see `_unimplemented`)."""
        await _unimplemented(context)


def preload(core: Core, tasks: int) -> None:
    """Queue `tasks` tasks nobody can take, in runs of up to 1000 (what a recovered database
    would hold)."""
    while tasks > 0:
        size = min(1000, tasks)
        definition = workflow_pb2.WorkflowDefinition(
            workflow_name="bench-preload",
            tasks=[workflow_pb2.TaskSpec(name=f"q{i}", capability="nobody") for i in range(size)],
        )
        run_input = struct_pb2.Struct()
        run_input.fields["tag"].string_value = "backlog"
        core.trigger(definition, run_input, "")
        tasks -= size


async def serve(listen: str, preloaded: int) -> None:
    """Serve until SIGTERM/SIGINT."""
    core = Core()
    preload(core, preloaded)
    server = grpc.aio.server(options=[("grpc.keepalive_permit_without_calls", 1)])
    agent_lifecycle_pb2_grpc.add_AgentLifecycleServicer_to_server(Lifecycle(core), server)
    workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(Workflows(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    """Entry point: `python -m bench.ceiling --listen HOST:PORT [--preload N]`."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port to bind")
    parser.add_argument("--preload", type=int, default=0, help="tasks queued before serving")
    args = parser.parse_args()
    # The same event loop as `opscore serve` picks by default, so neither side gets a faster one.
    with contextlib.suppress(KeyboardInterrupt):
        runner("auto")(serve(args.listen, args.preload))


if __name__ == "__main__":
    main()
