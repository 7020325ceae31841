"""Two stores writing one PostgreSQL database at once, as two servers' would: what one store
alone serializes through its writer, the database must keep whole between them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from conftest import POSTGRES_URL, asyncpg_dsn, blocking, postgres_database
from machines import Placement, store_rules

from opscore.api.convert import WireSizes
from opscore.domain.credentials import issue_agent_token
from opscore.domain.errors import StorageUnavailable
from opscore.domain.models import (
    AgentRegistration,
    AgentState,
    Assignment,
    DefinitionDraft,
    Effects,
    ReadyTask,
    RunFilter,
    RunOrder,
    RunView,
    TaskSpec,
    Unassigned,
)
from opscore.domain.ports import CreatedRun, NewRun
from opscore.domain.responses import Budget
from opscore.store.database import open_database
from opscore.store.queries import Store
from opscore.store.writer import CONFLICT_ATTEMPTS as WRITER_ATTEMPTS
from opscore.store.writer import Writer

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set")


@contextlib.asynccontextmanager
async def running_store(url: str) -> AsyncIterator[Store]:
    database = open_database(url)
    writer = Writer(database)
    running = asyncio.create_task(writer.run(Placement()))
    try:
        yield Store(database, writer, store_rules())
    finally:
        writer.close()
        await running
        await database.dispose()


@pytest.fixture
def shared_url(migrated_postgres: str) -> Iterator[str]:
    """A migrated PostgreSQL database of its own, for the stores of one test."""
    with blocking(postgres_database(migrated_postgres)) as url:
        yield url


async def trigger(store: Store, request_id: str) -> CreatedRun:
    """A trigger of a one-task inline definition with `request_id`, as committed."""
    created: list[CreatedRun] = []
    await store.runs.create_run(
        NewRun(
            definition_id="",
            workflow_name="",
            inline=DefinitionDraft("once", tasks=(TaskSpec("t"),)),
            agent_id="",
            run_input={},
            request_id=request_id,
            now=datetime.now(UTC),
            on_commit=created.append,
            fingerprint="the same request",
        )
    )
    return created[0]


async def test_one_request_id_sent_to_two_stores_at_once_makes_one_run(shared_url: str) -> None:
    async with running_store(shared_url) as first, running_store(shared_url) as second:
        for attempt in range(5):
            request_id = f"same-{attempt}"
            created = await asyncio.gather(trigger(first, request_id), trigger(second, request_id))
            assert created[0].run.run_id == created[1].run.run_id, request_id
            assert sorted(made.created for made in created) == [False, True], request_id
        page = await first.runs.list_runs(
            100,
            "",
            RunFilter(),
            RunOrder.NEWEST_FIRST,
            RunView.BASIC,
            Budget(4 * 1024 * 1024, WireSizes()),
        )
    assert len(page.items) == 5


async def test_each_attempt_has_one_holder_however_many_stores_claim_it(shared_url: str) -> None:
    """Every store tries to assign the same queued tasks to an agent of its own at once: row
    locks give each task to exactly one of them, and the others learn it is gone."""
    claimers = 4
    async with contextlib.AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(running_store(shared_url)) for _ in range(claimers)
        ]
        for index, store in enumerate(stores):
            agent_id = f"agent-{index}"
            await store.agents.register_agent(
                AgentRegistration(agent_id, max_concurrent_tasks=100),
                issue_agent_token()[1],
                datetime.now(UTC),
                ignore,
            )
            await store.agents.connect_agent(agent_id, datetime.now(UTC), ignore)
        ready = [(await trigger(stores[0], "")).effects.queued[0] for _ in range(20)]
        placed = await asyncio.gather(
            *(
                store.tasks.assign(
                    [(task, f"agent-{index}") for task in ready], datetime.now(UTC), ignore
                )
                for index, store in enumerate(stores)
            )
        )
        holders: dict[str, list[str]] = {task.task_id: [] for task in ready}
        for results in placed:
            for task, result in zip(ready, results, strict=True):
                if isinstance(result, Assignment):
                    holders[task.task_id].append(result.agent_id)
                else:
                    assert result is Unassigned.TASK_GONE
        assert all(len(agents) == 1 for agents in holders.values()), holders
        assert await stores[0].tasks.load_queue() == []


def ignore(_: object) -> None:
    """An on_commit callback for writes whose effects the test does not follow."""


async def test_writes_locking_in_other_orders_never_fail_their_callers(shared_url: str) -> None:
    """One store cancels runs (the run locked, then its tasks) while another assigns their
    tasks (the task locked, then its pending run), all at once: PostgreSQL may pick one of them
    to fail as a deadlock, which the store resolves itself; no caller sees it, and every run
    ends either cancelled or with its task held."""
    async with (
        running_store(shared_url) as cancelling,
        running_store(shared_url) as assigning,
    ):
        now = datetime.now(UTC)
        await assigning.agents.register_agent(
            AgentRegistration("w", max_concurrent_tasks=1000), issue_agent_token()[1], now, ignore
        )
        await assigning.agents.connect_agent("w", now, ignore)
        created = [await trigger(cancelling, "") for _ in range(60)]
        results = await asyncio.gather(
            *(
                write
                for made in created
                for write in (
                    cancelling.runs.cancel_run(made.run.run_id, now, ignore),
                    assigning.tasks.assign([(made.effects.queued[0], "w")], now, ignore),
                )
            ),
            return_exceptions=True,
        )
    failures = [result for result in results if isinstance(result, BaseException)]
    assert failures == [], failures


_DEADLOCKS = (
    "CREATE SEQUENCE deadlocks",
    # A sequence moves whatever becomes of the transaction that moved it: the first writes to
    # agents fail as PostgreSQL fails a deadlock's victim, the rest go through.
    "CREATE FUNCTION lose_twice() RETURNS trigger AS $$ BEGIN"
    " IF nextval('deadlocks') <= {losses} THEN"
    " RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END IF;"
    " RETURN NEW; END $$ LANGUAGE plpgsql",
    "CREATE TRIGGER lose_twice BEFORE UPDATE ON agents FOR EACH ROW EXECUTE FUNCTION lose_twice()",
)


@pytest.mark.parametrize(("losses", "told"), [(3, False), (WRITER_ATTEMPTS + 1, True)])
async def test_a_write_that_loses_to_a_concurrent_one_is_run_again(
    shared_url: str, losses: int, told: bool
) -> None:
    """A write whose transaction PostgreSQL fails as a deadlock's victim is run again: its
    caller sees nothing of the first losses, and is told only if it keeps losing."""
    async with running_store(shared_url) as store:
        now = datetime.now(UTC)
        await store.agents.register_agent(
            AgentRegistration("w"), issue_agent_token()[1], now, ignore
        )
        admin = await asyncpg.connect(asyncpg_dsn(shared_url))
        try:
            for statement in _DEADLOCKS:
                await admin.execute(statement.format(losses=losses))
        finally:
            await admin.close()
        heartbeat = store.agents.touch_agent("w", now)
        if told:
            with pytest.raises(StorageUnavailable) as raised:
                await heartbeat
            assert "lost to concurrent ones" in raised.value.cause
        else:
            await heartbeat


async def held_long_ago(store: Store, tasks: int) -> tuple[datetime, list[ReadyTask]]:
    """An agent "w", connected an hour ago, holding `tasks` new tasks since then (their leases
    long ended): when that was, and the tasks."""
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    await store.agents.register_agent(
        AgentRegistration("w"), issue_agent_token()[1], long_ago, ignore
    )
    await store.agents.connect_agent("w", long_ago, ignore)
    ready = [(await trigger(store, "")).effects.queued[0] for _ in range(tasks)]
    await store.tasks.assign([(task, "w") for task in ready], long_ago, ignore)
    return long_ago, ready


async def tasks_and_expiries(url: str) -> tuple[set[tuple[str, int]], int]:
    """Every task's (state, attempt), and agent w's count of expiries, read directly."""
    admin = await asyncpg.connect(asyncpg_dsn(url))
    try:
        counted = await admin.fetchval("SELECT lease_expiries FROM agents WHERE agent_id = 'w'")
        rows = await admin.fetch("SELECT state, attempt FROM tasks")
    finally:
        await admin.close()
    return {(row["state"], row["attempt"]) for row in rows}, counted


async def test_a_lease_that_ended_is_expired_once_however_many_stores_notice(
    shared_url: str,
) -> None:
    """Two stores' timers fire for the same ended leases at once: one of them expires each (its
    slot freed, the attempt failed), the other finds nothing left to do."""
    async with running_store(shared_url) as first, running_store(shared_url) as second:
        _, tasks = await held_long_ago(first, 10)
        seen: list[Effects] = []
        now = datetime.now(UTC)
        await asyncio.gather(
            *(store.timers.expire_leases(now, 100, seen.append) for store in (first, second))
        )
    released = [hold.task_id for effects in seen for hold in effects.released]
    assert sorted(released) == sorted(task.task_id for task in tasks)
    # One attempt each (store_rules): the expiry failed each task once, at its first attempt,
    # and each expiry counted once.
    assert await tasks_and_expiries(shared_url) == ({("failed", 1)}, len(tasks))


async def test_a_lost_agent_is_lost_once_however_many_stores_notice(shared_url: str) -> None:
    """Two stores' timers find the same agent's grace over at once: each attempt it held counts
    as lost once."""
    async with running_store(shared_url) as first, running_store(shared_url) as second:
        long_ago, tasks = await held_long_ago(first, 10)
        await first.agents.disconnect_agent("w", 1, long_ago)
        seen: list[Effects] = []
        now = datetime.now(UTC)
        cutoff = now - timedelta(minutes=1)
        await asyncio.gather(
            *(store.timers.lose_agents(cutoff, now, seen.append) for store in (first, second))
        )
    released = [hold.task_id for effects in seen for hold in effects.released]
    assert sorted(released) == sorted(task.task_id for task in tasks)
    assert await tasks_and_expiries(shared_url) == ({("failed", 1)}, 0)


LEASE = timedelta(seconds=10)


async def connected_on(store: Store, agent_id: str, now: datetime) -> None:
    """Register the agent and open its stream on `store`'s replica."""
    await store.agents.register_agent(
        AgentRegistration(agent_id), issue_agent_token()[1], now, ignore
    )
    await store.agents.connect_agent(agent_id, now, ignore)


