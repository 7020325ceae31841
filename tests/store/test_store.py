"""The store's contract, on SQLite and PostgreSQL: what each intention-named method writes,
returns and refuses, and the group-commit writer's batching and isolation."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from machines import STORE_TIMEOUT as TIMEOUT
from machines import Placement, store_rules
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from opscore.api.convert import WireSizes
from opscore.domain.credentials import issue_agent_token
from opscore.domain.errors import FailedPrecondition, InvalidArgument, NotFound, ResultConflict
from opscore.domain.models import (
    AgentRegistration,
    AgentState,
    Assignment,
    DefinitionDraft,
    Effects,
    JsonObject,
    Page,
    Placed,
    ReadyTask,
    ReportedState,
    RetryPolicy,
    RunFilter,
    RunOrder,
    RunState,
    RunView,
    TaskSpec,
    TaskState,
    Unassigned,
    WorkflowRun,
)
from opscore.domain.ports import CreatedRun, NewRun, TaskResult
from opscore.domain.responses import Budget
from opscore.domain.state import QueuedTask, Sibling
from opscore.store import assignments, rows
from opscore.store.changes import FINISH_TASK, QUEUE_TASK, Changes
from opscore.store.queries import Store, base
from opscore.store.tables import metadata
from opscore.store.transactions import Committed, Database, Work
from opscore.store.writer import QUIET_SPELL, Tx, Writer

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
T = TypeVar("T")


BUDGET = Budget(4 * 1024 * 1024, WireSizes())


def list_runs(store: Store, page_token: str = "") -> Awaitable[Page[WorkflowRun]]:
    """The first page (or the page of `page_token`) of every run, newest first, without
    tasks."""
    return store.runs.list_runs(
        10, page_token, RunFilter(), RunOrder.NEWEST_FIRST, RunView.BASIC, BUDGET
    )


def ignore(_: object) -> None:
    """An on_commit callback for writes whose effects a test does not follow."""


async def effects_of(write: Callable[[Callable[[Effects], None]], Awaitable[object]]) -> Effects:
    """The effects a write that moves tasks hands its on_commit callback once committed."""
    seen: list[Effects] = []
    await write(seen.append)
    [effects] = seen
    return effects


def diamond() -> DefinitionDraft:
    return DefinitionDraft(
        workflow_name="diamond",
        tasks=(
            TaskSpec(name="a", capability="cpu", input={"k": 1}),
            TaskSpec(name="b", depends_on=("a",)),
            TaskSpec(name="c", depends_on=("a",)),
            TaskSpec(name="d", depends_on=("b", "c")),
        ),
    )


async def start(
    store: Store,
    draft: DefinitionDraft | None,
    *,
    definition_id: str = "",
    workflow_name: str = "",
    agent_id: str = "",
    run_input: JsonObject | None = None,
    request_id: str = "",
    now: datetime = NOW,
) -> CreatedRun:
    """`store.create_run` of the inline `draft` (or, with None, of the stored definition named by
    `definition_id` or `workflow_name`): at NOW, with no agent, input or request_id unless
    given: the run as the trigger commits it, with its effects."""
    created: list[CreatedRun] = []
    await store.runs.create_run(
        NewRun(
            definition_id=definition_id,
            workflow_name=workflow_name,
            inline=draft,
            agent_id=agent_id,
            run_input={} if run_input is None else run_input,
            request_id=request_id,
            now=now,
            on_commit=created.append,
        )
    )
    return created[0]


async def complete(
    store: Store, task_id: str, agent_id: str, attempt: int, output: JsonObject
) -> Effects:
    """`store.complete_task` at NOW; its effects."""
    return await effects_of(
        lambda on_commit: store.tasks.complete_task(
            TaskResult(task_id, agent_id, attempt, output, NOW, on_commit)
        )
    )


async def register(
    store: Store,
    agent_id: str,
    *capabilities: str,
    slots: int = 1,
    connect: bool = True,
    labels: dict[str, str] | None = None,
) -> None:
    """Register the agent and (unless told not to) open its stream: only a connected agent is
    given tasks."""
    await store.agents.register_agent(
        AgentRegistration(
            agent_id, capabilities=capabilities, labels=labels or {}, max_concurrent_tasks=slots
        ),
        token(),
        NOW,
        ignore,
    )
    if connect:
        await store.agents.connect_agent(agent_id, NOW, ignore)


async def held_by(store: Store, agent_id: str) -> ReadyTask:
    """A new one-task run's task, assigned to `agent_id` (attempt 1)."""
    created = await start(store, DefinitionDraft("one", tasks=(TaskSpec("only"),)))
    [ready] = created.effects.queued
    await store.tasks.assign([(ready, agent_id)], NOW, ignore)
    return ready


async def test_register_updates_in_place_and_keeps_history(store: Store) -> None:
    await register(store, "a1", "cpu", "gpu")
    later = NOW + timedelta(hours=1)
    agent = await store.agents.register_agent(
        AgentRegistration("a1", name="renamed", capabilities=("gpu",), labels={"zone": "eu"}),
        token(),
        later,
        ignore,
    )
    assert agent.name == "renamed"
    assert agent.capabilities == ("gpu",)
    assert agent.labels == {"zone": "eu"}
    assert agent.registered_at == NOW
    assert agent.last_seen_at == later
    assert agent.registered_at.tzinfo is not None


def token() -> str:
    """The digest of a new agent token."""
    return issue_agent_token()[1]


async def test_each_agent_keeps_the_digest_of_its_latest_token(store: Store) -> None:
    first, second, other = token(), token(), token()
    await store.agents.register_agent(AgentRegistration("a"), first, NOW, ignore)
    await store.agents.register_agent(AgentRegistration("b"), other, NOW, ignore)
    await store.agents.register_agent(AgentRegistration("a"), second, NOW, ignore)
    assert sorted(await store.agents.token_digests()) == [("a", second), ("b", other)]
    await store.agents.deregister_agent("a", NOW, ignore)
    assert await store.agents.token_digests() == [("b", other)]


