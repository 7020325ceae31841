"""How big each scenario is: the full benchmark (`make bench`, a few minutes on two cores) and
the quick one (`--quick`, seconds, which only proves the harness works)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    """The sizes and durations of one benchmark run."""

    agent_processes: int
    """Load processes holding agents (the trigger client has one more of its own)."""
    shapes: tuple[str, ...]
    """Run shapes of the throughput scenario: `single` (1 task), `chain10` (10 in a chain)."""
    agent_counts: tuple[int, ...]
    """Agents of each throughput point."""
    rounds: int
    """Times each throughput and latency step runs, the server kinds taking turns; and the
    turns a queue depth's probes take between the filled server and its empty twin."""
    warmup: float
    """Seconds of load before a throughput window opens."""
    window: float
    """Seconds over which completed tasks are counted."""
    latency_agents: int
    """Agents during the latency scenario."""
    half_load_seconds: float
    """Duration of the open loop at half the measured maximum."""
    trickle_runs: int
    """Runs triggered one at a time."""
    depths: tuple[int, ...]
    """Queued tasks nobody can take, at which dispatch latency is measured."""
    depth_probes: int
    """Probe runs (sequential) at each depth. A hundred: with thirty, the p50 at 100k queued
    against 0 moved between 1.03 and 1.21 from one full run to the next on one day."""
    fleet_agents: int
    """Connected idle agents of the fleet scenario."""
    fleet_probes: int
    """Probe runs (each for one random agent's unique capability) in the fleet."""
    fleet_per_channel: int
    """Agents sharing one connection in the fleet (keeps file descriptors in bounds)."""
    recovery_tasks: int
    """Queued tasks in the database the recovery scenario restarts on."""
    replica_counts: tuple[int, ...]
    """Replicas of each deployment of the replicas scenario (PostgreSQL only), each deployment
    on a database of its own; its throughput steps run `shapes` at `replica_agents` agents."""
    replica_agents: int
    """Agents of the replicas scenario's throughput steps, spread evenly over the replicas."""
    replica_trickle_runs: int
    """1-task runs the replicas scenario triggers one at a time on each side (the agent's own
    replica, another one), the sides interleaved: the p99 of 200 is the second-slowest."""


MILLION = 1_000_000
"""The extra queue depth that `--million` measures dispatch at (beside the plan's own depths)."""


FULL = Plan(
    agent_processes=2,
    shapes=("single", "chain10"),
    agent_counts=(1, 8, 64),
    rounds=3,
    warmup=1.0,
    window=3.0,
    latency_agents=8,
    half_load_seconds=6.0,
    trickle_runs=60,
    depths=(0, 10_000, 100_000),
    depth_probes=100,
    fleet_agents=10_000,
    fleet_probes=100,
    fleet_per_channel=50,
    recovery_tasks=100_000,
    replica_counts=(1, 2, 3),
    replica_agents=8,
    replica_trickle_runs=200,
)

QUICK = Plan(
    agent_processes=2,
    shapes=("single",),
    agent_counts=(8,),
    rounds=1,
    warmup=0.25,
    window=0.75,
    latency_agents=8,
    half_load_seconds=0.5,
    trickle_runs=5,
    depths=(0, 1_000),
    depth_probes=10,
    fleet_agents=100,
    fleet_probes=20,
    fleet_per_channel=50,
    recovery_tasks=1_000,
    replica_counts=(1, 2),
    replica_agents=8,
    replica_trickle_runs=10,
)
