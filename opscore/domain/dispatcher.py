"""Where ready tasks meet free agents, in one server: the single-process `Dispatch` (see
`dispatch` for the seam and its contract).

The dispatcher keeps two in-memory indexes, both rebuilt from the database at start and changed
only by effects of committed writes: the ready tasks, grouped by their requirements (capability,
labels, pinned agent), each group in the order its tasks became ready; and the connected agents
with the attempts they hold. An event (a task became ready, an agent connected, reported idle or
freed a slot) wakes one pass, which repeatedly takes the earliest-ready task that some free agent
can take and gives it to the eligible agent that has waited longest. Free agents are kept in
waiting order, by capability, so a pass costs O(groups) per assignment plus the agents of the
task's capability that lack its labels; never O(queued tasks) (a backlog no agent can take is not
looked at) and never O(connected agents).

A task waiting out a retry's backoff sits in a heap by its "not before" time, and the loop's
wait ends at the earliest of them: no polling.

A batch of assignments that storage refuses (`StorageFault`) is given back: its tasks return to
their places in the queue and its agents' slots are freed, and the loop tries again after a
backoff, until storage takes the batch.

The write that makes a task ready, or frees an agent's slot, can also place tasks itself, before
it commits (`reserve_for_commit`): its assignments then commit in the same transaction, and a
task goes from ready to pushed in one commit instead of two. Like everything else that touches
the indexes, that write runs on the event loop, so they need no lock.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from opscore.domain.clock import Clock
from opscore.domain.dispatch import AssignBatch
from opscore.domain.errors import StorageFault
from opscore.domain.health import Backoff
from opscore.domain.idle import Pauses
from opscore.domain.models import AgentProfile, ReadyTask, ReportedState

Requirements = tuple[str, tuple[tuple[str, str], ...], str]
"""What a task needs of an agent: capability, labels, pinned agent id. Tasks alike share a queue."""


@dataclass(slots=True)
class _LiveAgent:
    profile: AgentProfile
    held: set[str]
    waiting_since: float
    backlogged: bool = False
    """Its stream holds as much as it may (see `streams`): it is not draining, so not idle."""

    @property
    def available(self) -> bool:
        return (
            self.profile.reported_state in (ReportedState.NONE, ReportedState.IDLE)
            and len(self.held) < self.profile.max_concurrent_tasks
            and not self.backlogged
        )


class _FreeAgents:
    """The available agents, longest waiting first: all of them, and by capability.

    Finding the agent for a task walks the agents that offer its capability in waiting order and
    stops at the first that carries its labels, instead of looking at every connected agent (a
    fleet of 10,000 idle agents costs nothing per task it does not concern)."""

    def __init__(self) -> None:
        self._all: OrderedDict[str, _LiveAgent] = OrderedDict()
        self._by_capability: dict[str, OrderedDict[str, _LiveAgent]] = {}
        self._indexed: dict[str, frozenset[str]] = {}

    def __bool__(self) -> bool:
        """Whether any agent is available."""
        return bool(self._all)

    def candidates(self, capability: str) -> Iterable[_LiveAgent]:
        """Available agents offering `capability` (any agent for ""), longest waiting first."""
        if capability:
            return self._by_capability.get(capability, {}).values()
        return self._all.values()

    def update(self, agent: _LiveAgent, *, waited_anew: bool) -> None:
        """Re-file `agent` after a change; `waited_anew` if its waiting time was just reset."""
        agent_id = agent.profile.agent_id
        capabilities = agent.profile.capabilities
        if not agent.available:
            self.remove(agent_id)
            return
        if self._indexed.get(agent_id) == capabilities and not waited_anew:
            return
        self.remove(agent_id)
        self._indexed[agent_id] = capabilities
        _insert_in_waiting_order(self._all, agent)
        for capability in capabilities:
            _insert_in_waiting_order(
                self._by_capability.setdefault(capability, OrderedDict()), agent
            )

    def remove(self, agent_id: str) -> None:
        """Forget the agent (offline, or no free slot, or not idle)."""
        capabilities = self._indexed.pop(agent_id, None)
        if capabilities is None:
            return
        self._all.pop(agent_id, None)
        for capability in capabilities:
            group = self._by_capability[capability]
            group.pop(agent_id, None)
            if not group:
                del self._by_capability[capability]


def _insert_in_waiting_order(group: OrderedDict[str, _LiveAgent], agent: _LiveAgent) -> None:
    """Append (the common case: the agent has just started waiting), or re-sort when an agent
    that has waited for a while is filed again (its capabilities changed)."""
    group[agent.profile.agent_id] = agent
    newest_first = reversed(group.values())  # not a list: the group may hold the whole fleet
    if len(group) > 1 and next(newest_first) is agent:
        previous = next(newest_first)
        if previous.waiting_since > agent.waiting_since:
            ordered = sorted(group.values(), key=lambda live: live.waiting_since)
            group.clear()
            group.update((live.profile.agent_id, live) for live in ordered)


_REQUIREMENTS = slice(
    ReadyTask._fields.index("capability"), ReadyTask._fields.index("pinned_agent_id") + 1
)
"""Where a ReadyTask's fields hold its requirements (capability, labels, pinned agent id)."""