async def test_server_assigns_an_agent_id_when_none_given(store: Store) -> None:
    agent = await store.agents.register_agent(AgentRegistration(""), token(), NOW, ignore)
    assert agent.agent_id
    assert (await store.agents.get_agent(agent.agent_id)).agent_id == agent.agent_id


async def test_unknown_agents_are_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.agents.get_agent("ghost")
    with pytest.raises(NotFound):
        await store.agents.touch_agent("ghost", NOW)
    with pytest.raises(NotFound):
        await store.agents.report_state("ghost", ReportedState.IDLE, "", NOW, ignore)
    with pytest.raises(NotFound):
        await store.agents.deregister_agent("ghost", NOW, ignore)


async def test_list_agents_filters_by_derived_state_and_capability(store: Store) -> None:
    for agent_id, capability in (("idle", "cpu"), ("busy", "cpu"), ("err", "gpu"), ("off", "cpu")):
        await register(store, agent_id, capability, connect=agent_id != "off")
    await store.agents.report_state("busy", ReportedState.BUSY, "", NOW, ignore)
    await store.agents.report_state("err", ReportedState.ERROR, "disk full", NOW, ignore)

    async def ids(state: AgentState | None, capability: str = "") -> list[str]:
        page = await store.agents.list_agents(100, "", state, capability, BUDGET)
        return [agent.agent_id for agent in page.items]

    assert await ids(AgentState.IDLE) == ["idle"]
    assert await ids(AgentState.BUSY) == ["busy"]
    assert await ids(AgentState.ERROR) == ["err"]
    assert await ids(AgentState.OFFLINE) == ["off"]
    assert await ids(None, "cpu") == ["busy", "idle", "off"]
    assert await ids(AgentState.IDLE, "gpu") == []


async def test_a_full_agent_is_busy(store: Store) -> None:
    await register(store, "w", "cpu")
    await store.agents.connect_agent("w", NOW, ignore)
    created = await start(store, diamond())
    [ready] = created.effects.queued
    await store.tasks.assign([(ready, "w")], NOW, ignore)
    agent = await store.agents.get_agent("w")
    assert (agent.running_tasks, agent.state) == (1, AgentState.BUSY)
    busy = await store.agents.list_agents(10, "", AgentState.BUSY, "", BUDGET)
    assert [a.agent_id for a in busy.items] == ["w"]


async def test_agent_pages_walk_every_agent_once(store: Store) -> None:
    for index in range(7):
        await register(store, f"agent-{index}")
    seen: list[str] = []
    token = ""
    while True:
        page = await store.agents.list_agents(3, token, None, "", BUDGET)
        seen.extend(agent.agent_id for agent in page.items)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"agent-{index}" for index in range(7)]


async def test_forged_page_token_is_invalid_argument(store: Store) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await list_runs(store, "%%%not-base64%%%")
    assert raised.value.violations[0].field == "page_token"


async def test_definitions_are_versioned_by_name_and_idempotent(store: Store) -> None:
    first = await store.definitions.create_definition(diamond(), "req-1", NOW)
    again = await store.definitions.create_definition(diamond(), "req-1", NOW)
    second = await store.definitions.create_definition(diamond(), "", NOW)
    assert again.definition_id == first.definition_id
    assert (first.version, second.version) == (1, 2)
    assert first.tasks == diamond().tasks
    listed = await store.definitions.list_definitions(10, "", "diamond", BUDGET)
    assert [d.version for d in listed.items] == [1, 2]
    assert (await store.definitions.list_definitions(10, "", "other", BUDGET)).items == ()


async def test_run_lifecycle_through_the_diamond(store: Store) -> None:
    await register(store, "w", "cpu")
    await store.agents.connect_agent("w", NOW, ignore)
    stored = await store.definitions.create_definition(diamond(), "", NOW)
    created = await start(
        store, None, workflow_name="diamond", run_input={"k": 2, "extra": True}, request_id="r-1"
    )
    run = created.run
    assert run.definition_id == stored.definition_id
    assert run.state is RunState.PENDING
    assert [t.state for t in run.tasks] == [TaskState.QUEUED] + [TaskState.PENDING] * 3
    [root] = created.effects.queued
    assert root.capability == "cpu"

    [assignment] = await store.tasks.assign([(root, "w")], NOW, ignore)
    assert assignment is not None
    assert assignment.input == {"k": 2, "extra": True}
    assert assignment.deadline == NOW + TIMEOUT
    assert (await store.runs.read_run(run.run_id, RunView.FULL, BUDGET)).state is RunState.RUNNING

    effects = await complete(store, root.task_id, "w", 1, {"out": "a"})
    assert sorted(t.task_id for t in effects.queued) == sorted(
        t.task_id for t in run.tasks if t.name in ("b", "c")
    )
    assert [(h.agent_id, h.task_id) for h in effects.released] == [("w", root.task_id)]
    repeated = await complete(store, root.task_id, "w", 1, {"out": "a"})
    assert repeated == Effects()
    with pytest.raises(ResultConflict):
        await complete(store, root.task_id, "w", 1, {"out": "other"})

    for ready in effects.queued:
        [handed] = await store.tasks.assign([(ready, "w")], NOW, ignore)
        assert handed is not None
        assert handed.dependency_outputs == {"a": {"out": "a"}}
        await complete(store, ready.task_id, "w", 1, {"out": handed.task_name})
    final = await store.runs.read_run(run.run_id, RunView.FULL, BUDGET)
    last = final.tasks[3]
    assert last.state is TaskState.QUEUED
    [handed] = await store.tasks.assign([(last.ready(), "w")], NOW, ignore)
    assert handed is not None
    assert handed.dependency_outputs == {"b": {"out": "b"}, "c": {"out": "c"}}
    done = await complete(store, last.task_id, "w", 1, {})
    assert done.finished_runs == [(run.run_id, RunState.SUCCEEDED)]
    finished = await store.runs.read_run(run.run_id, RunView.FULL, BUDGET)
    assert finished.state is RunState.SUCCEEDED
    assert finished.finished_at == NOW
    assert finished.tasks[0].output == {"out": "a"}


