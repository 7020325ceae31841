"""Several replicas on one PostgreSQL database (issue 25): `opscore serve` processes sharing one
database, each serving every RPC. Runs triggered on any replica reach agents streaming from any
other, each attempt goes to one agent only, a request_id holds across replicas, and losing a
replica (SIGKILL) or restarting one (SIGTERM) under load loses nothing and records nothing twice.

The replicas are `ServerProcess`es started by tests/replicas.py's `Replicas`, on a fresh
database the first replica migrates; the agents are its `FailoverAgent`s, which take the list of
every replica's address, complete each assignment at once with an output naming the agent, the
task and the attempt, and move to the next address when their stream ends. What the agents
received and what the server acknowledged is kept in a `Ledger`, and checked against the
database's rows and the replicas' logs at the end of each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import statistics
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from conftest import POSTGRES_URL
from helpers import Client, connect, definition, seconds, task, tasks_of
from opscore.v1 import agent_pb2, workflow_pb2, workflow_service_pb2
from replicas import (
    GRACE,
    LEASE,
    Acknowledged,
    FailoverAgent,
    Ledger,
    Replicas,
    agent_on,
    check_agents,
    log_counts,
    working,
)

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set")

WORK = "work"
"""The capability of the load's tasks, which every worker offers."""

FINISH_WAIT = 20.0
"""Seconds a load may take to finish once triggered."""

LOAD_WAIT = 10.0
"""Seconds a load may take to reach the point where a replica is stopped."""

STOP_AT = 0.3
"""Share of a load's tasks acknowledged when a replica is killed or terminated."""

DECLARED_DEAD_WAIT = 3 * LEASE + 2.0
"""Seconds after a SIGKILL within which another replica must have declared the dead one dead
(about one lease; the rest is slack for a loaded machine)."""

DRAIN_WAIT = 2.0 + 3.0
"""Seconds a SIGTERMed replica may take to exit: its shutdown grace and some slack."""

CROSS_WAIT = 1.0
"""Seconds within which work announced on one replica must reach an agent on another: far less
than a safety sweep's period (seconds), far more than the milliseconds it should take."""

CROSS_MEDIAN = 0.25
"""The median of those delays must be below this: a sweep of a second or more could not."""

ROUNDS = 5
"""Rounds of the cross-replica tests."""

BURST = 4
"""Runs triggered one after the other, without waiting for their assignments, in a burst."""

SWEEP_WAIT = 10.0
"""Seconds to wait for work that a replica's safety sweep (every few seconds) would bring at
last: the test then fails naming the delay, not a timeout."""


# Helpers -------------------------------------------------------------------------------------


def chain(name: str, length: int, capability: str = WORK) -> workflow_pb2.WorkflowDefinition:
    """`length` tasks, each depending on the one before."""
    return definition(
        name,
        *(
            task(
                f"step-{i}",
                capability=capability,
                depends_on=[f"step-{i - 1}"] if i else [],
                input={"i": i},
            )
            for i in range(length)
        ),
    )


async def load_definitions(
    clients: Sequence[Client], chain_length: int = 4
) -> list[workflow_pb2.WorkflowDefinition]:
    """The load's definitions: a single task, and a chain of `chain_length`, created on two
    different replicas (and triggered on any)."""
    return [
        await clients[0].create(chain("single", 1)),
        await clients[-1].create(chain("chain", chain_length)),
    ]


