"""A silent agent under steady load: `python -m bench.silent`.

Runs `opscore serve` (defaults, fresh SQLite file) in a subprocess, well-behaved agents that
complete every assignment at once, and one silent agent with many slots that opens its task
stream and never reads it, under a steady trigger rate of 1-task runs with 32 KiB inputs; then
the same load without the silent agent. Reports the server's RSS (start, peak, end, from
/proc/PID/status), the other agents' trigger -> assignment p50/p90 with and without it, and the
runs that failed. `drive` is the load itself, which the test suite runs briefly against an
in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    agent_pb2,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)

from bench.servers import OPERATOR, opscore_server, rss_bytes, sqlite_url

SILENT = "silent"


@dataclass(frozen=True, slots=True)
class Load:
    """The load: how long, how fast, and who takes it."""

    seconds: float = 60.0
    rate: float = 20.0
    """Runs triggered per second."""
    agents: int = 4
    """Well-behaved agents."""
    silent_slots: int = 0
    """Slots of the silent agent; 0: no silent agent."""
    payload: int = 32 * 1024
    """Bytes of each task's input."""
    lease: float = 10.0
    """Seconds of each task's timeout (its lease)."""
    settle: float = 30.0
    """Seconds, at most, for the runs triggered to finish after the load stops."""


@dataclass(slots=True)
class Outcome:
    """What one load measured."""

    latencies: list[float] = field(default_factory=list)
    """Seconds from trigger to assignment, at the well-behaved agents."""
    triggered: int = 0
    failed: int = 0
    unfinished: int = 0
    silent: agent_pb2.Agent | None = None
    """The silent agent as the server saw it at the end."""
    stuck: list[str] = field(default_factory=list)
    """Each unfinished run's tasks as the server saw them at the end: what to look at when a
    run does not finish."""

    def percentile(self, fraction: float) -> float:
        """A percentile of the latencies, in milliseconds (NaN without samples)."""
        if len(self.latencies) < 2:
            return float("nan")
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return 1000 * cuts[round(fraction * 100) - 1]


async def _reader(stub: Any, agent_id: str, outcome: Outcome) -> None:
    """A well-behaved agent: every assignment completed at once, its latency recorded."""
    # The operator's token for every call: what this measures is the agents' streams.
    call = stub.StreamTasks(
        workflow_service_pb2.StreamTasksRequest(agent_id=agent_id), metadata=OPERATOR
    )
    with contextlib.suppress(grpc.aio.AioRpcError):  # the stream ended
        async for event in call:
            if event.WhichOneof("event") != "assignment":
                continue
            assignment = event.assignment
            if assignment.attempt == 1:
                outcome.latencies.append(time.time() - assignment.input.fields["t0"].number_value)
            # A result refused (the short lease ran out first, on a busy machine) ends that
            # attempt, not the agent: its task is retried, and the agent reads on.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.CompleteTask(
                    workflow_service_pb2.CompleteTaskRequest(
                        task_id=assignment.task_id, agent_id=agent_id, attempt=assignment.attempt
                    ),
                    metadata=OPERATOR,
                )


async def drive(target: str, load: Load, sample: Callable[[], None] = lambda: None) -> Outcome:
    """Run `load` against the server at `target`; `sample` is called about once a second."""
    outcome = Outcome()
    async with grpc.aio.insecure_channel(target) as channel:
        agents = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        work = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        names = [f"good-{n}" for n in range(load.agents)]
        slots = dict.fromkeys(names, 100)
        if load.silent_slots:
            slots[SILENT] = load.silent_slots
        for name, count in slots.items():
            await agents.RegisterAgent(
                agent_lifecycle_pb2.RegisterAgentRequest(
                    agent_id=name, capabilities=["work"], max_concurrent_tasks=count
                ),
                metadata=OPERATOR,
            )
        readers = [asyncio.create_task(_reader(work, name, outcome)) for name in names]
        silent = None
        if load.silent_slots:
            # Opened and never read: its messages wait in the server.
            silent = work.StreamTasks(
                workflow_service_pb2.StreamTasksRequest(agent_id=SILENT), metadata=OPERATOR
            )
        spec = workflow_pb2.TaskSpec(name="t", capability="work")
        spec.input.update({"blob": "x" * load.payload})
        spec.timeout.FromSeconds(int(load.lease))
        created = await work.CreateWorkflowDefinition(
            workflow_service_pb2.CreateWorkflowDefinitionRequest(
                definition=workflow_pb2.WorkflowDefinition(workflow_name="silent", tasks=[spec])
            ),
            metadata=OPERATOR,
        )
        definition_id = created.definition.definition_id
        started = time.monotonic()
        next_sample = started
        while (now := time.monotonic()) - started < load.seconds:
            run_input = struct_pb2.Struct()
            run_input.update({"t0": time.time()})
            await work.TriggerWorkflow(
                workflow_service_pb2.TriggerWorkflowRequest(
                    definition_id=definition_id, input=run_input
                ),
                metadata=OPERATOR,
            )
            outcome.triggered += 1
            if now >= next_sample:
                sample()
                next_sample += 1.0
            await asyncio.sleep(max(0.0, started + outcome.triggered / load.rate - now))
        await _settle(work, outcome, load.settle, sample)
        if silent is not None:
            reply = await agents.GetAgent(
                agent_lifecycle_pb2.GetAgentRequest(agent_id=SILENT), metadata=OPERATOR
            )
            outcome.silent = reply.agent
            silent.cancel()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return outcome