async def test_a_lapsed_replica_is_declared_dead_once_and_its_agents_start_their_grace(
    shared_url: str,
) -> None:
    start = datetime.now(UTC)
    async with (
        running_store(shared_url) as dead,
        running_store(shared_url) as first,
        running_store(shared_url) as second,
    ):
        assert (await dead.replicas.join("dead", "a", start, LEASE, alone=False)).peers == 0
        await connected_on(dead, "w", start)
        await first.replicas.join("first", "b", start, LEASE, alone=False)
        await second.replicas.join("second", "c", start, LEASE, alone=False)
        # Before its lease lapses, nothing happens to it.
        for live in (first, second):
            early = await live.replicas.beat(start + LEASE / 2, LEASE)
            assert (early.peers, early.lost_streams) == (2, 0)
        assert (await first.agents.get_agent("w")).connected
        # Once it has, both live replicas notice at once: one of them disconnects its agent.
        later = start + LEASE + timedelta(seconds=1)
        beats = await asyncio.gather(*(s.replicas.beat(later, LEASE) for s in (first, second)))
        assert sorted(beat.lost_streams for beat in beats) == [0, 1]
        assert [beat.peers for beat in beats] == [1, 1]
        seen = await first.agents.get_agent("w")
        assert (seen.connected, seen.state) == (False, AgentState.OFFLINE)
        assert (await first.timers.next_timers())[1] == later  # its grace runs from now
        # The dead one learns it at its next renewal, and assigns nothing meanwhile.
        assert not (await dead.replicas.beat(later, LEASE)).registered