async def test_results_from_a_non_holder_change_nothing(store: Store) -> None:
    await register(store, "w")
    await register(store, "other")
    ready = await held_by(store, "w")
    with pytest.raises(FailedPrecondition):
        await complete(store, ready.task_id, "other", 1, {})
    with pytest.raises(FailedPrecondition):
        await complete(store, ready.task_id, "w", 2, {})
    with pytest.raises(NotFound):
        await complete(store, "no-such-task", "w", 1, {})
    task = (await store.runs.read_run(ready.run_id, RunView.FULL, BUDGET)).tasks[0]
    assert (task.state, task.agent_id, task.output) == (TaskState.ASSIGNED, "w", None)


async def test_failure_skips_the_rest_and_cancels_other_holders(store: Store) -> None:
    await register(store, "w1")
    await register(store, "w2")
    created = await start(
        store,
        DefinitionDraft(
            "pair", tasks=(TaskSpec("x"), TaskSpec("y"), TaskSpec("z", depends_on=("x", "y")))
        ),
    )
    x, y = created.effects.queued
    await store.tasks.assign([(x, "w1"), (y, "w2")], NOW, ignore)
    effects = await effects_of(
        lambda on_commit: store.tasks.fail_task(x.task_id, "w1", 1, "boom", False, NOW, on_commit)
    )
    assert effects.finished_runs == [(created.run.run_id, RunState.FAILED)]
    assert [(c.agent_id, c.task_id, c.reason) for c in effects.cancelled] == [
        ("w2", y.task_id, "run failed")
    ]
    assert {h.agent_id for h in effects.released} == {"w1", "w2"}
    run = await store.runs.read_run(created.run.run_id, RunView.FULL, BUDGET)
    assert [t.state for t in run.tasks] == [TaskState.FAILED, TaskState.SKIPPED, TaskState.SKIPPED]
    assert run.tasks[0].error == "boom"
    again = await effects_of(
        lambda on_commit: store.tasks.fail_task(x.task_id, "w1", 1, "boom", False, NOW, on_commit)
    )
    assert again == Effects()
    with pytest.raises(FailedPrecondition):
        await complete(store, y.task_id, "w2", 1, {})


async def test_cancel_unqueues_and_refuses_finished_runs(store: Store) -> None:
    created = await start(store, diamond())
    moved: list[Effects] = []
    run = await store.runs.cancel_run(created.run.run_id, NOW, moved.append)
    [effects] = moved
    assert run.state is RunState.CANCELLED
    assert {t.state for t in run.tasks} == {TaskState.CANCELLED}
    assert effects.unqueued == [created.effects.queued[0].task_id]
    with pytest.raises(FailedPrecondition):
        await store.runs.cancel_run(created.run.run_id, NOW, ignore)
    with pytest.raises(NotFound):
        await store.runs.cancel_run("no-such-run", NOW, ignore)


async def test_trigger_checks_its_references(store: Store) -> None:
    with pytest.raises(NotFound):
        await start(store, None, definition_id="nope")
    with pytest.raises(NotFound):
        await start(store, None, workflow_name="nope")
    await store.definitions.create_definition(diamond(), "", NOW)
    with pytest.raises(NotFound):
        await start(store, None, workflow_name="diamond", agent_id="x")
    assert (await list_runs(store)).items == ()


async def test_deregistering_requeues_held_tasks(store: Store) -> None:
    await register(store, "w")
    ready = await held_by(store, "w")
    effects = await effects_of(lambda on_commit: store.agents.deregister_agent("w", NOW, on_commit))
    assert [t.task_id for t in effects.queued] == [ready.task_id]
    assert [t.task_id for t in await store.tasks.load_queue()] == [ready.task_id]
    with pytest.raises(NotFound):
        await store.agents.get_agent("w")


async def test_deregistering_gives_back_each_held_task_as_it_was_queued(store: Store) -> None:
    """The dispatcher gets the released tasks back whole (labels, read as JSON text), except a
    task pinned to the agent, which no other agent may take: it fails."""
    await register(store, "w", slots=2)
    labelled = TaskSpec("t", labels={"zone": "eu", "tier": "g\u00f6ld"})
    created = [
        await start(store, DefinitionDraft("labelled", tasks=(labelled,))),
        await start(store, DefinitionDraft("pinned", tasks=(TaskSpec("t"),)), agent_id="w"),
    ]
    queued = [run.effects.queued[0] for run in created]
    await store.tasks.assign([(task, "w") for task in queued], NOW, ignore)
    effects = await effects_of(lambda on_commit: store.agents.deregister_agent("w", NOW, on_commit))
    assert effects.queued == queued[:1]
    assert [(h.agent_id, h.task_id) for h in effects.released] == [("w", t.task_id) for t in queued]
    pinned = await store.runs.read_run(created[1].run.run_id, RunView.FULL, BUDGET)
    assert pinned.state is RunState.FAILED
    assert pinned.tasks[0].error == "pinned agent 'w' was deregistered"


async def test_queue_loads_in_ready_order_and_connect_reports_holds(store: Store) -> None:
    await register(store, "w", slots=5)
    order = []
    for index in range(3):
        created = await start(
            store,
            DefinitionDraft(f"wf{index}", tasks=(TaskSpec("t"),)),
            now=NOW + timedelta(seconds=index),
        )
        order.append(created.effects.queued[0])
    assert [t.task_id for t in await store.tasks.load_queue()] == [t.task_id for t in order]
    await store.tasks.assign([(order[0], "w")], NOW, ignore)
    connected = await store.agents.connect_agent("w", NOW, ignore)
    assert [a.task_id for a in connected.held] == [order[0].task_id]
    assert connected.held[0].redelivered
    await store.replicas.join("p2", "", NOW, timedelta(seconds=10), alone=True)
    assert not (await store.agents.get_agent("w")).connected


