"""The benchmark's orchestration: which servers run, in which order the scenarios drive them,
and where the results go. Plain synchronous code: the load itself runs in other processes
(bench.workers), the servers in subprocesses (bench.servers).

Each server kind (`opscore` on SQLite, `ceiling`, and `postgres` when OPSCORE_BENCH_POSTGRES_URL
is set) gets a fresh server, and a fresh database, per phase: throughput and latency (one server
of each kind, all running at once, the kinds taking turns at every step); queue depth then
recovery (on the database the queue-depth scenario filled); fleet. Every kind runs every
scenario, so the table has a PostgreSQL column for each row. On PostgreSQL two phases follow
(alone with `--replicas`): deployments of 1, 2 and 3 replicas on one database each, beside the
ceiling, taking turns (throughput, the CPU and the database's work per task, a trickle across
replicas); then one replica with a backlog, beside an empty twin (its RSS and its dispatch).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import resource
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from opscore.v1 import workflow_pb2

from bench import report
from bench.load import RunSpec
from bench.plan import FULL, MILLION, QUICK, Plan
from bench.servers import (
    Activity,
    BenchError,
    Deployment,
    Replicas,
    ServerProcess,
    activity,
    ceiling_server,
    count_statements,
    opscore_server,
    postgres_database,
    postgres_settings,
    sqlite_url,
)
from bench.stats import summary
from bench.workers import LoadPool

Served = TypeVar("Served", bound=Deployment)
"""A server, or replicas of one, that `Bench.serving` starts and stops."""

BACKLOG_RUN = 1000
"""Tasks per backlog run: Ops-Core's default limit of tasks per definition."""

SHAPES: dict[str, tuple[str, str, int]] = {
    "single": ("bench-single", "t0", 1),
    "chain10": ("bench-chain10", "t9", 10),
}
"""Each run shape: its stored definition, its last task, its number of tasks."""


def definitions() -> list[bytes]:
    """The stored definitions every server gets: a 1-task run, a 10-task chain, and a backlog
    run of 1000 root tasks for a capability no agent offers."""
    single = workflow_pb2.WorkflowDefinition(
        workflow_name="bench-single", tasks=[workflow_pb2.TaskSpec(name="t0", capability="work")]
    )
    chain = workflow_pb2.WorkflowDefinition(
        workflow_name="bench-chain10",
        tasks=[
            workflow_pb2.TaskSpec(
                name=f"t{index}",
                capability="work",
                depends_on=[f"t{index - 1}"] if index else [],
            )
            for index in range(10)
        ],
    )
    payload = struct_pb2.Struct()
    payload.fields["queued"].bool_value = True
    backlog = workflow_pb2.WorkflowDefinition(
        workflow_name="bench-backlog",
        tasks=[
            workflow_pb2.TaskSpec(name=f"q{index}", capability="nobody", input=payload)
            for index in range(BACKLOG_RUN)
        ],
    )
    return [item.SerializeToString() for item in (single, chain, backlog)]