async def test_only_the_replica_holding_an_agents_stream_assigns_it_work(shared_url: str) -> None:
    now = datetime.now(UTC)
    async with running_store(shared_url) as holder, running_store(shared_url) as other:
        await holder.replicas.join("holder", "a", now, LEASE, alone=False)
        await other.replicas.join("other", "b", now, LEASE, alone=False)
        await connected_on(holder, "w", now)
        task = (await trigger(holder, "")).effects.queued[0]
        assert await other.tasks.assign([(task, "w")], now, ignore) == [Unassigned.AGENT_UNFIT]
        [assigned] = await holder.tasks.assign([(task, "w")], now, ignore)
        assert not isinstance(assigned, Unassigned)


async def test_an_assignment_passes_over_a_task_another_write_holds(shared_url: str) -> None:
    """Two replicas' writes that lock the same queued tasks in other orders would deadlock
    (PostgreSQL breaks one after a second): an assignment does not wait for a task another
    write holds, and finds it gone; once let go, the task is still there to assign."""
    now = datetime.now(UTC)
    async with running_store(shared_url) as store:
        await store.replicas.join("holder", "a", now, LEASE, alone=False)
        await connected_on(store, "w", now)
        task = (await trigger(store, "")).effects.queued[0]
        other = await asyncpg.connect(asyncpg_dsn(shared_url))
        try:
            async with other.transaction():
                await other.execute(
                    "SELECT 1 FROM tasks WHERE task_id = $1 FOR UPDATE", task.task_id
                )
                async with asyncio.timeout(10):
                    placed = await store.tasks.assign([(task, "w")], now, ignore)
                assert placed == [Unassigned.TASK_GONE]
        finally:
            await other.close()
        [assigned] = await store.tasks.assign([(task, "w")], now, ignore)
        assert isinstance(assigned, Assignment)