async def test_the_queue_loads_each_task_as_its_write_queued_it(store: Store) -> None:
    """What the start reads back (labels read as JSON text and decoded through a cache) is what
    the writes that queued the tasks handed the dispatcher."""
    await register(store, "w")
    labelled = TaskSpec("t", capability="gpu", labels={"zone": "eu", "tier": "g\u00f6ld"})
    created = [
        await start(store, DefinitionDraft("labelled", tasks=(labelled,))),
        await start(
            store,
            DefinitionDraft("pinned", tasks=(TaskSpec("t"),)),
            agent_id="w",
            now=NOW + timedelta(seconds=1),
        ),
        await start(
            store, DefinitionDraft("again", tasks=(labelled,)), now=NOW + timedelta(seconds=2)
        ),
    ]
    queued = [run.effects.queued[0] for run in created]
    assert queued[0].labels == (("tier", "g\u00f6ld"), ("zone", "eu"))
    assert queued[1].pinned_agent_id == "w"
    assert await store.tasks.load_queue() == queued


async def test_registrations_in_one_batch_each_get_their_own(store: Store) -> None:
    """A fleet registers at once; an agent registering twice in the same batch is written as if
    the registrations came one after the other: each caller sees its own, the later one stays."""
    writer = store.shared.writer  # that they share a batch is what this test is about
    batches = writer.batches
    registered = await asyncio.gather(
        *(
            store.agents.register_agent(
                AgentRegistration(f"r{index}", capabilities=(f"c{index}", "shared")),
                token(),
                NOW,
                ignore,
            )
            for index in range(20)
        ),
        store.agents.register_agent(
            AgentRegistration("r0", name="again", capabilities=("x",)), token(), NOW, ignore
        ),
    )
    assert writer.batches - batches < 5
    assert [agent.capabilities for agent in registered[:3]] == [
        ("c0", "shared"),
        ("c1", "shared"),
        ("c2", "shared"),
    ]
    assert (registered[-1].name, registered[-1].capabilities) == ("again", ("x",))
    stored = await store.agents.get_agent("r0")
    assert (stored.name, stored.capabilities) == ("again", ("x",))


async def test_streams_opened_in_one_batch_each_get_their_holds(store: Store) -> None:
    for agent_id in ("s1", "s2", "s3"):
        await register(store, agent_id)
    first, second = await held_by(store, "s1"), await held_by(store, "s2")
    await store.replicas.join("p2", "", NOW, timedelta(seconds=10), alone=True)
    opened = await asyncio.gather(
        *(
            store.agents.connect_agent(agent_id, NOW, ignore)
            for agent_id in ("s1", "s2", "s3", "ghost")
        ),
        return_exceptions=True,
    )
    assert [[a.task_id for a in c.held] for c in opened[:3]] == [  # type: ignore[union-attr]
        [first.task_id],
        [second.task_id],
        [],
    ]
    assert isinstance(opened[3], NotFound)
    for agent_id in ("s1", "s2", "s3"):
        assert (await store.agents.get_agent(agent_id)).connected


async def test_concurrent_writes_share_transactions(store: Store) -> None:
    await register(store, "w")
    writer = store.shared.writer  # the batching is what this test is about
    before_batches, before_ops = writer.batches, writer.operations
    await asyncio.gather(*(store.agents.touch_agent("w", NOW) for _ in range(200)))
    batches = writer.batches - before_batches
    assert writer.operations - before_ops == 200
    assert batches < 50


async def test_writes_arriving_over_the_next_turns_join_the_batch(store: Store) -> None:
    await register(store, "w")
    writer = store.shared.writer  # the batching is what this test is about

    async def after_turns(turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        await store.agents.touch_agent("w", NOW)

    before = writer.batches
    # Each write arrives one turn of the loop after the one before it, as the RPCs of agents
    # answering together do: the first waits for the others rather than committing alone.
    await asyncio.gather(*(after_turns(turns) for turns in range(5)))
    assert writer.batches == before + 1


class Recording(Database):
    """The store's database, recording which writes the writer said came alone."""

    def __init__(self, inner: Database) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.health = inner.health
        self.alone: list[bool] = []

    async def _run(self, work: Work[T], write: bool, alone: bool, committed: Committed[T]) -> T:
        if write:
            self.alone.append(alone)
        return await self.inner.run(work, write=write, alone=alone, committed=committed)

    async def dispose(self) -> None:
        await self.inner.dispose()

    async def maintain(self) -> None:
        await self.inner.maintain()


async def test_a_lone_write_after_a_quiet_spell_comes_alone(store: Store) -> None:
    """Only a write that finds the server quiet, and that no other write joins, is run alone
    (on SQLite, committed without the writer thread); what it writes is committed the same."""
    recording = Recording(store.database)
    writer = Writer(recording)
    running = asyncio.create_task(writer.run())
    quiet = Store(recording, writer, store_rules())
    try:
        await register(quiet, "w")
        recording.alone.clear()
        await asyncio.sleep(2 * QUIET_SPELL)
        await asyncio.gather(quiet.agents.touch_agent("w", NOW), quiet.agents.touch_agent("w", NOW))
        await asyncio.sleep(2 * QUIET_SPELL)
        later = NOW + timedelta(hours=1)
        await quiet.agents.touch_agent("w", later)
    finally:
        writer.close()
        await running
    # Two writes together make one batch, not alone; the last write found the server quiet.
    assert recording.alone == [False, True]
    assert (await store.agents.get_agent("w")).last_seen_at == later


async def test_one_failing_write_does_not_undo_its_batch(store: Store) -> None:
    await register(store, "w")
    later = NOW + timedelta(days=1)
    results = await asyncio.gather(
        store.agents.touch_agent("w", later),
        store.agents.touch_agent("ghost", later),
        store.definitions.create_definition(diamond(), "", later),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], NotFound)
    assert (await store.agents.get_agent("w")).last_seen_at == later
    assert len((await store.definitions.list_definitions(10, "", "", BUDGET)).items) == 1