class Costs:
    """What a deployment of replicas spends per completed task, summed over its closed-loop steps
    by run shape: its replicas' CPU time (user + system, /proc/PID/stat), its database
    connections' CPU time, and what its database did (commits; statements where
    pg_stat_statements is loaded; rows written and table scans from pg_stat_user_tables).

    A step counts from before its agents register to the end of its closed loop (drained), its
    pings among its tasks. The CPU times are read live at both ends. The database's counters are
    not: a backend reports them at most once a second while busy and within ten seconds of
    going idle (at once when it exits). So a step's counters run from the look before it to the
    look before this deployment's next step (the other deployments' steps in between, ten
    seconds or more), and the last step's to a look after the replicas stopped. What the idle
    replicas do meanwhile (a lease renewal every few seconds) is counted in: a few commits
    beside thousands of tasks."""

    def __init__(self, replicas: Replicas, db_url: str) -> None:
        self.replicas = replicas
        self.db_url = db_url
        self.statements = count_statements(db_url)
        """Whether pg_stat_statements counts this database's statements."""
        self._totals: dict[str, dict[str, Any]] = {}
        self._open: tuple[str, Activity] | None = None
        """The shape of the step the database's counters are charged to, since which look."""
        self._cpu: list[float] = []
        self._started = 0.0

    def _shape(self, shape: str) -> dict[str, Any]:
        empty = {
            "tasks": 0,
            "seconds": 0.0,
            "replica_cpu_s": [0.0] * len(self.replicas.servers),
            "backend_cpu_s": 0.0,
            "database": {},
        }
        return self._totals.setdefault(shape, empty)

    def _settle(self, look: Activity) -> None:
        """Charge what the database did since the open look to that look's step."""
        if self._open is not None:
            shape, since = self._open
            database = self._shape(shape)["database"]
            for name, value in look.minus(since).items():
                database[name] = database.get(name, 0.0) + value

    def begin(self, shape: str) -> None:
        """A step of `shape` starts (before its agents register)."""
        look = activity(self.db_url)
        self._settle(look)
        self._open = (shape, look)
        self._cpu = self.replicas.cpu_seconds()
        self._started = time.monotonic()

    def end(self, shape: str, tasks: int) -> None:
        """The step ended, `tasks` completed in it."""
        assert self._open is not None
        totals = self._shape(shape)
        totals["tasks"] += tasks
        totals["seconds"] += time.monotonic() - self._started
        used = zip(totals["replica_cpu_s"], self.replicas.cpu_seconds(), self._cpu, strict=True)
        totals["replica_cpu_s"] = [total + now - before for total, now, before in used]
        totals["backend_cpu_s"] += self._open[1].cpu_since()

    def close(self) -> None:
        """The last look, once the replicas have stopped."""
        self._settle(activity(self.db_url))
        self._open = None

    def figures(self) -> dict[str, dict[str, Any]]:
        """By shape: the totals, and each per completed task (CPU in milliseconds)."""
        figures: dict[str, dict[str, Any]] = {}
        for shape, totals in self._totals.items():
            tasks = max(1, totals["tasks"])
            figures[shape] = {
                "tasks": totals["tasks"],
                "seconds": totals["seconds"],
                "replica_cpu_s": totals["replica_cpu_s"],
                "cpu_ms_per_task": sum(totals["replica_cpu_s"]) / tasks * 1000,
                "backend_cpu_ms_per_task": totals["backend_cpu_s"] / tasks * 1000,
                **{
                    f"{name}_per_task": value / tasks
                    for name, value in sorted(totals["database"].items())
                },
            }
        return figures