async def test_a_queued_task_is_explained_by_idle_agents_of_every_replica(
    shared_url: str,
) -> None:
    """A replica's dispatch knows only its own agents: why a queued task waits also asks the
    database whether an agent streaming from another replica is idle with a free slot."""
    now = datetime.now(UTC)
    async with running_store(shared_url) as mine, running_store(shared_url) as other:
        await mine.replicas.join("mine", "a", now, LEASE, alone=False)
        await other.replicas.join("other", "b", now, LEASE, alone=False)
        await connected_on(other, "w", now)
        created = await trigger(mine, "")
        queued = created.run.tasks[0]
        [needs] = (await mine.agents.waiting_candidates([queued]))[1].values()
        assert needs.idle_elsewhere
        [needs] = (await other.agents.waiting_candidates([queued]))[1].values()
        assert (needs.connected, needs.idle_elsewhere) == (True, False)  # its own: it knows
        await other.tasks.assign([(created.effects.queued[0], "w")], now, ignore)  # its slot
        [needs] = (await mine.agents.waiting_candidates([queued]))[1].values()
        assert (needs.connected, needs.idle_elsewhere) == (True, False)


async def test_a_stream_closes_only_as_the_generation_it_opened(shared_url: str) -> None:
    """An agent moved its stream to another replica: the first replica's closing of the old
    stream, however late, leaves the new one connected."""
    now = datetime.now(UTC)
    async with running_store(shared_url) as old, running_store(shared_url) as new:
        await old.replicas.join("old", "a", now, LEASE, alone=False)
        await new.replicas.join("new", "b", now, LEASE, alone=False)
        await connected_on(old, "w", now)
        moved = await new.agents.connect_agent("w", now, ignore)
        await old.agents.disconnect_agent("w", moved.generation - 1, now)
        await new.agents.disconnect_agent("w", moved.generation - 1, now)
        assert (await old.agents.get_agent("w")).connected
        await new.agents.disconnect_agent("w", moved.generation, now)
        assert not (await old.agents.get_agent("w")).connected


async def test_a_replica_that_leaves_disconnects_its_agents_at_once(shared_url: str) -> None:
    now = datetime.now(UTC)
    async with running_store(shared_url) as leaving, running_store(shared_url) as staying:
        await leaving.replicas.join("leaving", "a", now, LEASE, alone=False)
        await staying.replicas.join("staying", "b", now, LEASE, alone=False)
        await connected_on(leaving, "w", now)
        await connected_on(staying, "v", now)
        await leaving.replicas.leave(now)
        assert not (await staying.agents.get_agent("w")).connected
        assert (await staying.agents.get_agent("v")).connected
        assert (await staying.replicas.beat(now, LEASE)).peers == 0