async def test_a_failing_commit_callback_stops_the_writer_without_writing_twice(
    store: Store,
) -> None:
    """Effects are applied once their batch has committed; one that fails is a fault of the
    server (its writer stops with the error), never a reason to run the batch's writes again."""
    writer = Writer(store.database)
    running = asyncio.create_task(writer.run())
    written: list[str] = []

    def write(tx: Tx) -> str:
        tx.conn.execute(update(metadata.tables["agents"]).values(version=f"v{len(written)}"))
        written.append("ran")

        def broken() -> None:
            raise RuntimeError("an effect failed")

        tx.after_commit(broken)
        return "value"

    await register(store, "w")
    caller = asyncio.create_task(writer.submit(write))
    with pytest.raises(RuntimeError, match="an effect failed"):
        await asyncio.wait_for(running, 10)
    assert written == ["ran"]
    assert (await store.agents.get_agent("w")).version == "v0"
    caller.cancel()


async def test_completions_in_one_batch_move_their_run_once(store: Store) -> None:
    await register(store, "w", "cpu", slots=2)
    created = await start(store, diamond())
    [root] = created.effects.queued
    await store.tasks.assign([(root, "w")], NOW, ignore)
    b, c = (await complete(store, root.task_id, "w", 1, {"out": "a"})).queued
    await store.tasks.assign([(b, "w"), (c, "w")], NOW, ignore)
    before = store.shared.writer.batches  # one batch is what this test is about
    first, second = await asyncio.gather(
        complete(store, b.task_id, "w", 1, {"out": "b"}),
        complete(store, c.task_id, "w", 1, {"out": "c"}),
    )
    assert store.shared.writer.batches == before + 1
    run = await store.runs.read_run(created.run.run_id, RunView.FULL, BUDGET)
    assert first.queued == []  # d still waited for c when b's result was recorded
    assert [t.task_id for t in second.queued] == [run.tasks[3].task_id]
    assert [t.state for t in run.tasks] == [TaskState.SUCCEEDED] * 3 + [TaskState.QUEUED]
    assert [t.output for t in run.tasks[1:3]] == [{"out": "b"}, {"out": "c"}]


async def test_a_result_reported_twice_in_one_batch_is_recorded_once(store: Store) -> None:
    await register(store, "w")
    await register(store, "other")
    ready = await held_by(store, "w")
    first, again, conflicting, stranger = await asyncio.gather(
        complete(store, ready.task_id, "w", 1, {"n": 1}),
        complete(store, ready.task_id, "w", 1, {"n": 1}),
        complete(store, ready.task_id, "w", 1, {"n": 2}),
        complete(store, ready.task_id, "other", 1, {}),
        return_exceptions=True,
    )
    assert isinstance(first, Effects)
    assert [h.task_id for h in first.released] == [ready.task_id]
    assert again == Effects()
    assert isinstance(conflicting, ResultConflict)
    assert isinstance(stranger, FailedPrecondition)
    task = (await store.runs.read_run(ready.run_id, RunView.FULL, BUDGET)).tasks[0]
    assert (task.state, task.output) == (TaskState.SUCCEEDED, {"n": 1})


async def test_triggers_in_one_batch_keep_their_own_request_ids_and_errors(store: Store) -> None:
    await store.definitions.create_definition(diamond(), "", NOW)
    first, again, missing, ghost, other = await asyncio.gather(
        start(store, None, workflow_name="diamond", request_id="same"),
        start(store, None, workflow_name="diamond", request_id="same"),
        start(store, None, workflow_name="missing"),
        start(store, None, workflow_name="diamond", agent_id="ghost"),
        start(store, None, workflow_name="diamond"),
        return_exceptions=True,
    )
    assert isinstance(first, CreatedRun)
    assert first.created
    assert isinstance(again, CreatedRun)
    assert not again.created
    assert again.run.run_id == first.run.run_id
    assert isinstance(missing, NotFound)
    assert isinstance(ghost, NotFound)
    assert isinstance(other, CreatedRun)
    assert other.created
    listed = await list_runs(store)
    assert sorted(run.run_id for run in listed.items) == sorted(
        [first.run.run_id, other.run.run_id]
    )


async def test_only_agents_that_can_take_work_are_assigned_it(store: Store) -> None:
    await register(store, "idle")
    await register(store, "busy")
    await store.agents.report_state("busy", ReportedState.BUSY, "", NOW, ignore)
    await register(store, "failing")
    await store.agents.report_state("failing", ReportedState.ERROR, "disk full", NOW, ignore)
    await register(store, "offline", connect=False)
    await register(store, "gone")
    await store.agents.deregister_agent("gone", NOW, ignore)
    agents = ["idle", "busy", "failing", "offline", "gone"]
    tasks = [
        (await start(store, DefinitionDraft(f"wf-{name}", tasks=(TaskSpec("t"),)))).effects.queued[
            0
        ]
        for name in agents
    ]
    assignments = await store.tasks.assign(list(zip(tasks, agents, strict=True)), NOW, ignore)
    assert isinstance(assignments[0], Assignment)
    # The others' tasks still wait, for agents that take work.
    assert assignments[1:] == [Unassigned.AGENT_UNFIT] * 4
    assert sorted(t.task_id for t in await store.tasks.load_queue()) == sorted(
        t.task_id for t in tasks[1:]
    )


async def test_a_write_places_the_tasks_it_queues_before_it_commits(
    store: Store, placement: Placement
) -> None:
    await register(store, "w")
    seen: list[object] = []

    def place(
        queued: list[ReadyTask], released: list[tuple[str, str]]
    ) -> tuple[list[tuple[ReadyTask, str]], Callable[[], None]]:
        return [(task, "w") for task in queued], lambda: seen.append("given back")

    def assigned(pairs: list[tuple[ReadyTask, str]], assignments: list[Placed]) -> None:
        seen.append([a.task_id for a in assignments if isinstance(a, Assignment)])

    placement.hook = store.placement(place, assigned, lambda: NOW)
    created = await start(store, DefinitionDraft("one", tasks=(TaskSpec("only"),)))
    task = (await store.runs.read_run(created.run.run_id, RunView.FULL, BUDGET)).tasks[0]
    assert (task.state, task.agent_id, task.attempt) == (TaskState.ASSIGNED, "w", 1)
    assert seen == [[task.task_id]]

    # A batch whose assignments the database refuses gives its placements back, and each write
    # is run again on its own (without placing: the dispatcher takes its tasks after the commit).
    await refuse_assignments(store, refuse=True)
    again = await start(store, DefinitionDraft("two", tasks=(TaskSpec("only"),)))
    await refuse_assignments(store, refuse=False)
    assert seen[1:] == ["given back"]
    assert [t.task_id for t in await store.tasks.load_queue()] == [again.run.tasks[0].task_id]