async def _count(work: Any, state: workflow_pb2.RunState.ValueType) -> int:
    total, token = 0, ""
    while True:
        page = await work.ListWorkflowRuns(
            workflow_service_pb2.ListWorkflowRunsRequest(
                state=state, page_size=1000, page_token=token
            ),
            metadata=OPERATOR,
        )
        total += len(page.runs)
        token = page.next_page_token
        if not token:
            return total


async def _settle(work: Any, outcome: Outcome, limit: float, sample: Callable[[], None]) -> None:
    """Wait (bounded) until every run triggered has finished; count the failed ones."""
    deadline = time.monotonic() + limit
    while True:
        sample()
        done = await _count(work, workflow_pb2.RUN_STATE_SUCCEEDED)
        outcome.failed = await _count(work, workflow_pb2.RUN_STATE_FAILED)
        outcome.unfinished = outcome.triggered - done - outcome.failed
        if not outcome.unfinished:
            return
        if time.monotonic() > deadline:
            outcome.stuck = await _unfinished(work)
            return
        await asyncio.sleep(1.0)


async def _unfinished(work: Any) -> list[str]:
    """Every run still pending or running: its tasks' names, states, attempts and holders."""
    described = []
    for state in (workflow_pb2.RUN_STATE_PENDING, workflow_pb2.RUN_STATE_RUNNING):
        page = await work.ListWorkflowRuns(
            workflow_service_pb2.ListWorkflowRunsRequest(
                state=state, page_size=100, view=workflow_pb2.WORKFLOW_RUN_VIEW_FULL
            ),
            metadata=OPERATOR,
        )
        for run in page.runs:
            tasks = ", ".join(
                f"{task.name}: {workflow_pb2.TaskState.Name(task.state)} attempt "
                f"{task.attempt} on {task.agent_id or '-'} ({task.error or task.waiting_reason})"
                for task in run.tasks
            )
            described.append(f"{run.run_id} {workflow_pb2.RunState.Name(run.state)}: {tasks}")
    return described


def measure(load: Load) -> tuple[Outcome, list[int]]:
    """`load` against a fresh `opscore serve`: what it measured, and the RSS samples (bytes)."""
    with tempfile.TemporaryDirectory(prefix="opscore-silent-") as workdir:
        server = opscore_server("opscore", sqlite_url(Path(workdir) / "db.sqlite"), Path(workdir))
        server.start()
        try:
            pid = server.pid
            samples = [rss_bytes(pid)]
            outcome = asyncio.run(
                drive(server.target, load, lambda: samples.append(rss_bytes(pid)))
            )
            samples.append(rss_bytes(pid))
        finally:
            server.close()
    return outcome, samples


def main() -> None:
    """Both loads, one after the other, and the figures side by side."""
    parser = argparse.ArgumentParser(prog="python -m bench.silent", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="runs triggered per second")
    parser.add_argument("--agents", type=int, default=4, help="well-behaved agents")
    parser.add_argument("--slots", type=int, default=200, help="the silent agent's slots")
    parser.add_argument("--lease", type=int, default=10, help="each task's timeout, seconds")
    parser.add_argument("--no-baseline", action="store_true", help="skip the load without it")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    base = Load(seconds=args.seconds, rate=args.rate, agents=args.agents, lease=args.lease)
    loads = [("with the silent agent", Load(**{**_fields(base), "silent_slots": args.slots}))]
    if not args.no_baseline:
        loads.append(("without", base))
    rows = [_row(label, *measure(load)) for label, load in loads]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.seconds:g} s at {args.rate:g} runs/s, {args.agents} agents; RSS in MiB")
    print("| Load | RSS start | peak | end | p50 ms | p90 ms | runs | failed | unfinished |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['load']} | {row['rss_start_mib']:.0f} | {row['rss_peak_mib']:.0f} "
            f"| {row['rss_end_mib']:.0f} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} "
            f"| {row['runs']} | {row['failed']} | {row['unfinished']} |"
        )
        if row["silent_state"]:
            print(f"silent agent at the end: {row['silent_state']}, {row['silent_detail']!r}")


def _row(label: str, outcome: Outcome, rss: list[int]) -> dict[str, Any]:
    silent = outcome.silent
    return {
        "load": label,
        "rss_start_mib": rss[0] / 2**20,
        "rss_peak_mib": max(rss) / 2**20,
        "rss_end_mib": rss[-1] / 2**20,
        "p50_ms": outcome.percentile(0.5),
        "p90_ms": outcome.percentile(0.9),
        "runs": outcome.triggered,
        "failed": outcome.failed,
        "unfinished": outcome.unfinished,
        "stuck": outcome.stuck,
        "silent_state": "" if silent is None else agent_pb2.AgentState.Name(silent.state),
        "silent_detail": "" if silent is None else silent.state_detail,
    }


def _fields(load: Load) -> dict[str, Any]:
    return {name: getattr(load, name) for name in Load.__dataclass_fields__}


if __name__ == "__main__":
    main()