def requirements(task: ReadyTask) -> Requirements:
    """What an agent must offer to take `task`: the key of its queue."""
    return (task.capability, task.labels, task.pinned_agent_id)


@dataclass(slots=True)
class _Queue:
    """One group of alike tasks: a heap of (ready sequence, task id) with lazy deletion."""

    heap: list[tuple[int, str]] = field(default_factory=list)
    live: int = 0
    """How many of the heap's entries are still queued (the rest are deleted lazily)."""


class Dispatcher:
    """Matches ready tasks with free agents, the whole queue in memory: the `Dispatch` of one
    server (see the module docstring)."""

    def __init__(self, assign: AssignBatch, *, clock: Clock) -> None:
        self._assign = assign
        self._clock = clock.monotonic
        self._now = clock.now
        self._wait = clock.wait
        self._sleep = clock.sleep
        self._queues: dict[Requirements, _Queue] = {}
        self._ready: dict[str, tuple[int, tuple[object, ...]]] = {}
        """Each queued task's ready sequence and fields, as plain tuples: holding only strings
        and times, they leave the garbage collector's sight after its first look (a named tuple
        never does), and a deep queue stops weighing on every full collection (see `_push`)."""
        self._delayed: list[tuple[datetime, int, ReadyTask]] = []
        self._waiting: dict[str, int] = {}
        """Each task waiting for its retry time, and the sequence of its entry in `_delayed`
        (an entry of an earlier wait of the same task is passed over)."""
        self._sequence = itertools.count()
        self._agents: dict[str, _LiveAgent] = {}
        self._free = _FreeAgents()
        self._matched: dict[str, int] = {}
        """The ready sequence of each task matched (by the loop, or reserved by a write before
        its commit) whose assignment has not committed yet: it is not queued again meanwhile,
        and a task its agent could not take goes back to its place (`not_taken`)."""
        self._wake = asyncio.Event()
        self._pauses = Pauses()
        self._next_due: datetime | None = None
        """When the earliest task waiting for its retry time is due, as of the loop's pause."""

    # Tasks -----------------------------------------------------------------------------

    def enqueue(self, tasks: Iterable[ReadyTask]) -> None:
        """Tasks became ready, in this order (those with a future `not_before` once it passes).

        The loop is woken only if it has something to do: a task to retry later (its timer may
        have to fire sooner), or a task ready now while some agent is free. Without a free agent
        the next one to free up wakes it (`release`, `agent_online`, `agent_changed`). Under
        load a write's commit queues tasks that no agent is free for (those that are free were
        given tasks by the write itself, see `reserve_for_commit`), and waking the loop for
        nothing put a step of it ahead of the pushes the same commit released."""
        now = self._now()
        delayed = pushed = False
        for task in tasks:
            if self._known(task.task_id):
                continue
            if task.not_before is not None and task.not_before > now:
                sequence = next(self._sequence)
                self._waiting[task.task_id] = sequence
                heapq.heappush(self._delayed, (task.not_before, sequence, task))
                delayed = True
            else:
                self._push(next(self._sequence), task)
                pushed = True
        if delayed or (pushed and self._free):
            self._wake.set()

    def _known(self, task_id: str) -> bool:
        """Queued, waiting for its retry time, or reserved by a write not yet committed."""
        return task_id in self._ready or task_id in self._waiting or task_id in self._matched

    whole_queue = True
    """It holds every queued task (see `Dispatch.whole_queue`)."""

    def work_elsewhere(self, capabilities: Iterable[str] | None) -> None:
        """Nothing is elsewhere: it holds the whole queue."""

    def has_free_agent(self, capability: str, labels: tuple[tuple[str, str], ...]) -> bool:
        """Whether an available agent offers `capability` and carries `labels`: part of why a
        queued task waits. Walks the free agents of the capability until one carries them."""
        return any(
            all(live.profile.labels.get(key) == value for key, value in labels)
            for live in self._free.candidates(capability)
        )

    def dequeue(self, task_ids: Iterable[str]) -> None:
        """Tasks are no longer to be dispatched (skipped, cancelled)."""
        for task_id in task_ids:
            self._unready(task_id)
            self._waiting.pop(task_id, None)

    @property
    def queued(self) -> int:
        """How many tasks wait for an agent or for their retry time."""
        return len(self._ready) + len(self._waiting)

    def _release_due(self) -> datetime | None:
        """Move tasks whose retry time has come into the ready queues; return when the next one
        is due, None if none waits."""
        now = self._now()
        due: list[ReadyTask] = []
        next_due = None
        while self._delayed:
            not_before, sequence, task = self._delayed[0]
            if self._waiting.get(task.task_id) != sequence:
                heapq.heappop(self._delayed)
            elif not_before <= now:
                heapq.heappop(self._delayed)
                del self._waiting[task.task_id]
                self._push(next(self._sequence), task)
                due.append(task)
            else:
                next_due = not_before
                break
        if due:
            self._came_due(due)
        return next_due

    def _came_due(self, tasks: list[ReadyTask]) -> None:
        """These tasks' retry times came: they wait in the ready queues now (nothing more to
        do for a dispatch that holds the whole queue)."""

    def _push(self, sequence: int, task: ReadyTask) -> None:
        # Plain tuples (see `_ready`): a deep queue of ReadyTask objects kept the garbage
        # collector busy while it filled.
        self._unready(task.task_id)
        self._ready[task.task_id] = (sequence, tuple(task))
        queue = self._queues.setdefault(requirements(task), _Queue())
        queue.live += 1
        heapq.heappush(queue.heap, (sequence, task.task_id))

    def _unready(self, task_id: str) -> None:
        """The task is no longer queued (its heap entry stays, to be passed over)."""
        entry = self._ready.pop(task_id, None)
        if entry is not None:
            # The fields' capability, labels and pin, in `requirements`' order: its queue's key,
            # without a ReadyTask made for every task matched.
            self._queues[cast(Requirements, entry[1][_REQUIREMENTS])].live -= 1

    def _head(self, key: Requirements, queue: _Queue) -> tuple[int, ReadyTask] | None:
        while queue.heap:
            sequence, task_id = queue.heap[0]
            entry = self._ready.get(task_id)
            if entry is not None and entry[0] == sequence:
                return sequence, ReadyTask._make(entry[1])
            heapq.heappop(queue.heap)
        del self._queues[key]
        return None

    # Agents ------------------------------------------------------------------------------

    def agent_online(
        self, profile: AgentProfile, held: Iterable[str], *, backlogged: bool = False
    ) -> None:
        """An agent's stream opened; `held` are the tasks it holds as of that commit, and
        `backlogged` whether its stream is already over its bound (with those sent again)."""
        live = _LiveAgent(profile, set(held), self._clock(), backlogged)
        self._agents[profile.agent_id] = live
        self._free.update(live, waited_anew=True)
        self._wake_for(live)

    def agent_offline(self, agent_id: str) -> None:
        """An agent's stream closed: it takes no more tasks (it keeps those it holds)."""
        self._agents.pop(agent_id, None)
        self._free.remove(agent_id)

    def agent_changed(self, profile: AgentProfile) -> None:
        """A connected agent re-registered or reported a state: take its new profile."""
        live = self._agents.get(profile.agent_id)
        if live is None:
            return
        was_available = live.available
        live.profile = profile
        self._refile(live, was_available)
        self._wake_for(live)

    def agent_backlogged(self, agent_id: str, over: bool) -> None:
        """An agent's stream went over its bound (`over`) or drained below it: an agent whose
        stream is not draining is not idle, and takes no new work until it drains."""
        live = self._agents.get(agent_id)
        if live is None or live.backlogged == over:
            return
        was_available = live.available
        live.backlogged = over
        self._refile(live, was_available)
        self._wake_for(live)

    def holding(self, agent_id: str, task_ids: Iterable[str]) -> None:
        """The agent holds exactly `task_ids` as of a commit (see `Dispatch.holding`)."""
        live = self._agents.get(agent_id)
        if live is None:
            return
        kept = set(task_ids) | self._matched.keys()
        for task_id in live.held - kept:
            self.release(agent_id, task_id)

    def assigned(self, agent_id: str, task_id: str) -> None:
        """A committed assignment: the agent holds the task (idempotent)."""
        self._matched.pop(task_id, None)
        live = self._agents.get(agent_id)
        if live is not None:
            live.held.add(task_id)
            self._free.update(live, waited_anew=False)

    def release(self, agent_id: str, task_id: str) -> None:
        """The agent no longer holds the task: its slot is free (idempotent). The loop is woken
        only if the agent can take a task now: the write that recorded a result has usually
        given the agent its next task already (see `reserve_for_commit`)."""
        self._matched.pop(task_id, None)
        live = self._free_slot(agent_id, task_id)
        if live is not None:
            self._wake_for(live)

    def gone(self, agent_id: str, task: ReadyTask) -> None:
        """The task was not there to take: a server that owns its database alone is the only
        writer, so nothing of it waits any more."""
        self.release(agent_id, task.task_id)

    def not_taken(self, agent_id: str, task: ReadyTask) -> None:
        """The agent could not take the task it was matched with: its slot is free, and the task
        waits again, in its place in the queue."""
        self._free_slot(agent_id, task.task_id)
        sequence = self._matched.pop(task.task_id, None)
        if not self._known(task.task_id):
            self._push(next(self._sequence) if sequence is None else sequence, task)
        self._wake.set()

    def _wake_for(self, live: _LiveAgent) -> None:
        """Wake the loop for an agent that can take a task now, and only then: an agent busy
        or at its slots takes nothing, and the change that frees it wakes the loop itself."""
        if live.available:
            self._wake.set()

    def _free_slot(self, agent_id: str, task_id: str) -> _LiveAgent | None:
        live = self._agents.get(agent_id)
        if live is None or task_id not in live.held:
            return None
        was_available = live.available
        live.held.discard(task_id)
        self._refile(live, was_available)
        return live

    def _refile(self, live: _LiveAgent, was_available: bool) -> None:
        """File an agent again after a change; one that just became available starts waiting
        now (it goes to the back of the line)."""
        waited_anew = live.available and not was_available
        if waited_anew:
            live.waiting_since = self._clock()
        self._free.update(live, waited_anew=waited_anew)

    def reserve_for_commit(
        self, queued: Sequence[ReadyTask], released: Sequence[tuple[str, str]]
    ) -> tuple[list[tuple[ReadyTask, str]], Callable[[], None]]:
        """Match for a write not yet committed (see `Dispatch.reserve_for_commit`): its tasks
        are queued and its slots freed for the length of one `match`, which gives what matching
        would give right after its commit; then both are taken back, and only the matches are
        kept, as reservations (the tasks out of the queue, their agents holding them).
        """
        now = self._now()
        freed = [
            (live, task_id)
            for agent_id, task_id in released
            if (live := self._free_slot(agent_id, task_id)) is not None
        ]
        # Only what some free agent could take is queued for the match: a write that queues
        # work no free agent takes (a backlog) leaves nothing behind in the queues' heaps.
        takers: dict[Requirements, bool] = {}
        added: set[str] = set()
        for task in queued:
            if self._known(task.task_id) or (task.not_before is not None and task.not_before > now):
                continue
            key = requirements(task)
            taker = takers.get(key)
            if taker is None:
                taker = takers[key] = self._longest_waiting(task) is not None
            if taker:
                self._push(next(self._sequence), task)
                added.add(task.task_id)
        sequences: list[int] = []
        pairs = self.match(sequences)
        for task_id in added:
            self._unready(task_id)
        for live, task_id in freed:
            live.held.add(task_id)
            self._free.update(live, waited_anew=False)

        def undo() -> None:
            # Tasks the write itself queued are not queued if it does not commit.
            self._give_back(pairs, sequences, added)

        return pairs, undo

    def _give_back(
        self,
        pairs: Sequence[tuple[ReadyTask, str]],
        sequences: Sequence[int],
        not_queued: Iterable[str] = (),
    ) -> None:
        """Matches whose assignments were not committed: each agent's slot is freed and each
        task goes back to its place in its queue (its ready sequence), but for `not_queued`."""
        skipped = set(not_queued)
        for (task, agent_id), sequence in zip(pairs, sequences, strict=True):
            self._matched.pop(task.task_id, None)
            self._free_slot(agent_id, task.task_id)
            if task.task_id not in skipped:
                self._push(sequence, task)
        self._wake.set()

    # The loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Wake on events, match, commit the assignments; forever (cancel to stop). A batch
        that storage refuses is given back and tried again after a backoff."""
        backoff = Backoff()
        while True:
            self._next_due = self._release_due()
            self._pauses.pause()
            await self._wait(self._wake, self._next_due)
            self._pauses.resume()
            self._wake.clear()
            self._release_due()
            sequences: list[int] = []
            pairs = self.match(sequences)
            if not pairs:
                continue
            try:
                await self._assign(pairs)
            except StorageFault:
                self._give_back(pairs, sequences)
                await self._sleep(backoff.next_delay())
                continue
            backoff.reset()

    @property
    def idle(self) -> bool:
        """Whether the loop waits with nothing to do: no event since its last pass, no retry
        due, and every batch it took committed (and pushed). Writes that place tasks
        themselves (see `reserve_for_commit`) are the writer's, not the loop's."""
        due = self._next_due
        waiting = self._pauses.paused and not self._wake.is_set()
        return waiting and (due is None or due > self._now())

    async def until_idle(self) -> None:
        """Return at a moment the loop is `idle`."""
        while not self.idle:
            await self._pauses.next_pause()

    def match(self, sequences: list[int] | None = None) -> list[tuple[ReadyTask, str]]:
        """Take every task that can be placed now, earliest ready first, and reserve a slot of
        its agent. The reservations become holds when the assignments commit (`assigned`), or
        are given back (`release`) for tasks that were no longer queued. Each task's ready
        sequence goes to `sequences`, if given, for a batch that may have to be given back.
        """
        pairs: list[tuple[ReadyTask, str]] = []
        while True:
            best: tuple[int, ReadyTask, _LiveAgent] | None = None
            for key, queue in list(self._queues.items()):
                head = self._head(key, queue)
                if head is None or (best is not None and head[0] > best[0]):
                    continue
                agent = self._longest_waiting(head[1])
                if agent is not None:
                    best = (head[0], head[1], agent)
            if best is None:
                return pairs
            sequence, task, agent = best
            if sequences is not None:
                sequences.append(sequence)
            self._matched[task.task_id] = sequence
            self._unready(task.task_id)
            agent.held.add(task.task_id)
            agent.waiting_since = self._clock()
            self._free.update(agent, waited_anew=True)
            pairs.append((task, agent.profile.agent_id))

    def _longest_waiting(self, task: ReadyTask) -> _LiveAgent | None:
        if task.pinned_agent_id:
            pinned = self._agents.get(task.pinned_agent_id)
            candidates: Iterable[_LiveAgent] = () if pinned is None else (pinned,)
        else:
            candidates = self._free.candidates(task.capability)
        return next(
            (agent for agent in candidates if agent.available and task.accepts(agent.profile)),
            None,
        )