async def test_a_task_whose_agent_leaves_in_the_same_batch_is_not_taken_but_waits(
    store: Store, placement: Placement
) -> None:
    """A trigger placed on an agent that reports ERROR in the same transaction: the match is not
    written, the placement says the agent was unfit (so the task waits again in memory), and
    the task is still queued in the database."""
    await register(store, "w")
    seen: list[Placed] = []

    def place(
        queued: list[ReadyTask], released: list[tuple[str, str]]
    ) -> tuple[list[tuple[ReadyTask, str]], Callable[[], None]]:
        return [(task, "w") for task in queued], lambda: None

    placement.hook = store.placement(place, lambda _, placed: seen.extend(placed), lambda: NOW)
    _, created = await asyncio.gather(
        store.agents.report_state("w", ReportedState.ERROR, "broken", NOW, ignore),
        start(store, DefinitionDraft("one", tasks=(TaskSpec("only"),))),
    )
    assert seen == [Unassigned.AGENT_UNFIT]
    assert [t.task_id for t in await store.tasks.load_queue()] == [created.run.tasks[0].task_id]


_REFUSE = {
    "sqlite": (
        "CREATE TRIGGER refuse_assignments BEFORE UPDATE OF state ON tasks"
        " WHEN NEW.state = 'assigned' BEGIN SELECT RAISE(ABORT, 'refused'); END",
    ),
    "postgresql": (
        "CREATE FUNCTION refuse_assignments() RETURNS trigger AS $$ BEGIN"
        " IF NEW.state = 'assigned' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW;"
        " END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_assignments BEFORE UPDATE ON tasks"
        " FOR EACH ROW EXECUTE FUNCTION refuse_assignments()",
    ),
}
_ALLOW = {
    "sqlite": ("DROP TRIGGER refuse_assignments",),
    "postgresql": (
        "DROP TRIGGER refuse_assignments ON tasks",
        "DROP FUNCTION refuse_assignments()",
    ),
}


async def refuse_assignments(store: Store, *, refuse: bool) -> None:
    """Make the database itself refuse (or accept again) every write that assigns a task: a
    fault the server did not cause, in the middle of a batch."""
    statements = (_REFUSE if refuse else _ALLOW)[store.database.dialect]

    def run(conn: Connection) -> None:
        for statement in statements:
            conn.exec_driver_sql(statement)

    await store.database.run(run, write=True)


async def test_a_write_whose_caller_is_cancelled_is_still_committed(store: Store) -> None:
    await register(store, "w")
    await register(store, "other")
    later = NOW + timedelta(days=2)
    waiting = asyncio.create_task(store.agents.touch_agent("w", later))
    await asyncio.sleep(0)  # the write is submitted
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await store.agents.touch_agent("other", later)  # committed after the cancelled caller's batch
    assert (await store.agents.get_agent("w")).last_seen_at == later


async def test_changes_to_one_row_run_in_the_order_they_were_made(store: Store) -> None:
    created = await start(store, DefinitionDraft("two", tasks=(TaskSpec("a"), TaskSpec("b"))))
    first, second = created.run.tasks
    later = NOW + timedelta(minutes=1)

    def change(conn: Connection) -> None:
        changes = Changes(conn)
        # Grouped by statement alone, both queueings would run before the cancellation.
        changes.add(QUEUE_TASK, first.task_id, {"b_task_id": first.task_id, "b_now": later})
        cancel = {"b_task_id": second.task_id, "b_now": later, "b_state": "cancelled"}
        changes.add(FINISH_TASK, second.task_id, cancel)
        changes.add(QUEUE_TASK, second.task_id, {"b_task_id": second.task_id, "b_now": later})
        changes.flush()

    await store.database.run(change, write=True)
    tasks = (await store.runs.read_run(created.run.run_id, RunView.FULL, BUDGET)).tasks
    assert [(t.state, t.queued_at) for t in tasks] == [(TaskState.QUEUED, later)] * 2


