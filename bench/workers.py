"""The orchestrator's side of the load processes: spawn them, send them commands, gather what
they measured, and make sure they are gone at the end.

The load runs in processes of its own (multiprocessing, `spawn`, so nothing of the
orchestrator's gRPC state is inherited): a few hold the agents, one is the trigger client. Every
command waits for its answer with a bound, so a wedged process fails the run instead of hanging
it.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from bench.load import RunSpec, worker_main
from bench.servers import BenchError

COMMAND_WAIT = 600.0
"""Seconds any one command may take (the longest fills at a million tasks)."""


class LoadPool:
    """`agent_processes` processes for agents plus one trigger process."""

    def __init__(self, agent_processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.tasks_done: Synchronized[int] = context.Value("q", 0)
        self.runs_done: Synchronized[int] = context.Value("q", 0)
        self._processes: list[multiprocessing.context.SpawnProcess] = []
        self._pipes: list[Connection] = []
        for index in range(agent_processes + 1):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(theirs, self.tasks_done, self.runs_done),
                name=f"bench-load-{index}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            self._pipes.append(ours)
        self.agent_workers = list(range(agent_processes))
        self.trigger_worker = agent_processes

    def reset_counters(self) -> None:
        """Zero the shared completion counters (between steps, when nothing is in flight)."""
        for counter in (self.tasks_done, self.runs_done):
            with counter.get_lock():
                counter.value = 0

    def send(self, worker: int, name: str, **arguments: Any) -> None:
        """Send a command without waiting for its answer."""
        self._pipes[worker].send((name, arguments))

    def receive(self, worker: int, timeout: float = COMMAND_WAIT) -> Any:
        """The answer to the command sent last to `worker`."""
        pipe = self._pipes[worker]
        if not pipe.poll(timeout):
            raise BenchError(f"load process {worker} did not answer within {timeout} s")
        status, result = pipe.recv()
        if status != "ok":
            raise BenchError(f"load process {worker} failed:\n{result}")
        return result

    def call(self, worker: int, name: str, timeout: float = COMMAND_WAIT, **arguments: Any) -> Any:
        """Send a command and wait for its answer."""
        self.send(worker, name, **arguments)
        return self.receive(worker, timeout)

    def call_agents(self, name: str, per_worker: list[dict[str, Any]] | None = None) -> list[Any]:
        """The same command to every agent process at once (each with its own arguments when
        `per_worker` is given); their answers in order."""
        workers = self.agent_workers
        for index, worker in enumerate(workers):
            self.send(worker, name, **(per_worker[index] if per_worker else {}))
        return [self.receive(worker) for worker in workers]

    def start_agents(
        self,
        target: str,
        agents: list[tuple[str, list[str]]],
        per_channel: int = 1,
        wait_for_ready: bool = False,
    ) -> None:
        """Spread `agents` over the agent processes (round robin) and start them."""
        count = len(self.agent_workers)
        shares = [agents[index::count] for index in range(count)]
        arguments = [
            {
                "target": target,
                "agents": share,
                "per_channel": per_channel,
                "wait_for_ready": wait_for_ready,
            }
            for share in shares
        ]
        self.call_agents("start_agents", arguments)

    def stop_agents(self) -> None:
        """Close every agent of every agent process."""
        self.call_agents("stop_agents")

    def collect(self) -> tuple[dict[str, list[float]], dict[str, float], int]:
        """Everything the agents measured since the last collection, merged: samples by
        `tag/kind`, first receipt by tag (earliest), error count."""
        values: dict[str, list[float]] = {}
        first: dict[str, float] = {}
        errors = 0
        for part in self.call_agents("collect"):
            for key, samples in part["values"].items():
                values.setdefault(key, []).extend(samples)
            for tag, when in part["first_received"].items():
                first[tag] = min(when, first.get(tag, when))
            errors += part["errors"]
        return values, first, errors

    def trigger(self, name: str, timeout: float = COMMAND_WAIT, **arguments: Any) -> Any:
        """A command to the trigger process."""
        return self.call(self.trigger_worker, name, timeout, **arguments)

    def ping(self, target: str, agent_ids: list[str], timeout: float = 30.0) -> None:
        """Wait until each agent takes a task pinned to it: its stream is open and dispatch
        reaches it. Fails the run if one never does."""
        specs = [RunSpec(capability="work", agent_id=agent_id) for agent_id in agent_ids]
        result = self.trigger("sequential", target=target, specs=specs, tag="ping", timeout=timeout)
        if result["completed"] != len(specs):
            raise BenchError(f"only {result['completed']} of {len(specs)} agents answered a ping")

    def close(self) -> None:
        """Ask every process to exit, then kill those that do not (bounded)."""
        for pipe in self._pipes:
            try:
                pipe.send(("exit", {}))
            except OSError:
                continue
        for process in self._processes:
            process.join(10.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
        for pipe in self._pipes:
            pipe.close()