def workers(
    replicas: Replicas, ledger: Ledger, per_replica: int = 2, slots: int = 2
) -> list[FailoverAgent]:
    """`per_replica` agents starting on each replica, offering WORK; on each replica, every
    other one sends its completions to another replica than the one it streams from."""
    count = len(replicas.addresses)
    return [
        FailoverAgent(
            f"worker-{i}",
            replicas.addresses,
            ledger,
            capabilities=[WORK],
            slots=slots,
            first=i % count,
            report_elsewhere=(i // count) % 2 == 1,
        )
        for i in range(per_replica * count)
    ]


async def trigger_load(
    clients: Sequence[Client],
    on: Sequence[int],
    definitions: Sequence[workflow_pb2.WorkflowDefinition],
    runs: int,
    rng: random.Random,
    prefix: str,
) -> list[workflow_pb2.WorkflowRun]:
    """`runs` runs of the definitions in turn, all triggered at once, each on a replica of `on`
    drawn at random."""
    return list(
        await asyncio.gather(
            *(
                clients[rng.choice(on)].trigger(
                    definition_id=definitions[n % len(definitions)].definition_id,
                    request_id=f"{prefix}-{n}",
                    input={"n": n},
                )
                for n in range(runs)
            )
        )
    )


async def wait_succeeded(
    replicas: Replicas,
    clients: Sequence[Client],
    runs: Sequence[workflow_pb2.WorkflowRun],
    agents: Sequence[FailoverAgent],
    timeout: float = FINISH_WAIT,
) -> dict[str, workflow_pb2.WorkflowRun]:
    """Poll live replicas in turn until every run has SUCCEEDED; fails the test after `timeout`,
    or at once if a run fails or an agent stops."""
    finished: dict[str, workflow_pb2.WorkflowRun] = {}
    turn = 0
    async with asyncio.timeout(timeout):
        while len(finished) < len(runs):
            check_agents(agents)
            for run in runs:
                if run.run_id in finished:
                    continue
                live = replicas.live()
                turn += 1
                try:
                    seen = await clients[live[turn % len(live)]].run(run.run_id)
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        continue  # a replica going away
                    raise
                assert seen.state in (
                    workflow_pb2.RUN_STATE_PENDING,
                    workflow_pb2.RUN_STATE_RUNNING,
                    workflow_pb2.RUN_STATE_SUCCEEDED,
                ), seen
                if seen.state == workflow_pb2.RUN_STATE_SUCCEEDED:
                    finished[run.run_id] = seen
            await asyncio.sleep(0.05)
    return finished


async def wait_acknowledged(ledger: Ledger, count: int, agents: Sequence[FailoverAgent]) -> None:
    """Wait (bounded) until the server has acknowledged `count` completions."""
    async with asyncio.timeout(LOAD_WAIT):
        while len(ledger.acknowledged) < count:
            check_agents(agents)
            await asyncio.sleep(0.001)


async def assert_recorded_once(
    replicas: Replicas,
    ledger: Ledger,
    runs: Sequence[workflow_pb2.WorkflowRun],
    *,
    all_logged: bool = True,
) -> None:
    """Every task of the runs SUCCEEDED once: the database holds, for each, the agent, attempt
    and output of the one completion acknowledged for it; no attempt was acknowledged twice, or
    assigned to two agents, or redelivered unmarked; no two tasks hold the same output; and no
    replica logged a task completed twice or an attempt assigned twice. With `all_logged`
    (no replica was killed, so no log lost its last lines), every task's completion is logged.
    """
    task_ids = {t.task_id for run in runs for t in run.tasks}
    rows = await replicas.task_rows(run.run_id for run in runs)
    assert set(rows) == task_ids

    by_task: dict[str, list[Acknowledged]] = defaultdict(list)
    for (task_id, attempt), acks in ledger.acknowledgements().items():
        assert len(acks) == 1, f"{task_id} attempt {attempt} acknowledged more than once: {acks}"
        by_task[task_id].append(acks[0])
    assert set(by_task) == task_ids, set(by_task) ^ task_ids
    for task_id, row in rows.items():
        assert row["state"] == "succeeded", row
        acknowledged = by_task[task_id]
        assert len(acknowledged) == 1, f"{task_id}: attempts acknowledged: {acknowledged}"
        [done] = acknowledged
        stored = (row["agent_id"], row["attempt"], row["output"])
        assert stored == (done.agent_id, done.attempt, done.output), (row, done)
    outputs = [json.dumps(row["output"], sort_keys=True) for row in rows.values()]
    assert len(set(outputs)) == len(outputs), "two tasks hold the same output"

    assert ledger.double_claims() == {}
    assert ledger.unmarked_repeats() == []
    assert ledger.refused == []
    assert ledger.unexpected == []

    completed, assigned = log_counts(replicas.log_records())
    twice = {key: n for key, n in completed.items() if n > 1}
    assert not twice, f"tasks logged completed more than once: {twice}"
    twice_assigned = {key: n for key, n in assigned.items() if n > 1}
    assert not twice_assigned, f"attempts logged assigned more than once: {twice_assigned}"
    if all_logged:
        assert task_ids <= set(completed), task_ids - set(completed)


def replicas_of(agent: FailoverAgent) -> list[int]:
    """The replicas the agent streamed from, in order."""
    return [replica for replica, _ in agent.streams]


# 1. Runs spread over replicas ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "together"),
    [(2, False), (3, True)],
    ids=["2 replicas, the first alone", "3 replicas at once"],
)
async def test_runs_triggered_on_random_replicas_succeed_each_task_recorded_once(
    tmp_path: Path, count: int, together: bool
) -> None:
    rng = random.Random(f"spread-{count}")
    ledger = Ledger()
    async with (
        Replicas.on_fresh_database(count, tmp_path, together=together) as replicas,
        replicas.operators() as clients,
    ):
        definitions = await load_definitions(clients, chain_length=3)
        agents = workers(replicas, ledger)
        async with working(agents):
            started = time.monotonic()
            runs = await trigger_load(
                clients, range(count), definitions, 24, rng, f"spread-{count}"
            )
            await wait_succeeded(replicas, clients, runs, agents)
            took = time.monotonic() - started

        await assert_recorded_once(replicas, ledger, runs)
        # The work was spread: every replica streamed assignments, and took completions.
        assert {seen.replica for seen in ledger.received} == set(range(count))
        assert {done.replica for done in ledger.acknowledged} == set(range(count))
    print(f"\n{count} replicas: {len(runs)} runs, {len(ledger.acknowledged)} tasks in {took:.2f} s")


