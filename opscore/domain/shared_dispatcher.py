"""Dispatch for replicas sharing one PostgreSQL: the `Dispatch` of a replica (see `dispatch` for
the seam and its contract).

It is the single-server `Dispatcher` in what it holds of this replica's own agents and in how it
matches, with three differences:

- **A bounded prefetch.** Of the tasks this replica's writes make ready, it keeps at most
  `prefetch` a requirement in memory; the rest stay in the database, where any replica claims
  them. A replica's memory grows with its agents, not with the backlog.
- **Claims.** When an agent of its own is free and the database may hold work it could take (a
  notice from another replica said so, its prefetch overflowed, it started, or notices may have
  been lost), it claims: one write that locks the earliest queued tasks of the free agents'
  capabilities with `FOR UPDATE SKIP LOCKED`, matches them as a write's own tasks are matched,
  and assigns them in the same transaction. Replicas claiming at once skip each other's rows, so
  each attempt has one holder; the assignment itself is conditional on the task being queued, so
  a task another replica took meanwhile comes back as gone.
- **Announcements.** Tasks that none of its free agents took are announced to the other
  replicas (`announce`), whose free agents claim them; a sweep (`sweep` seconds) claims as if
  every capability had been announced, in case a notice was lost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta

from opscore.domain.clock import Clock
from opscore.domain.dispatch import AssignBatch
from opscore.domain.dispatcher import Dispatcher, Requirements, requirements
from opscore.domain.errors import StorageFault
from opscore.domain.health import Backoff
from opscore.domain.models import ReadyTask
from opscore.domain.ports import Claimed, Want

PREFETCH = 1_000
"""Tasks of one requirement a replica keeps in memory, by default."""

SWEEP = timedelta(seconds=5)
"""How often a replica with a free agent claims whatever it can take, notices or not."""

Claim = Callable[[list[Want]], Awaitable[Claimed]]
"""Claims for these wants in one write (see the module docstring)."""


class SharedDispatcher(Dispatcher):
    """The `Dispatch` of a replica (see the module docstring)."""

    whole_queue = False

    def __init__(
        self,
        assign: AssignBatch,
        *,
        clock: Clock,
        claim: Claim,
        announce: Callable[[set[str]], None],
        prefetch: int = PREFETCH,
        sweep: timedelta = SWEEP,
    ) -> None:
        super().__init__(assign, clock=clock)
        self._claim = claim
        self._announce = announce
        self._prefetch = prefetch
        self._sweep = sweep
        self._swept = clock.now()
        self._wanted: set[str] = set()
        """Capabilities the database may hold claimable work of."""
        self._everything = True
        """Whether it may hold work of any capability (at start, at each sweep, after notices
        may have been missed)."""

    def enqueue(self, tasks: Iterable[ReadyTask]) -> None:
        """As `Dispatcher.enqueue`, keeping at most `prefetch` tasks a requirement, and
        announcing the capabilities of what it queues (none of its free agents took it): now
        for the tasks due now, when their retry time comes for the others (`_came_due`), since
        claims skip tasks not yet due."""
        kept: list[ReadyTask] = []
        sizes: dict[Requirements, int] = {}
        announced: set[str] = set()
        now = self._now()
        for task in tasks:
            if task.task_id in self._matched:
                continue
            # A committed write queued it: one held in memory is stale (another replica took
            # it since, and this is its next attempt).
            self.dequeue((task.task_id,))
            if task.not_before is None or task.not_before <= now:
                announced.add(task.capability)
            key = requirements(task)
            size = sizes.get(key)
            if size is None:
                queue = self._queues.get(key)
                size = 0 if queue is None else queue.live
            if size >= self._prefetch:
                self._wanted.add(task.capability)
                continue
            sizes[key] = size + 1
            kept.append(task)
        super().enqueue(kept)
        if announced:
            self._announce(announced)

    def _came_due(self, tasks: list[ReadyTask]) -> None:
        """Retries whose backoff ended here: another replica's free agent may take them."""
        self._announce({task.capability for task in tasks})

    def work_elsewhere(self, capabilities: Iterable[str] | None) -> None:
        """The database may hold work of these capabilities (None: of any) that this replica
        does not: claim it as soon as an agent of these capabilities is free."""
        if capabilities is None:
            self._everything = True
        else:
            self._wanted.update(capabilities)
        if self._free:
            self._wake.set()

    def gone(self, agent_id: str, task: ReadyTask) -> None:
        """As `Dispatcher.gone`; the task may still be queued (another replica's write held it
        without assigning it): the next free agent of its capability claims it if so."""
        self.release(agent_id, task.task_id)
        self.work_elsewhere((task.capability,))

    def _keep(self, tasks: Sequence[ReadyTask]) -> None:
        """Tasks a claim locked but did not assign: kept, not announced (they were)."""
        Dispatcher.enqueue(self, tasks)

    def _wants(self, ahead: bool) -> list[Want]:
        """What to claim for the free agents: per capability wanted, the label sets of the free
        agents offering it, the agents themselves (for tasks pinned to them), and how many: the
        free slots and two more (for tasks whose labels fit none of them). Locking more would
        keep, in this replica's memory, tasks the announcer keeps in its own, and both would
        try to assign them. `ahead`: retries not yet due too (see `Want.ahead`)."""
        wants: dict[str, tuple[list[dict[str, str]], list[str], int]] = {}
        for live in self._agents.values():
            if not live.available:
                continue
            slots = live.profile.max_concurrent_tasks - len(live.held)
            for capability in (*live.profile.capabilities, ""):
                if not (self._everything or capability in self._wanted):
                    continue
                labels, agents, wanted = wants.get(capability, ([], [], 0))
                if live.profile.labels not in labels:
                    labels.append(live.profile.labels)
                agents.append(live.profile.agent_id)
                wants[capability] = (labels, agents, wanted + slots)
        return [
            Want(capability, tuple(labels), tuple(agents), min(self._prefetch, wanted + 2), ahead)
            for capability, (labels, agents, wanted) in sorted(wants.items())
        ]

    async def run(self) -> None:
        """As `Dispatcher.run`, and claim from the database what memory does not hold."""
        backoff = Backoff()
        while True:
            self._next_due = self._release_due()
            self._pauses.pause()
            await self._wait(self._wake, self._wait_until())
            self._pauses.resume()
            self._wake.clear()
            if self._now() >= self._swept + self._sweep:
                self._swept = self._now()
                self._everything = True
            self._release_due()
            sequences: list[int] = []
            pairs = self.match(sequences)
            try:
                if pairs:
                    await self._assign(pairs)
                await self._claim_wanted()
            except StorageFault:
                if pairs:
                    self._give_back(pairs, sequences)
                await self._sleep(backoff.next_delay())
                self._wake.set()
                continue
            backoff.reset()

    def _wait_until(self) -> datetime | None:
        """When the loop's wait ends: at the next retry time, or the next sweep while an agent
        of this replica is free (with none free, the one that frees up wakes the loop)."""
        if not self._free:
            return self._next_due
        sweep = self._swept + self._sweep
        return sweep if self._next_due is None else min(sweep, self._next_due)

    async def _claim_wanted(self) -> None:
        # A claim of everything (at start, at a sweep, after missed notices) looks ahead too:
        # retries queued by a replica that is gone, or by this one before it restarted, are
        # announced by nobody when they come due.
        wants = self._wants(ahead=self._everything)
        if not wants:
            return
        # Taken out before the claim: a notice that comes while it runs wants them again.
        everything, self._everything = self._everything, False
        claiming = {want.capability for want in wants}
        self._wanted -= claiming
        try:
            claimed = await self._claim(wants)
        except StorageFault:
            self._everything |= everything
            self._wanted |= claiming
            raise
        self._keep(claimed.unassigned)
        for want in wants:
            # A claim that found as many as it asked for leaves more behind: claim again, as
            # long as claims keep assigning (so a head of tasks no agent here fits ends it).
            if claimed.assigned and claimed.found.get(want.capability, 0) >= want.limit:
                self._wanted.add(want.capability)
        if self._wanted:
            self._wake.set()