async def test_runs_whose_shapes_were_dropped_move_the_same(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shapes are kept up to a number of tasks in all (each is objects for every full garbage
    collection to walk); the oldest runs' shapes go first, and are read again when needed."""
    monkeypatch.setattr(base, "RUN_SHAPE_CACHE_TASKS", 6)
    await register(store, "w", "cpu", slots=3)
    runs = [(await start(store, diamond())).run for _ in range(3)]
    assert store.shared.shapes._tasks <= 6  # the cache is what this test is about
    [first_root] = runs[0].tasks[:1]
    await store.tasks.assign([(first_root.ready(), "w")], NOW, ignore)
    effects = await complete(store, first_root.task_id, "w", 1, {"out": 1})
    assert effects.queued == [task.ready() for task in runs[0].tasks[1:3]]


async def test_a_run_triggered_elsewhere_moves_the_same(store: Store) -> None:
    # A store that did not trigger the run (this replica after a restart, holding the agent's
    # stream again) reads the run's shape instead of knowing it.
    writer = Writer(store.database)
    running = asyncio.create_task(writer.run())
    elsewhere = Store(store.database, writer, store_rules(), store.shared.replica_id)
    try:
        await register(store, "w", "cpu", "gpu", labels={"zone": "eu"})
        shaped = DefinitionDraft(
            workflow_name="shaped",
            tasks=(
                TaskSpec(name="a", capability="cpu"),
                TaskSpec(name="b", capability="gpu", labels={"zone": "eu"}, depends_on=("a",)),
                TaskSpec(name="c", capability="cpu", depends_on=("a",), fallback="f"),
                TaskSpec(name="f", capability="cpu"),
                TaskSpec(name="d", capability="cpu", depends_on=("b", "c")),
            ),
        )
        run = (await start(store, shaped, agent_id="w")).run
        [root] = run.tasks[:1]
        await store.tasks.assign([(root.ready(), "w")], NOW, ignore)
        effects = await complete(elsewhere, root.task_id, "w", 1, {"out": "a"})
        # What the dispatcher is told comes from the shape read: requirements included, and
        # tasks made ready together in the order the definition gives them.
        assert effects.queued == [t.ready() for t in run.tasks[1:3]]
        for ready in effects.queued:
            await elsewhere.tasks.assign([(ready, "w")], NOW, ignore)
            await complete(elsewhere, ready.task_id, "w", 1, {})
        after = await elsewhere.runs.read_run(run.run_id, RunView.FULL, BUDGET)
        # c succeeded, so its fallback is skipped: the fallback came from the shape read too.
        assert [t.state for t in after.tasks] == [TaskState.SUCCEEDED] * 3 + [
            TaskState.SKIPPED,
            TaskState.QUEUED,
        ]
        # A fallback's assignment says what it stands in for, from a shape read as well.
        failing = (await start(store, shaped, agent_id="w")).run
        await store.tasks.assign([(failing.tasks[0].ready(), "w")], NOW, ignore)
        await complete(store, failing.tasks[0].task_id, "w", 1, {})
        [held] = await store.tasks.assign([(failing.tasks[2].ready(), "w")], NOW, ignore)
        assert held is not None
        fresh = Store(store.database, writer, store_rules(), store.shared.replica_id)
        failed = await effects_of(
            lambda on_commit: fresh.tasks.fail_task(
                failing.tasks[2].task_id, "w", 1, "no", False, NOW, on_commit
            )
        )
        [stand_in] = failed.queued
        [handed] = await fresh.tasks.assign([(stand_in, "w")], NOW, ignore)
        assert handed is not None
        assert (handed.task_name, handed.fallback_for, handed.fallback_error) == ("f", "c", "no")
    finally:
        writer.close()
        await running


async def test_runs_written_from_a_template_read_back_as_triggered(store: Store) -> None:
    """A trigger writes its tasks' rows from its definition's template (converted once) and
    returns the run without reading it back: what it returns is what was stored, for a stored
    definition's second run as for its first, and for an inline one."""
    await register(store, "w", "cpu", "gpu", labels={"zone": "eu", "tier": "gold"})
    detailed = DefinitionDraft(
        workflow_name="detailed",
        tasks=(
            TaskSpec(
                name="a",
                capability="cpu",
                labels={"zone": "eu", "tier": "gold"},
                input={"k": 1, "keep": [1, 2]},
                timeout=timedelta(seconds=90),
                retry_policy=RetryPolicy(max_attempts=4, initial_backoff=timedelta(seconds=2)),
            ),
            TaskSpec(name="b", capability="gpu", depends_on=("a",), fallback="f"),
            TaskSpec(name="f", capability="cpu"),
        ),
    )
    stored = await store.definitions.create_definition(detailed, "", NOW)
    runs = [
        (await start(store, None, definition_id=stored.definition_id)).run,
        (await start(store, None, workflow_name="detailed", agent_id="w", run_input={"k": 2})).run,
        (await start(store, detailed, run_input={"extra": None})).run,
    ]
    for run in runs:
        assert await store.runs.read_run(run.run_id, RunView.FULL, BUDGET) == run
    assert [t.state for t in runs[0].tasks] == [
        TaskState.QUEUED,
        TaskState.PENDING,
        TaskState.PENDING,
    ]
    # Every column the template wrote, as Core reads it back.
    columns = ("name", "capability", "labels", "depends_on", "fallback", "timeout_ms")
    tasks = metadata.tables["tasks"]

    def stored(conn: Connection) -> list[str]:
        wanted = (*columns, "retry_policy", "input")
        found = conn.execute(select(*(tasks.c[name] for name in wanted)))
        return sorted(json.dumps(list(row), sort_keys=True) for row in found)

    expected = sorted(
        json.dumps(
            [
                spec.name,
                spec.capability,
                spec.labels,
                list(spec.depends_on),
                spec.fallback,
                90_000 if spec.timeout else None,
                rows.retry_to_json(spec.retry_policy),
                {**spec.input, **run_input},
            ],
            sort_keys=True,
        )
        for run_input in ({}, {"k": 2}, {"extra": None})
        for spec in detailed.tasks
    )
    assert await store.database.run(stored, write=False) == expected
    assert len({task.task_id for run in runs for task in run.tasks}) == 9
    assert {task.pinned_agent_id for task in runs[1].tasks} == {"w"}
    queue = {task.task_id: task for task in await store.tasks.load_queue()}
    for run in runs:
        assert queue[run.tasks[0].task_id] == run.tasks[0].ready()
    inputs = [
        {"k": 1, "keep": [1, 2]},
        {"k": 2, "keep": [1, 2]},
        {"k": 1, "keep": [1, 2], "extra": None},
    ]
    for run, task_input in zip(runs, inputs, strict=True):
        [handed] = await store.tasks.assign([(run.tasks[0].ready(), "w")], NOW, ignore)
        assert handed is not None
        assert handed.input == task_input
        assert handed.deadline == NOW + timedelta(seconds=90)


def place_every_ready_task_on(
    store: Store, placement: Placement, agent_id: str
) -> list[Assignment]:
    """Let each write batch place every task it makes ready on `agent_id`, before it commits;
    the list fills with the assignments written."""
    placed: list[Assignment] = []

    def place(
        queued: list[ReadyTask], released: list[tuple[str, str]]
    ) -> tuple[list[tuple[ReadyTask, str]], Callable[[], None]]:
        return [(task, agent_id) for task in queued], lambda: None

    def assigned(pairs: list[tuple[ReadyTask, str]], written: list[Placed]) -> None:
        placed.extend(found for found in written if isinstance(found, Assignment))

    placement.hook = store.placement(place, assigned, lambda: NOW)
    return placed


async def test_tasks_placed_with_their_dependencys_result_get_its_output(
    store: Store, placement: Placement
) -> None:
    """A write that records a result and places the tasks it made ready, in one transaction,
    sends them the outputs it recorded without reading them back; outputs recorded in earlier
    batches, and a fallback's output standing in for a failed dependency, are read."""
    await register(store, "w", slots=10)
    placed = place_every_ready_task_on(store, placement, "w")
    draft = DefinitionDraft(
        "mixed",
        tasks=(
            TaskSpec("a"),
            TaskSpec("b", depends_on=("a",)),
            TaskSpec("c", depends_on=("a",), fallback="f"),
            TaskSpec("f"),
            TaskSpec("d", depends_on=("b", "c")),
        ),
    )
    run = (await start(store, draft)).run
    assert (await store.runs.read_run(run.run_id, RunView.FULL, BUDGET)).state is RunState.RUNNING
    by_name = {task.name: task.task_id for task in run.tasks}

    def handed(name: str) -> Assignment:
        [found] = [item for item in placed if item.task_name == name]
        return found

    await complete(store, by_name["a"], "w", 1, {"from": "a", "n": [1.5, None]})
    assert handed("b").dependency_outputs == {"a": {"from": "a", "n": [1.5, None]}}
    assert handed("c").dependency_outputs == {"a": {"from": "a", "n": [1.5, None]}}
    # What was sent is what reading it gives: the same attempts sent again on a new stream.
    again = {
        item.task_name: item for item in (await store.agents.connect_agent("w", NOW, ignore)).held
    }
    assert again["b"].dependency_outputs == handed("b").dependency_outputs
    assert again["c"].dependency_outputs == handed("c").dependency_outputs
    await complete(store, by_name["b"], "w", 1, {"from": "b"})
    await store.tasks.fail_task(by_name["c"], "w", 1, "broken", False, NOW, ignore)
    assert handed("f").fallback_for == "c"
    assert handed("f").fallback_error == "broken"
    # d's dependencies: b recorded in an earlier batch, c failed and f stood in for it.
    await complete(store, by_name["f"], "w", 1, {"from": "f"})
    assert handed("d").dependency_outputs == {"b": {"from": "b"}, "c": {"from": "f"}}
    await complete(store, by_name["d"], "w", 1, {})
    finished = await store.runs.read_run(run.run_id, RunView.FULL, BUDGET)
    assert finished.state is RunState.SUCCEEDED
    assert finished.started_at == NOW


async def test_a_new_runs_roots_placed_in_its_batch_are_sent_as_stored(
    store: Store, placement: Placement
) -> None:
    """A trigger that places its run's roots in its own transaction takes what their assignments
    need from the rows it inserted, not from a read: they match what a read gives."""
    await register(store, "w", "cpu", slots=2)
    placed = place_every_ready_task_on(store, placement, "w")
    draft = DefinitionDraft(
        "roots",
        tasks=(
            TaskSpec("a", capability="cpu", input={"k": 1}, timeout=timedelta(seconds=5)),
            TaskSpec("b", capability="cpu", input={"k": 2, "only": "b"}),
            TaskSpec("c", depends_on=("a", "b")),
        ),
    )
    run = (await start(store, draft, agent_id="w", run_input={"k": 0})).run
    assert (await store.runs.read_run(run.run_id, RunView.FULL, BUDGET)).state is RunState.RUNNING
    again = {
        item.task_id: item for item in (await store.agents.connect_agent("w", NOW, ignore)).held
    }
    assert {item.task_name for item in placed} == {"a", "b"}
    for item in placed:
        resent = again[item.task_id]
        assert dataclasses.replace(resent, redelivered=False) == item
    by_name = {item.task_name: item for item in placed}
    assert by_name["a"].input == {"k": 0}
    assert by_name["a"].deadline == NOW + timedelta(seconds=5)
    assert by_name["b"].input == {"k": 0, "only": "b"}
    assert by_name["b"].deadline == NOW + TIMEOUT
    assert (by_name["a"].attempt, by_name["a"].capability) == (1, "cpu")


async def test_an_assignments_context_holds_only_the_tasks_it_refers_to(store: Store) -> None:
    """Tasks of several runs placed together read the rows their messages refer to, each by its
    id: a dependency, and the task a fallback stands in for; not the tasks of the same names in
    the other runs, nor every task of a run that has a fallback."""
    await register(store, "w", slots=10)
    draft = DefinitionDraft(
        "context",
        tasks=(
            TaskSpec("a"),
            TaskSpec("b", depends_on=("a",), fallback="f"),
            TaskSpec("f"),
            TaskSpec("c", depends_on=("b",)),
        ),
    )
    first, second = [(await start(store, draft)).run for _ in range(2)]
    for run, output in ((first, {"a": 1}), (second, {"a": 2})):
        [root] = run.tasks[:1]
        await store.tasks.assign([(root.ready(), "w")], NOW, ignore)
        await complete(store, root.task_id, "w", 1, output)
    failing = second.tasks[1]
    await store.tasks.assign([(failing.ready(), "w")], NOW, ignore)
    await store.tasks.fail_task(failing.task_id, "w", 1, "broken", False, NOW, ignore)

    def context(conn: Connection) -> dict[str, dict[str, Sibling]]:
        placed = [
            QueuedTask(
                task.task_id,
                task.run_id,
                task.name,
                "",
                {},
                task.depends_on,
                0,
                None,
                is_fallback=task.name == "f",
            )
            for task in (first.tasks[1], second.tasks[2])
        ]
        shapes = store.shared.shapes.of(conn, [first.run_id, second.run_id])
        return assignments.context_of(conn, placed, {}, shapes)

    found = await store.database.run(context, write=False)
    assert {run_id: sorted(tasks) for run_id, tasks in found.items()} == {
        first.run_id: ["a"],
        second.run_id: ["b"],
    }
    assert found[first.run_id]["a"].output == {"a": 1}
    assert (found[second.run_id]["b"].state, found[second.run_id]["b"].error) == (
        TaskState.FAILED,
        "broken",
    )