# 2. Cross-replica dispatch -------------------------------------------------------------------


async def test_a_run_triggered_on_one_replica_reaches_an_idle_agent_on_another(
    tmp_path: Path,
) -> None:
    async with (
        Replicas.on_fresh_database(2, tmp_path) as replicas,
        replicas.operators() as (on_a, on_b),
    ):
        agent = await on_b.agent("on-b", capabilities=["b-only"], max_concurrent_tasks=1)
        job = await on_a.create(definition("cross", task("only", capability="b-only")))
        delays: list[float] = []
        for n in range(ROUNDS):
            started = time.monotonic()
            run = await on_a.trigger(definition_id=job.definition_id, request_id=f"cross-{n}")
            assignment = await agent.next_assignment(SWEEP_WAIT)
            delays.append(time.monotonic() - started)
            assert assignment.run_id == run.run_id, assignment
            await agent.complete(assignment, {"n": n})
            done = await on_a.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
            assert tasks_of(done)["only"].agent_id == "on-b"
    print(f"\ntrigger on A -> assignment on B: {', '.join(f'{d * 1000:.1f}' for d in delays)} ms")
    assert max(delays) < CROSS_WAIT, delays
    assert statistics.median(delays) < CROSS_MEDIAN, delays


async def test_a_run_watched_on_one_replica_is_followed_to_its_end_on_another(
    tmp_path: Path,
) -> None:
    """The agent and the writes are replica A's; the watcher is B's, whose own writer changes
    nothing of the run: A's notices bring each change to B in milliseconds (far sooner than B's
    periodic reread), and the stream ends with the run."""
    steps = 4
    async with (
        Replicas.on_fresh_database(2, tmp_path) as replicas,
        replicas.operators() as (on_a, on_b),
    ):
        agent = await on_a.agent("on-a", capabilities=["a-only"])
        run = await on_a.trigger(definition=chain("watched", steps, capability="a-only"))
        call = on_b.workflows.WatchWorkflowRun(
            workflow_service_pb2.WatchWorkflowRunRequest(run_id=run.run_id)
        )
        reading = aiter(call)
        first = await anext(reading)
        states: dict[str, int] = {t.name: t.state for t in first.run.tasks}
        delays: list[float] = []
        last = first
        for step in range(steps):
            await agent.complete(await agent.next_assignment())
            started = time.monotonic()
            async with asyncio.timeout(SWEEP_WAIT):
                while states[f"step-{step}"] != workflow_pb2.TASK_STATE_SUCCEEDED:
                    last = await anext(reading)
                    states.update((t.name, t.state) for t in last.changed_tasks)
            delays.append(time.monotonic() - started)
        async with asyncio.timeout(SWEEP_WAIT):
            async for response in reading:
                last = response
    assert last.run.state == workflow_pb2.RUN_STATE_SUCCEEDED
    assert set(states.values()) == {workflow_pb2.TASK_STATE_SUCCEEDED}
    print(f"\ncomplete on A -> seen on B: {', '.join(f'{d * 1000:.1f}' for d in delays)} ms")
    assert max(delays) < CROSS_WAIT, delays
    # B's own reread, every 0.5 s, would make it about 250 ms.
    assert statistics.median(delays) < 0.05, delays


