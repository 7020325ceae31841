"""The seam between the engine and dispatch: what the engine tells, and asks of, the part of the
server that gives ready tasks to free agents.

The engine depends on `Dispatch` alone, and builds it through the `DispatchFactory` the server
chooses, so dispatch can be implemented again without touching the engine or the state machine.
Whatever the implementation, the database is the source of truth: what dispatch holds in memory
is rebuilt from it at start, and changed only by what committed writes tell it.

How it is called, by every implementation's contract:

- On the event loop, one call at a time: an implementation needs no lock.
- The events (`enqueue`, `dequeue`, `assigned`, `release`, `not_taken`, the `agent_*` methods)
  only from the callbacks of committed writes, in commit order (and `enqueue` at start, with
  the stored queue), so memory never runs ahead of the database. Each is idempotent: the same
  fact told twice changes nothing, and a fact about an unknown task or agent is ignored.
- `reserve_for_commit` only from inside a write's transaction, just before it commits.
- `run` once, by the server, as a supervised task.

Two implementations fill it:

- `dispatcher.Dispatcher`, for one server: every queued task and every connected agent in
  memory, the queue read whole from the database at start; a write places what it makes ready
  before it commits, and the loop takes the rest as agents free up.
- `shared_dispatcher.SharedDispatcher`, for replicas on one PostgreSQL, fills each part thus:
  - `reserve_for_commit` stays local: a write matches the tasks it makes ready with this
    replica's idle agents and assigns them in its own transaction. No other replica can see those
    tasks before the commit, so nothing races the reservation. An older queued task reserved for
    a slot the write frees may have been claimed elsewhere meanwhile: its assignment (an update
    conditional on the task being queued) finds it gone, and the commit's callback frees the
    slot (`release`), as it does today for a task cancelled meanwhile.
  - What no local agent took is announced once the write has committed (`notices`). Every
    replica LISTENs, and its `run` claims for its idle agents with `SELECT ... FOR UPDATE SKIP
    LOCKED` on the index of queued tasks by capability, in ready order, matching and assigning
    in the same write (the engine's `claim`), so each attempt has one holder however many
    replicas race for it. A sweep (seconds) backs up lost notices (`work_elsewhere`). A slot
    freed on one replica claims the same way.
  - Memory is a bounded prefetch per requirement of this replica's agents, refilled from the
    database's index: `enqueue` keeps what fits (the stored queue handed over at start is cut to
    it) and the rest stays claimable in the database. `queued` counts that prefetch.
  - A retry's backoff is its task's `not_before` column: claims skip tasks not yet due, and
    `run` wakes at the earliest due time it knows of, so whichever replica claims the task first
    handles the end of its backoff, once.
  - The agent events concern this replica's own streams, and `has_free_agent` answers for them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from opscore.domain.clock import Clock
from opscore.domain.models import AgentProfile, ReadyTask

AssignBatch = Callable[[list[tuple[ReadyTask, str]]], Awaitable[None]]
"""Commits a batch of (task, agent id) pairs; their effects come back through `assigned`, or
`release` for a task that was no longer queued."""


class Dispatch(Protocol):
    """What the engine needs of dispatch (see the module docstring for how it is called)."""

    # Tasks ---------------------------------------------------------------------------------

    def enqueue(self, tasks: Iterable[ReadyTask]) -> None:
        """Tasks became ready, in this order: queued by a committed write, or the queue as
        stored, in ready order, at start and after a storage outage. A task already queued,
        waiting for its retry time, or reserved (`reserve_for_commit`) is passed over. A task
        whose `not_before` is in the future is dispatched once it passes, never before; the
        others in the order they became ready."""

    def dequeue(self, task_ids: Iterable[str]) -> None:
        """Tasks are no longer to be dispatched (skipped, cancelled), whether queued or waiting
        for their retry time."""

    @property
    def queued(self) -> int:
        """How many tasks this dispatch holds waiting for an agent or for their retry time
        (reserved ones not included)."""

    @property
    def whole_queue(self) -> bool:
        """Whether it holds every queued task: then it is handed the stored queue at start and
        after a storage outage (`enqueue`). If not, it claims from the database itself."""

    def work_elsewhere(self, capabilities: Iterable[str] | None) -> None:
        """The database may hold queued work of these capabilities (None: of any) that this
        dispatch does not hold (another replica announced it, or announcements may have been
        lost): it is claimed as soon as a free agent could take it. Nothing to do for a
        dispatch that holds the whole queue."""

    def has_free_agent(self, capability: str, labels: tuple[tuple[str, str], ...]) -> bool:
        """Whether a free agent offers `capability` ("" for any) and carries `labels`: part of
        why a queued task waits (`waiting`). Advice for a reader, read at any time."""

    # Agents and their slots -------------------------------------------------------------

    def agent_online(
        self, profile: AgentProfile, held: Iterable[str], *, backlogged: bool = False
    ) -> None:
        """An agent's stream opened: `held` are the tasks it holds as of that commit, and
        `backlogged` whether its stream is already over its bound. It takes work from now, if its
        state and slots allow, behind the free agents that have waited longer."""

    def agent_offline(self, agent_id: str) -> None:
        """An agent's stream closed, or it was deregistered: it takes no more tasks. The tasks
        it holds are released by the writes that end them, not here."""

    def agent_changed(self, profile: AgentProfile) -> None:
        """A connected agent's profile changed (registered again, reported a state, was
        quarantined); an agent that is not connected is ignored."""

    def agent_backlogged(self, agent_id: str, over: bool) -> None:
        """An agent's stream went over its bound (`over`) or drained below it: an agent whose
        stream is not draining takes no new work until it drains."""

    def holding(self, agent_id: str, task_ids: Iterable[str]) -> None:
        """As of a commit, the agent holds exactly `task_ids`: a slot taken by any other task
        (not reserved by a write or a batch yet to commit) is freed. Another replica's word that
        it ended a hold may have been lost; this is how a replica finds out."""

    def assigned(self, agent_id: str, task_id: str) -> None:
        """An assignment committed: the agent holds the task, which is no longer reserved."""

    def release(self, agent_id: str, task_id: str) -> None:
        """The agent no longer holds the task (its result recorded, its lease expired, its task
        cancelled or lost): the slot is free, and the task no longer reserved."""

    def gone(self, agent_id: str, task: ReadyTask) -> None:
        """An assignment of `task` to the agent it was matched with was not written because the
        task was not there to take (`Unassigned.TASK_GONE`): the slot is free, and the task is
        no longer reserved here. Among replicas it may still be queued, held a moment by
        another replica's write that does not assign it, so a replica claims it back."""

    def not_taken(self, agent_id: str, task: ReadyTask) -> None:
        """An assignment of `task` to the agent it was matched with was not written because the
        agent could no longer take it (it left, or reported BUSY or ERROR, in the same
        transaction): the slot is free, and the task, still queued, waits again in its place."""

    # Before a write commits ----------------------------------------------------------------

    def reserve_for_commit(
        self, queued: Sequence[ReadyTask], released: Sequence[tuple[str, str]]
    ) -> tuple[list[tuple[ReadyTask, str]], Callable[[], None]]:
        """Match for a write that has not committed yet, as if it had: as if it had queued
        `queued` (in ready order) and freed the slots `released` ((agent id, task id) pairs).
        Returns the (task, agent id) pairs that matching would give right after its commit, for
        the write to assign in its own transaction, and the undo of their reservation.

        Nothing of the write is applied here: its tasks are queued and its slots freed only when
        its commit's callbacks say so (`enqueue`, `release`). Only the matches are kept, as
        reservations: a reserved task is not matched again (the write's own `enqueue` of it is
        passed over) and its agent's slot is taken. Then exactly one of two things happens: the
        write commits and its callbacks settle each pair (`assigned`, or `release` where the
        task was no longer queued), or it does not, and `undo` is called once: every reserved
        task goes back to its place in the ready order, and every reserved slot is freed."""

    # The loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Match what can be matched whenever an event or a retry's time makes it possible, and
        commit the matches through the `AssignBatch` this dispatch was built with; until
        cancelled. Nothing polls. A batch that storage refuses is given back (its tasks to their
        places, its slots freed) and tried again after a backoff."""

    @property
    def idle(self) -> bool:
        """Whether `run` waits with nothing to do: no event since its last pass, no retry time
        come, and every batch it took committed (its assignments pushed)."""

    async def until_idle(self) -> None:
        """Return at a moment dispatch is `idle` (what a test, or a drain, waits for before it
        looks at what was sent)."""


class DispatchFactory(Protocol):
    """Builds the engine's dispatch (a class whose constructor takes these, such as
    `dispatcher.Dispatcher`, is one)."""

    def __call__(self, assign: AssignBatch, *, clock: Clock) -> Dispatch:
        """A dispatch that commits its batches through `assign` and takes its time from `clock`:
        waiting agents ordered by its monotonic readings, retry times read against its wall
        clock, and its loop's waits. The server closes over whatever else an implementation
        needs (a database to listen on)."""