class Bench:
    """One benchmark run: the plan, the load processes, the results as they come."""

    def __init__(self, plan: Plan, workdir: Path, million: bool) -> None:
        self.plan = plan
        self.workdir = workdir
        self.million = million
        self.pool = LoadPool(plan.agent_processes)
        self.results: dict[str, Any] = {
            "throughput": {},
            "latency": {},
            "queue_depth": {},
            "fleet": {},
            "recovery": {},
            "replicas": {},
        }
        self.errors: list[str] = []
        self._serial = 0

    # Servers ------------------------------------------------------------------------------

    def _server(self, kind: str, db_url: str | None, phase: str, preload: int = 0) -> ServerProcess:
        """A new (not yet started) server of `kind` for `phase`."""
        self._serial += 1
        label = f"{kind}-{phase}-{self._serial}"
        if kind == "ceiling":
            return ceiling_server(self.workdir, preload=preload, label=label)
        assert db_url is not None
        return opscore_server(label, db_url, self.workdir)

    def _replicas(self, count: int, db_url: str) -> Replicas:
        """`count` new (not yet started) replicas on `db_url`."""
        self._serial += 1
        return Replicas(f"replicas{count}-{self._serial}", count, db_url, self.workdir)

    @contextlib.contextmanager
    def serving(self, server: Served) -> Iterator[Served]:
        """The server (or replicas) started and given the definitions; stopped (killed if need
        be) after."""
        try:
            server.start()
            self.pool.trigger("define", target=server.target, definitions=definitions())
            yield server
        finally:
            server.close()

    def _agents(
        self, prefix: str, count: int, capabilities: list[str]
    ) -> list[tuple[str, list[str]]]:
        """`count` agents with fresh ids (ids are never reused across steps)."""
        self._serial += 1
        return [(f"{prefix}-{self._serial}-{index}", capabilities) for index in range(count)]

    def _with_agents(
        self, target: str | Sequence[str], agents: list[tuple[str, list[str]]], ping: bool = True
    ) -> None:
        """Start the agents and (for small groups) make sure each one takes a task. Given
        several targets (replicas), the agents go to each in turn, and each is pinged through
        its own."""
        targets = [target] if isinstance(target, str) else list(target)
        groups = [(where, agents[index :: len(targets)]) for index, where in enumerate(targets)]
        for where, group in groups:
            if group:
                self.pool.start_agents(where, group)
        if ping:
            for where, group in groups:
                if group:
                    self.pool.ping(where, [agent_id for agent_id, _ in group])
        self.pool.collect()
        self.pool.reset_counters()

    # Scenarios ----------------------------------------------------------------------------

    def throughput_and_latency(self, kinds: list[tuple[str, str | None]]) -> None:
        """Scenario 1 (closed loop, tasks/s per shape and agent count) and scenario 2 (open
        loop at half the maximum just measured, then a trickle), on one fresh server of each
        kind (`(kind, database URL)`), all running at once. Every step runs
        `plan.rounds` times with the kinds taking turns, so that each kind meets the machine in
        the same state: a shared machine's speed moves by tens of percent within minutes, and a
        ceiling measured minutes apart from Ops-Core made one run's ratios move by ±0.1."""
        plan = self.plan
        with contextlib.ExitStack() as stack:
            servers = {
                kind: stack.enter_context(self.serving(self._server(kind, url, "throughput")))
                for kind, url in kinds
            }
            measured: dict[str, dict[str, dict[str, float]]] = {kind: {} for kind in servers}
            for shape in plan.shapes:
                definition, last, _ = SHAPES[shape]
                spec = RunSpec(workflow_name=definition, last=last)
                for count in plan.agent_counts:
                    rounds: dict[str, list[float]] = {kind: [] for kind in servers}
                    for _ in range(plan.rounds):
                        for kind, server in servers.items():
                            rounds[kind].append(self.closed_loop(server, spec, count))
                    for kind, values in rounds.items():
                        measured[kind].setdefault(shape, {})[str(count)] = statistics.median(values)
                        print(
                            f"  {kind} throughput {shape} x{count}: "
                            f"{statistics.median(values):.0f} tasks/s "
                            f"(rounds: {', '.join(f'{value:.0f}' for value in values)})",
                            flush=True,
                        )
            for kind in servers:
                self.results["throughput"][kind] = measured[kind]
            self._latency(servers, measured)

    def closed_loop(
        self,
        server: Deployment,
        spec: RunSpec,
        count: int,
        costs: Costs | None = None,
        shape: str = "",
    ) -> float:
        """Tasks/s of `count` fresh agents kept busy by a closed loop of runs. On replicas the
        agents are spread over them evenly, each streaming from and reporting to its own, and
        the triggers go to each in turn; `costs` counts what the step (of `shape`) spent."""
        plan = self.plan
        if costs is not None:
            costs.begin(shape)
        self._with_agents(server.targets, self._agents("tp", count, ["work"]))
        try:
            result = self.pool.trigger(
                "closed_loop",
                target=server.targets,
                spec=spec,
                in_flight=2 * count + 2,
                warmup=plan.warmup,
                window=plan.window,
            )
            if costs is not None:
                costs.end(shape, self.pool.tasks_done.value + count)
        finally:
            self.pool.collect()
            self.pool.stop_agents()
        return float(result["tasks_per_s"])

    def trickle(self, server: ServerProcess, runs: int) -> list[float]:
        """Seconds from trigger to first assignment of `runs` 10-task chains triggered one at a
        time, with the latency scenario's agents (fresh ones) connected."""
        plan = self.plan
        self._with_agents(server.target, self._agents("lat", plan.latency_agents, ["work"]))
        try:
            spec = RunSpec(workflow_name="bench-chain10", last="t9")
            self.pool.trigger("sequential", target=server.target, specs=[spec] * runs, tag="ab")
            values, _, _ = self.pool.collect()
        finally:
            self.pool.stop_agents()
        return values.get("ab/first", [])

    def _latency(
        self, servers: dict[str, ServerProcess], measured: dict[str, dict[str, dict[str, float]]]
    ) -> None:
        """Scenario 2 on each server, the kinds taking turns round by round (each round a share
        of the open loop's duration and of the trickle's runs), samples pooled by kind."""
        plan = self.plan
        shape = "chain10" if "chain10" in plan.shapes else plan.shapes[0]
        definition, last, size = SHAPES[shape]
        spec = RunSpec(workflow_name=definition, last=last)
        trickle_spec = RunSpec(workflow_name="bench-chain10", last="t9")
        rates: dict[str, float] = {}
        for kind in servers:
            found = measured[kind][shape]
            base = found.get(str(plan.latency_agents)) or max(found.values())
            rates[kind] = max(1.0, 0.5 * base / size)
        samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in servers}
        achieved: dict[str, list[float]] = {kind: [] for kind in servers}
        trickle_runs = max(1, plan.trickle_runs // plan.rounds)
        for _ in range(plan.rounds):
            for kind, server in servers.items():
                self._with_agents(server.target, self._agents("lat", plan.latency_agents, ["work"]))
                try:
                    half = self.pool.trigger(
                        "open_loop",
                        target=server.target,
                        spec=spec,
                        rate=rates[kind],
                        duration=plan.half_load_seconds / plan.rounds,
                        tag="half",
                    )
                    achieved[kind].append(half["achieved_rate"])
                    values, _, _ = self.pool.collect()
                    self.pool.trigger(
                        "sequential",
                        target=server.target,
                        specs=[trickle_spec] * trickle_runs,
                        tag="trickle",
                    )
                    trickled, _, _ = self.pool.collect()
                finally:
                    self.pool.stop_agents()
                for collected in (values, trickled):
                    for name, drawn in collected.items():
                        samples[kind].setdefault(name, []).extend(drawn)
        for kind in servers:
            latency: dict[str, Any] = {
                "half_load": {
                    "shape": shape,
                    "rate_runs_per_s": rates[kind],
                    "achieved_runs_per_s": statistics.mean(achieved[kind]),
                },
                "trickle": {"shape": "chain10", "runs": trickle_runs * plan.rounds},
            }
            for phase, tag in (("half_load", "half"), ("trickle", "trickle")):
                for kind_name in ("first", "next", "run"):
                    taken = samples[kind].get(f"{tag}/{kind_name}")
                    if taken:
                        latency[phase][kind_name] = summary(taken)
            self.results["latency"][kind] = latency

    def queue_depth_and_recovery(
        self, kind: str, db_url: str | None, empty_url: str | None
    ) -> None:
        """Scenario 3 (dispatch latency with 0 .. N tasks queued nobody can take), then
        scenario 5 (restart on that database: time to SERVING and to the first push).

        An empty twin (a second server of the same kind, on a database of its own, `empty_url`)
        runs beside the filled one, and at every depth the two take turns at the probes: the
        target compares the filled server with nothing queued at the same moment. Measured
        minutes apart, before and after the fill, the same comparison moved with the machine's
        speed (1.34 in one run, 0.90-1.10 when that step ran again right after)."""
        plan = self.plan
        server = self._server(kind, db_url, "depth")
        depths: dict[str, Any] = {}
        queued = 0
        with (
            self.serving(self._server(kind, empty_url, "depth-empty")) as empty,
            self.serving(server),
        ):
            for depth in plan.depths:
                queued, depths[str(depth)] = self._at_depth(server, empty, queued, depth)
            if kind != "ceiling":
                self.results["recovery"][kind] = self._recover(server, queued)
            if self.million:
                queued, depths[str(MILLION)] = self._at_depth(server, empty, queued, MILLION)
        self.results["queue_depth"][kind] = depths
        if kind == "ceiling":
            ceiling = self._server(kind, None, "recovery", preload=plan.recovery_tasks)
            try:
                self.results["recovery"][kind] = self._recover(
                    ceiling, plan.recovery_tasks, fresh=True
                )
            finally:
                ceiling.close()

    def _at_depth(
        self, server: ServerProcess, empty: ServerProcess, queued: int, depth: int
    ) -> tuple[int, dict[str, Any]]:
        """Fill `server` (`queued` tasks so far) to `depth`, then probe it and its `empty` twin,
        each with one idle agent (`_probe_depth`); both servers' RSS after the probes. The tasks
        queued now, and the figures."""
        for target in (server.target, empty.target):
            self._with_agents(target, self._agents("depth", 1, ["work"]))
        try:
            queued = self._fill(server.target, queued, depth)
            figures = self._probe_depth(server.target, empty.target, depth)
            figures["rss_mib"] = server.rss() / 2**20
            figures["empty"]["rss_mib"] = empty.rss() / 2**20
        finally:
            self.pool.stop_agents()
        return queued, figures

    def _fill(self, target: str, queued: int, depth: int) -> int:
        """Queue backlog runs until `depth` tasks nobody can take are queued."""
        runs = max(0, (depth - queued) // BACKLOG_RUN)
        if runs:
            result = self.pool.trigger(
                "fill", target=target, workflow_name="bench-backlog", runs=runs, concurrency=4
            )
            if result["runs"] != runs:
                raise BenchError(f"only {result['runs']} of {runs} backlog runs were accepted")
            print(f"    queued {runs * BACKLOG_RUN} tasks in {result['seconds']:.1f} s")
        return queued + runs * BACKLOG_RUN

    def _probe_depth(self, target: str, empty_target: str, depth: int) -> dict[str, Any]:
        """Dispatch latency of single-task runs one idle agent can take, one at a time, on the
        filled server (`target`) and its empty twin taking turns, `plan.rounds` turns each, the
        one to go first alternating: the filled server's figures, with the twin's under
        `empty`."""
        tags = {target: f"depth{depth}", empty_target: f"depth{depth}-empty"}
        spec = RunSpec(workflow_name="bench-single", last="t0")
        rounds = max(1, self.plan.rounds)
        turns = [target, empty_target]
        for index in range(rounds):
            probes = self.plan.depth_probes // rounds + (index < self.plan.depth_probes % rounds)
            for where in turns if index % 2 == 0 else reversed(turns):
                self.pool.trigger(
                    "sequential", target=where, specs=[spec] * probes, tag=tags[where]
                )
        values, _, _ = self.pool.collect()
        found = {where: values.get(f"{tag}/first", []) for where, tag in tags.items()}
        if not all(found.values()):
            raise BenchError(f"no dispatch measured at depth {depth}")
        figures: dict[str, Any] = summary(found[target])
        figures["empty"] = summary(found[empty_target])
        print(
            f"    depth {depth}: p50 {figures['p50_ms']:.2f} ms "
            f"(the empty twin meanwhile {figures['empty']['p50_ms']:.2f} ms)"
        )
        return figures

    def _recover(self, server: ServerProcess, queued: int, fresh: bool = False) -> dict[str, float]:
        """Stop the server (unless `fresh`, a server never started), start it again on the same
        database and port with an agent already dialling it that can take the queued tasks:
        seconds from process start to SERVING and to that agent's first push."""
        if not fresh:
            server.close()
        agents = self._agents("recover", 1, ["nobody"])
        first = self.pool.agent_workers[0]
        self.pool.send(
            first, "start_agents", target=server.target, agents=agents, wait_for_ready=True
        )
        try:
            server.spawn()
            serving = server.wait_serving()
            self.pool.receive(first, timeout=60.0)
            deadline = time.monotonic() + 60.0
            pushed: float | None = None
            while pushed is None and time.monotonic() < deadline:
                time.sleep(0.05)
                _, received, _ = self.pool.collect()
                pushed = received.get("backlog")
            if pushed is None:
                raise BenchError("no queued task was pushed after the restart")
        finally:
            self.pool.stop_agents()
        result = {
            "queued_tasks": queued,
            "serving_s": serving,
            "first_push_s": pushed - server.started_at,
        }
        print(f"    recovery on {queued} tasks: SERVING {serving:.2f} s")
        return result

    def fleet(self, kind: str, db_url: str | None) -> None:
        """Scenario 4: many idle agents connected; server RSS, and dispatch latency of tasks
        only one of them (a random one each time) can take."""
        plan = self.plan
        with self.serving(self._server(kind, db_url, "fleet")) as server:
            agents = [
                (agent_id, [f"u:{agent_id}"])
                for agent_id, _ in self._agents("fleet", plan.fleet_agents, [])
            ]
            started = time.monotonic()
            try:
                self.pool.start_agents(server.target, agents, per_channel=plan.fleet_per_channel)
                workers = len(self.pool.agent_workers)
                # Streams open roughly in order: once the last of each process is reached,
                # the fleet is up.
                lasts = [agents[-1 - index] for index in range(min(workers, len(agents)))]
                self._sequential(server.target, lasts, "fleetready", timeout=120.0)
                connect_seconds = time.monotonic() - started
                time.sleep(1.0)
                rss = server.rss()
                chosen = random.Random(7).sample(agents, min(plan.fleet_probes, len(agents)))
                self.pool.collect()
                self._sequential(server.target, chosen, "fleet", timeout=10.0)
                values, _, _ = self.pool.collect()
            finally:
                self.pool.stop_agents()
        samples = values.get("fleet/first")
        if not samples:
            raise BenchError("no dispatch measured in the fleet")
        self.results["fleet"][kind] = {
            "agents": plan.fleet_agents,
            "rss_mib": rss / 2**20,
            "connect_s": connect_seconds,
            "dispatch": summary(samples),
        }
        print(f"    fleet of {plan.fleet_agents}: RSS {rss / 2**20:.0f} MiB")

    def _sequential(
        self, target: str, agents: list[tuple[str, list[str]]], tag: str, timeout: float
    ) -> None:
        """One run at a time, each for the unique capability of one of `agents`."""
        specs = [RunSpec(capability=capabilities[0]) for _, capabilities in agents]
        result = self.pool.trigger(
            "sequential", target=target, specs=specs, tag=tag, timeout=timeout
        )
        if result["completed"] != len(specs):
            raise BenchError(f"{tag}: {result['completed']} of {len(specs)} runs completed")

    def replicas(self, postgres_url: str) -> None:
        """Scenario 6: deployments of `plan.replica_counts` replicas, each on a fresh database of
        the PostgreSQL server of `postgres_url`, and the ceiling, all running at once.

        First the trickle (`_replica_trickle`) on the deployment of two. Then, for each shape,
        `plan.rounds` rounds of closed loops at `plan.replica_agents` agents, the ceiling and
        the deployments taking turns as in scenario 1: the agents spread evenly over a
        deployment's replicas, each streaming from and reporting to its own, and the triggers
        going to each replica in turn. Each deployment's `Costs` are counted through its steps
        and settled once its replicas have stopped."""
        plan = self.plan
        figures: dict[str, Any] = {"throughput": {}, "throughput_rounds": {}, "cost": {}}
        ceiling_figures: dict[str, Any] = {"throughput": {}, "throughput_rounds": {}}
        with contextlib.ExitStack() as databases:
            urls = {
                count: databases.enter_context(postgres_database(postgres_url))
                for count in plan.replica_counts
            }
            with contextlib.ExitStack() as stack:
                ceiling = stack.enter_context(self.serving(self._server("ceiling", None, "rep")))
                deployments = {
                    count: stack.enter_context(self.serving(self._replicas(count, url)))
                    for count, url in urls.items()
                }
                costs = {count: Costs(deployments[count], urls[count]) for count in deployments}
                pair = min(count for count in deployments if count >= 2)
                same, other, alone = self._replica_trickle(ceiling, deployments[pair])
                figures["trickle"] = {"replicas": pair, "same": same, "other": other}
                ceiling_figures["trickle"] = alone
                for shape in plan.shapes:
                    definition, last, _ = SHAPES[shape]
                    spec = RunSpec(workflow_name=definition, last=last)
                    rounds: dict[str, list[float]] = {"ceiling": []}
                    for _ in range(plan.rounds):
                        rounds["ceiling"].append(
                            self.closed_loop(ceiling, spec, plan.replica_agents)
                        )
                        for count, deployment in deployments.items():
                            rounds.setdefault(str(count), []).append(
                                self.closed_loop(
                                    deployment, spec, plan.replica_agents, costs[count], shape
                                )
                            )
                    for name, values in rounds.items():
                        print(
                            f"  replicas {name} throughput {shape} x{plan.replica_agents}: "
                            f"{statistics.median(values):.0f} tasks/s "
                            f"(rounds: {', '.join(f'{value:.0f}' for value in values)})",
                            flush=True,
                        )
                    alone_rounds = rounds.pop("ceiling")
                    ceiling_figures["throughput"][shape] = statistics.median(alone_rounds)
                    ceiling_figures["throughput_rounds"][shape] = alone_rounds
                    figures["throughput"][shape] = {
                        name: statistics.median(values) for name, values in rounds.items()
                    }
                    figures["throughput_rounds"][shape] = rounds
            # The replicas have stopped: every backend has reported its counters.
            for count, cost in costs.items():
                cost.close()
                for shape, spent in cost.figures().items():
                    figures["cost"].setdefault(shape, {})[str(count)] = spent
            figures["statements_from"] = (
                "pg_stat_statements"
                if all(cost.statements for cost in costs.values())
                else "pg_stat_user_tables"
            )
        self.results["replicas"].setdefault("postgres", {}).update(figures)
        self.results["replicas"].setdefault("ceiling", {}).update(ceiling_figures)

    def _replica_trickle(
        self, ceiling: ServerProcess, replicas: Replicas
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """Trigger -> assignment of 1-task runs triggered one at a time, with ONE agent,
        streaming from the first replica: runs triggered on that replica (the same) and on the
        second (another), `plan.replica_trickle_runs` each, interleaved with as many on the
        ceiling (an agent of its own), who goes first rotating. Their summaries: same, other,
        ceiling."""
        same, other = replicas.targets[:2]
        self._with_agents(same, self._agents("rtrickle", 1, ["work"]))
        self._with_agents(ceiling.target, self._agents("rtrickle", 1, ["work"]))
        spec = RunSpec(workflow_name="bench-single", last="t0")
        sides = [(same, "same"), (other, "other"), (ceiling.target, "ceiling")]
        steps: list[tuple[str, RunSpec, str]] = []
        for index in range(self.plan.replica_trickle_runs):
            turn = index % len(sides)
            steps += [
                (where, spec, f"rtrickle-{side}") for where, side in sides[turn:] + sides[:turn]
            ]
        try:
            result = self.pool.trigger("interleaved", steps=steps)
            values, _, _ = self.pool.collect()
        finally:
            self.pool.stop_agents()
        if result["completed"] != len(steps):
            raise BenchError(f"trickle: {result['completed']} of {len(steps)} runs completed")
        found = [values.get(f"rtrickle-{side}/first", []) for _, side in sides]
        if not all(found):
            raise BenchError("trickle: no dispatch measured on one side")
        same_figures, other_figures, alone = (summary(samples) for samples in found)
        print(
            f"  replicas trickle p50 {same_figures['p50_ms']:.2f} ms on the agent's replica, "
            f"{other_figures['p50_ms']:.2f} ms from another (p99 {same_figures['p99_ms']:.2f}, "
            f"{other_figures['p99_ms']:.2f}); the ceiling {alone['p50_ms']:.2f}",
            flush=True,
        )
        return same_figures, other_figures, alone

    def replica_backlog(self, postgres_url: str) -> None:
        """Scenario 7: one replica on a fresh PostgreSQL database, filled with tasks of a
        capability no agent has, beside an empty twin (a replica on a database of its own), as
        scenario 3 does (`_at_depth`): dispatch with nothing queued (the RSS there is its idle
        size, one agent connected), at the plan's deepest queue, and at 1,000,000 with
        `--million`. A replica keeps at most a bounded prefetch of the backlog in memory."""
        depths = sorted({0, self.plan.depths[-1], *([MILLION] if self.million else [])})
        found: dict[str, Any] = {}
        queued = 0
        with (
            postgres_database(postgres_url) as filled_url,
            postgres_database(postgres_url) as empty_url,
        ):
            server = self._server("postgres", filled_url, "replica-backlog")
            with (
                self.serving(self._server("postgres", empty_url, "replica-empty")) as empty,
                self.serving(server),
            ):
                for depth in depths:
                    queued, found[str(depth)] = self._at_depth(server, empty, queued, depth)
                    print(
                        f"    replica RSS at {depth} queued: {found[str(depth)]['rss_mib']:.0f} MiB"
                    )
        self.results["replicas"].setdefault("postgres", {})["backlog"] = found

    # The whole run ------------------------------------------------------------------------

    def attempt(self, name: str, step: Callable[[], None]) -> None:
        """Run one phase; a failure is recorded and reported, and the next phase still runs."""
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            step()
            print(f"   ({time.monotonic() - started:.1f} s)", flush=True)
        except Exception:  # noqa: BLE001 - one phase failing must not lose the others
            text = traceback.format_exc()
            self.errors.append(f"{name}: {text}")
            print(text, flush=True)

    def run(self, postgres_url: str | None, replicas_only: bool = False) -> None:
        """Every scenario on every server kind (only the replicas' with `replicas_only`)."""
        phases: list[tuple[str, Callable[[], None]]] = []
        if postgres_url:
            replicas = (
                "replicas on PostgreSQL: "
                f"{', '.join(map(str, self.plan.replica_counts))} replicas and the ceiling, "
                "taking turns"
            )
            phases = [
                (replicas, functools.partial(self.replicas, postgres_url)),
                (
                    "replicas on PostgreSQL: one replica with a backlog, an empty twin beside",
                    functools.partial(self.replica_backlog, postgres_url),
                ),
            ]
        if replicas_only:
            for name, phase in phases:
                self.attempt(name, phase)
            return
        kinds = ["ceiling", "opscore"] + (["postgres"] if postgres_url else [])

        @contextlib.contextmanager
        def database(kind: str) -> Iterator[str | None]:
            """A fresh database for one phase of `kind` (none for the ceiling)."""
            if kind == "postgres":
                assert postgres_url is not None
                with postgres_database(postgres_url) as url:
                    yield url
            elif kind == "opscore":
                yield sqlite_url(self.workdir / f"{kind}-{time.monotonic_ns()}.db")
            else:
                yield None

        def throughput_and_latency() -> None:
            with contextlib.ExitStack() as stack:
                self.throughput_and_latency(
                    [(kind, stack.enter_context(database(kind))) for kind in kinds]
                )

        def on_fresh_database(kind: str, phase: Callable[[str, str | None], None]) -> None:
            with database(kind) as url:
                phase(kind, url)

        def queue_depth_and_recovery(kind: str) -> None:
            with database(kind) as url, database(kind) as empty_url:
                self.queue_depth_and_recovery(kind, url, empty_url)

        self.attempt(
            f"{', '.join(kinds)}: throughput and latency, taking turns", throughput_and_latency
        )
        for kind in kinds:
            self.attempt(
                f"{kind}: queue depth and recovery",
                functools.partial(queue_depth_and_recovery, kind),
            )
        for kind in kinds:
            self.attempt(f"{kind}: fleet", functools.partial(on_fresh_database, kind, self.fleet))
        if postgres_url:
            for name, phase in phases:
                self.attempt(name, phase)

    def close(self) -> None:
        """Stop the load processes."""
        self.pool.close()


def raise_file_limit() -> None:
    """Let this process and its children (load processes, servers) hold many connections: the
    fleet opens thousands of streams."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> int:
    """`python -m bench [--quick] [--million] [--replicas] [--out DIR]`: run, print the table,
    write the JSON and the PNG. Exit status 1 if a phase failed (targets are never asserted)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long run of every scenario")
    parser.add_argument("--million", action="store_true", help="also measure 1M queued tasks")
    parser.add_argument(
        "--replicas",
        action="store_true",
        help="only the replicas scenario (needs OPSCORE_BENCH_POSTGRES_URL)",
    )
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="results directory")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    postgres_url = os.environ.get("OPSCORE_BENCH_POSTGRES_URL") or None
    if args.replicas and not postgres_url:
        parser.error("--replicas runs on PostgreSQL: set OPSCORE_BENCH_POSTGRES_URL")
    raise_file_limit()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="opscore-bench-") as temporary:
        bench = Bench(plan, Path(temporary), args.million)
        try:
            bench.run(postgres_url, replicas_only=args.replicas)
        finally:
            bench.close()
    results: dict[str, Any] = {
        "meta": {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "million": args.million,
            "replicas_only": args.replicas,
            "postgres": bool(postgres_url),
            "postgres_settings": postgres_settings(postgres_url) if postgres_url else {},
            "cpus": os.cpu_count(),
            "seconds": time.monotonic() - started,
            "plan": {name: getattr(plan, name) for name in plan.__slots__},
            "errors": bench.errors,
        },
        **bench.results,
    }
    results["targets"] = report.targets(results)
    print(report.table(results))
    json_path, png_path = report.write(results, args.out)
    print(f"results: {json_path}\nplot:    {png_path}")
    return 1 if bench.errors else 0