async def test_runs_triggered_in_a_burst_on_one_replica_all_reach_an_agent_on_another(
    tmp_path: Path,
) -> None:
    """Work announced while the replica of the agent is claiming what was announced before is
    claimed too, not left to the safety sweep."""
    async with (
        Replicas.on_fresh_database(2, tmp_path) as replicas,
        replicas.operators() as (on_a, on_b),
    ):
        agent = await on_b.agent("wide-on-b", capabilities=["b-only"], max_concurrent_tasks=BURST)
        job = await on_a.create(definition("burst", task("only", capability="b-only")))
        delays: list[float] = []
        for n in range(ROUNDS):
            started = time.monotonic()
            runs = [
                await on_a.trigger(definition_id=job.definition_id, request_id=f"burst-{n}-{i}")
                for i in range(BURST)
            ]
            assignments = [await agent.next_assignment(SWEEP_WAIT) for _ in runs]
            delays.append(time.monotonic() - started)
            assert {a.run_id for a in assignments} == {run.run_id for run in runs}
            for assignment in assignments:
                await agent.complete(assignment, {"n": n})
    print(f"\n{BURST} triggers on A -> all on B: {', '.join(f'{d * 1000:.1f}' for d in delays)} ms")
    assert max(delays) < CROSS_WAIT, delays


async def test_a_slot_freed_on_one_replica_takes_work_queued_on_another(tmp_path: Path) -> None:
    async with (
        Replicas.on_fresh_database(2, tmp_path) as replicas,
        replicas.operators() as (on_a, on_b),
    ):
        agent = await on_b.agent("busy-on-b", capabilities=["b-only"], max_concurrent_tasks=1)
        job = await on_a.create(definition("freed", task("only", capability="b-only")))
        first = await on_a.trigger(definition_id=job.definition_id, request_id="freed-0")
        holding = await agent.next_assignment(SWEEP_WAIT)
        assert holding.run_id == first.run_id
        delays: list[float] = []
        for n in range(1, ROUNDS + 1):
            # The only capable agent is busy: a run triggered on A waits, queued.
            waiting = await on_a.trigger(definition_id=job.definition_id, request_id=f"freed-{n}")
            queued = tasks_of(await on_a.run(waiting.run_id))["only"]
            assert queued.state == workflow_pb2.TASK_STATE_QUEUED, queued
            assert agent.events.empty(), agent.events.get_nowait()

            # B's agent completes (on B): its slot takes the task announced on A.
            started = time.monotonic()
            await agent.complete(holding, {"n": n - 1})
            holding = await agent.next_assignment(SWEEP_WAIT)
            delays.append(time.monotonic() - started)
            assert holding.run_id == waiting.run_id, holding
        await agent.complete(holding, {"n": ROUNDS})
        await on_a.wait_run(holding.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    print(
        f"\ncompletion on B -> next assignment: {', '.join(f'{d * 1000:.1f}' for d in delays)} ms"
    )
    assert max(delays) < CROSS_WAIT, delays
    assert statistics.median(delays) < CROSS_MEDIAN, delays


@contextlib.asynccontextmanager
async def holding_on_b(tmp_path: Path) -> AsyncIterator[tuple[Client, FailoverAgent]]:
    """Two replicas, an operator's client on A, and an agent of capability `b-only` streaming
    from B that holds what it gets; nothing it sends may be refused or unexpected."""
    ledger = Ledger()
    async with (
        Replicas.on_fresh_database(2, tmp_path) as replicas,
        replicas.operators() as (on_a, _),
    ):
        agent = FailoverAgent("on-b", replicas.addresses, ledger, capabilities=["b-only"], first=1)
        agent.hold()
        async with working([agent]):
            yield on_a, agent
        assert ledger.refused == []
        assert ledger.unexpected == []


async def test_a_task_failed_on_one_replica_is_retried_at_once_on_another(
    tmp_path: Path,
) -> None:
    """CompleteTask and FailTask may go to any replica: a retryable failure reported to A, of a
    task whose only capable agent streams from B, is retried on B as soon as its backoff ends."""
    backoff = 0.05
    flaky = task("flaky", capability="b-only")
    flaky.retry_policy.CopyFrom(
        workflow_pb2.RetryPolicy(
            max_attempts=ROUNDS + 1,
            initial_backoff=seconds(backoff),
            backoff_multiplier=1.0,
            max_backoff=seconds(backoff),
        )
    )
    async with holding_on_b(tmp_path) as (on_a, agent):
        run = await on_a.trigger(definition=definition("retried", flaky))
        held = (await agent.next_received()).assignment
        delays: list[float] = []
        for _ in range(ROUNDS):
            started = time.monotonic()
            await agent.fail(held, "flaky", to=0, retryable=True)
            again = await agent.next_received(SWEEP_WAIT)
            delays.append(time.monotonic() - started)
            assert again.replica == 1
            assert (again.assignment.task_id, again.assignment.attempt) == (
                held.task_id,
                held.attempt + 1,
            )
            held = again.assignment
        await agent.complete_held()
        await on_a.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
    print(
        f"\nFailTask on A -> retry on B ({backoff * 1000:.0f} ms backoff): "
        f"{', '.join(f'{d * 1000:.1f}' for d in delays)} ms"
    )
    assert max(delays) < CROSS_WAIT, delays
    assert statistics.median(delays) < CROSS_MEDIAN, delays


async def test_tasks_waiting_out_a_backoff_never_hold_up_due_work_on_another_replica(
    tmp_path: Path,
) -> None:
    """Claims skip tasks not yet due: work that is due reaches a free agent on another replica
    however many tasks of its capability wait out a backoff ahead of it in ready order."""
    waiting = task("waiting", capability="b-only")
    waiting.retry_policy.CopyFrom(
        workflow_pb2.RetryPolicy(
            max_attempts=2, initial_backoff=seconds(600), max_backoff=seconds(600)
        )
    )
    async with holding_on_b(tmp_path) as (on_a, agent):
        # More of them than a claim for one free slot locks (the slot and two).
        for index in range(4):
            await on_a.trigger(definition=definition(f"later-{index}", waiting))
            held = (await agent.next_received(SWEEP_WAIT)).assignment
            await agent.fail(held, "later", to=0, retryable=True)
        due = await on_a.trigger(definition=definition("due", task("due", capability="b-only")))
        received = await agent.next_received(SWEEP_WAIT)
        assert (received.replica, received.assignment.run_id) == (1, due.run_id)
        await agent.complete_held()
        await on_a.wait_run(due.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)


# 3. A replica killed ---------------------------------------------------------------------------


async def test_a_replica_killed_mid_load_loses_nothing_and_its_agents_carry_on(
    tmp_path: Path,
) -> None:
    rng = random.Random("kill")
    ledger = Ledger()
    async with (
        Replicas.on_fresh_database(3, tmp_path) as replicas,
        replicas.operators() as clients,
    ):
        definitions = await load_definitions(clients)
        kept = await clients[2].create(definition("kept", task("kept", capability="kept")))
        # An agent of replica 0 that holds its one task and, once replica 0 is gone, stays away
        # for less than its grace.
        away = FailoverAgent("away", replicas.addresses, ledger, capabilities=["kept"], first=0)
        away.hold()
        agents = [away, *workers(replicas, ledger)]
        on_zero = [agent for agent in agents if agent.current == 0]
        async with working(agents):
            held_run = await clients[1].trigger(definition_id=kept.definition_id)
            held = await away.next_received()
            assert (held.replica, held.assignment.run_id) == (0, held_run.run_id)

            runs = await trigger_load(clients, range(3), definitions, 16, rng, "kill")
            tasks = sum(len(run.tasks) for run in runs)
            await wait_acknowledged(ledger, int(STOP_AT * tasks), agents)
            away.stay_away()
            replicas.kill(0)
            killed_at = time.monotonic()
            assert await replicas.servers[0].wait() == -signal.SIGKILL
            killed_after = len(ledger.acknowledged)
            assert killed_after < tasks, "the load ended before the kill"
            assert await away.streams[0][1].wait_stream_ended() == grpc.StatusCode.UNAVAILABLE

            # Replica 0's lease lapses: another declares it dead, and its agent that stayed
            # away shows OFFLINE (read on replica 1).
            async with asyncio.timeout(DECLARED_DEAD_WAIT):
                while (await agent_on(clients[1], "away")).state != (agent_pb2.AGENT_STATE_OFFLINE):
                    await asyncio.sleep(0.02)
            offline_at = time.monotonic()

            # Its other agents went on at once on other replicas, and the declaration left
            # them connected there.
            for agent in on_zero:
                if agent is away:
                    continue
                await agent.wait_connected(elsewhere_than=0)
                seen = await agent_on(clients[2], agent.agent_id)
                assert seen.state != agent_pb2.AGENT_STATE_OFFLINE, seen

            # Away for less than its grace (which began at the declaration, before
            # `offline_at`): its attempt is neither failed nor given to another agent.
            await asyncio.sleep(GRACE / 2)
            assert (await agent_on(clients[2], "away")).state == (agent_pb2.AGENT_STATE_OFFLINE)
            kept_task = tasks_of(await clients[2].run(held_run.run_id))["kept"]
            assert kept_task.state == workflow_pb2.TASK_STATE_ASSIGNED, kept_task
            assert (kept_task.agent_id, kept_task.attempt) == ("away", held.assignment.attempt)

            # Back on another replica within its grace: the same attempt, redelivered.
            away.come_back()
            again = await away.next_received()
            back_after = time.monotonic() - offline_at
            assert again.replica != 0
            assert again.assignment.redelivered, again
            assert (again.assignment.task_id, again.assignment.attempt) == (
                held.assignment.task_id,
                held.assignment.attempt,
            )
            await away.complete_held()

            await wait_succeeded(replicas, clients, [*runs, held_run], agents)
            finished_at = time.monotonic()

        await assert_recorded_once(replicas, ledger, [*runs, held_run], all_logged=False)
        # Every agent of replica 0 streams from another one now.
        for agent in on_zero:
            assert replicas_of(agent)[0] == 0, agent.agent_id
            assert 0 not in replicas_of(agent)[1:], agent.agent_id
    print(
        f"\nkill: {tasks} tasks, killed after {killed_after} acknowledged; OFFLINE "
        f"{offline_at - killed_at:.2f} s after the kill, back {back_after:.2f} s later; done "
        f"{finished_at - killed_at:.2f} s after the kill; {ledger.resent} completions resent, "
        f"{ledger.failed_connects} failed stream opens"
    )


# 4. One claim per attempt, one run per request_id ----------------------------------------------


async def test_the_same_request_id_sent_to_two_replicas_at_once_makes_one_run(
    tmp_path: Path,
) -> None:
    async with (
        Replicas.on_fresh_database(2, tmp_path) as replicas,
        replicas.operators() as (on_a, on_b),
    ):
        job = definition("once", task("only", capability="nobody-has-it"))
        a_definition, b_definition = await asyncio.gather(
            on_a.create(job, request_id="define-once"), on_b.create(job, request_id="define-once")
        )
        assert a_definition.definition_id == b_definition.definition_id
        for n in range(10):
            fields = {
                "definition_id": a_definition.definition_id,
                "request_id": f"once-{n}",
                "input": {"n": n},
            }
            a_run, b_run = await asyncio.gather(on_a.trigger(**fields), on_b.trigger(**fields))
            assert a_run.run_id == b_run.run_id, (a_run, b_run)
            assert [t.task_id for t in a_run.tasks] == [t.task_id for t in b_run.tasks]

        rows = await replicas.query(
            "SELECT request_id, count(*) AS runs FROM runs GROUP BY request_id"
        )
        assert {row["request_id"]: row["runs"] for row in rows} == {
            f"once-{n}": 1 for n in range(10)
        }
        [row] = await replicas.query("SELECT count(*) AS definitions FROM definitions")
        assert row["definitions"] == 1


async def test_concurrent_triggers_on_every_replica_claim_each_attempt_once(
    tmp_path: Path,
) -> None:
    rng = random.Random("claims")
    ledger = Ledger()
    async with (
        Replicas.on_fresh_database(3, tmp_path, together=True) as replicas,
        replicas.operators() as clients,
    ):
        single = await clients[0].create(chain("single", 1))
        # A backlog before any agent is there: every replica races for it once they come.
        backlog = await trigger_load(clients, range(3), [single], 30, rng, "backlog")
        agents = workers(replicas, ledger, slots=3)
        async with working(agents):
            # And triggers on every replica at once while the agents work.
            more = await trigger_load(clients, range(3), [single], 30, rng, "more")
            runs = [*backlog, *more]
            await wait_succeeded(replicas, clients, runs, agents)
        await assert_recorded_once(replicas, ledger, runs)
        assert len(ledger.received) == len(runs), "an attempt was received twice"


# 5. Rolling restart ----------------------------------------------------------------------------


async def test_a_replica_restarted_under_load_hands_its_agents_to_the_others(
    tmp_path: Path,
) -> None:
    rng = random.Random("restart")
    ledger = Ledger()
    async with (
        Replicas.on_fresh_database(3, tmp_path) as replicas,
        replicas.operators() as clients,
    ):
        definitions = await load_definitions(clients)
        agents = workers(replicas, ledger)
        on_zero = [agent for agent in agents if agent.current == 0]
        async with working(agents):
            runs = await trigger_load(clients, range(3), definitions, 16, rng, "before")
            tasks = sum(len(run.tasks) for run in runs)
            await wait_acknowledged(ledger, int(STOP_AT * tasks), agents)
            replicas.terminate(0)
            assert await replicas.servers[0].wait(DRAIN_WAIT) == 0, replicas.log_texts()
            assert len(ledger.acknowledged) < tasks, "the load ended before the restart"

            # Its agents' streams ended UNAVAILABLE, and they stream from the others now.
            for agent in on_zero:
                assert await agent.streams[0][1].wait_stream_ended() == (
                    grpc.StatusCode.UNAVAILABLE
                )
                await agent.wait_connected(elsewhere_than=0)

            # Started again, it serves: runs triggered on it (on a new channel: the old one may
            # still be waiting to reconnect) are done by the others' agents.
            restarted = await replicas.restart(0)
            async with connect(restarted.port) as client:
                after = await trigger_load([client], [0], definitions, 6, rng, "after")
            await wait_succeeded(replicas, clients, [*runs, *after], agents)

        await assert_recorded_once(replicas, ledger, [*runs, *after])
