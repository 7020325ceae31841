"""Run watches: what each WatchWorkflowRun call has yet to send.

The writer observes every watched run at the end of each batch, inside its transaction, and the
observations arrive here in commit order (`Watches.observed`): the tasks that changed since the
run's previous observation go to each of its watches. A watch opens with an observation too: it
waits (`Watches.opening`) until the end of the next batch, whose reading of its run is its first
response, so no commit falls between its first read and the observations that follow.

Each watch keeps at most `CAPACITY` changes. A watcher that reads slower than its run changes
fills it; the changes are then dropped, and its next read is every task that differs from what
it was last sent, as the run is now: the latest state instead of each change, and a server whose
memory does not grow with a slow reader.

Among replicas, a replica tells the others which unfinished runs its watchers watch (a
notice's `watching`, said again every `ANNOUNCE_EVERY`). They observe those runs too, at the end
of their own batches, and tell it when one of their commits changed one (`changed_runs`); it
then runs a batch whose observation reads the run as they left it, for its watchers. Notices may
be lost, so a replica with peers also runs a batch at least every `REREAD_EVERY` while a
watched run is unfinished (`Watches.due`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import timedelta

from opscore.domain.models import TaskRun, WorkflowRun

CAPACITY = 64
"""Changes one watch keeps before it falls back to the run's latest state."""

REREAD_EVERY = timedelta(milliseconds=500)
"""How often a replica with peers observes its watched runs when its writer is otherwise idle."""

ANNOUNCE_EVERY = timedelta(seconds=10)
"""How often a replica tells the others again which runs its watchers watch."""

WATCHED_FOR = 3 * ANNOUNCE_EVERY
"""How long a replica observes a run another replica said it watches, unless said again."""

Change = tuple[WorkflowRun, tuple[TaskRun, ...]]
"""A run's own fields (without its tasks) and the tasks that changed, as they are now."""


class RunWatch:
    """One call's watch of one run (see the module docstring)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._changes: deque[Change] = deque()
        self._behind = False
        self._wake = asyncio.Event()
        self._sent: dict[str, TaskRun] = {}
        self.first: asyncio.Future[WorkflowRun] = asyncio.get_running_loop().create_future()
        """The run as the watch's first response carries it, once observed."""

    def started(self, run: WorkflowRun) -> None:
        """Its first observation: `run`, as its first response carries it."""
        self._sent = {task.task_id: task for task in run.tasks}
        if not self.first.done():
            self.first.set_result(run)

    def put(self, change: Change) -> None:
        """A change of the run, to send (or, once over `CAPACITY`, to send as of later)."""
        if self._behind:
            return
        if len(self._changes) >= CAPACITY:
            self._changes.clear()
            self._behind = True
        else:
            self._changes.append(change)
        self._wake.set()

    async def next(self, latest: WorkflowRun) -> Change:
        """The next change to send; once behind, what differs from what was sent, as of
        `latest` (the run's last observation)."""
        while not (self._changes or self._behind):
            self._wake.clear()
            await self._wake.wait()
        if self._behind:
            self._behind = False
            change = _basic(latest), _differing(latest.tasks, self._sent)
        else:
            change = self._changes.popleft()
        self._sent.update((task.task_id, task) for task in change[1])
        return change


class Watches:
    """Every open watch of this server, and the last observation of each watched run."""

    def __init__(self) -> None:
        self._watches: dict[str, set[RunWatch]] = {}
        self._latest: dict[str, WorkflowRun] = {}
        self._elsewhere: dict[str, float] = {}
        """Runs other replicas watch, and until when (monotonic seconds) to observe them."""
        self._seen_elsewhere: dict[str, WorkflowRun] = {}
        self._opening: dict[str, set[RunWatch]] = {}
        """Watches waiting for their first observation."""

    def run_ids(self) -> list[str]:
        """The runs to observe at the end of each batch (none most of the time)."""
        if not (self._watches or self._opening or self._elsewhere):
            return []
        return list(
            {
                **dict.fromkeys(self._watches),
                **dict.fromkeys(self._opening),
                **dict.fromkeys(self._elsewhere),
            }
        )

    def due(self) -> bool:
        """Whether an unfinished run is watched here (so another replica may change it)."""
        return any(not run.state.finished for run in self._latest.values())

    def watching(self) -> set[str]:
        """The unfinished runs watched here, to tell the other replicas."""
        return {run_id for run_id, run in self._latest.items() if not run.state.finished}

    def watched_elsewhere(self, run_ids: Iterable[str], until: float) -> None:
        """Another replica watches these runs: observe them until `until` (monotonic)."""
        for run_id in run_ids:
            self._elsewhere[run_id] = until

    def expire(self, now: float) -> None:
        """Stop observing the runs other replicas no longer said they watch."""
        for run_id in [run_id for run_id, until in self._elsewhere.items() if until <= now]:
            del self._elsewhere[run_id]
            self._seen_elsewhere.pop(run_id, None)

    def opening(self, watch: RunWatch) -> None:
        """Open `watch` at the end of the next batch: that batch's observation of its run is
        its first response (`RunWatch.first`)."""
        self._opening.setdefault(watch.run_id, set()).add(watch)

    def remove(self, watch: RunWatch) -> None:
        """Close `watch` (its call ended): a run nobody watches any more is not observed."""
        for watches, latest in ((self._opening, None), (self._watches, self._latest)):
            found = watches.get(watch.run_id)
            if found is None or watch not in found:
                continue
            found.discard(watch)
            if not found:
                del watches[watch.run_id]
                if latest is not None:
                    del latest[watch.run_id]

    def known(self, run_id: str) -> Mapping[str, TaskRun]:
        """The tasks of a run as last observed, by id (none for a run not observed yet)."""
        run = self._latest.get(run_id) or self._seen_elsewhere.get(run_id)
        return {} if run is None else {task.task_id: task for task in run.tasks}

    def latest(self, run_id: str) -> WorkflowRun:
        """The run as last observed (a watched one)."""
        return self._latest[run_id]

    def observed(self, runs: Mapping[str, WorkflowRun]) -> set[str]:
        """Watched runs as a batch left them, in commit order: each change goes to the run's
        watches. Returns the runs only other replicas watch that changed (or were seen for the
        first time, when what changed before is not known), to tell them."""
        elsewhere: set[str] = set()
        for run_id, run in runs.items():
            if run_id in self._elsewhere and self._seen_elsewhere.get(run_id) != run:
                elsewhere.add(run_id)
                self._seen_elsewhere[run_id] = run
                if run.state.finished:  # nothing more to tell of it
                    del self._elsewhere[run_id], self._seen_elsewhere[run_id]
            before = self._latest.get(run_id)
            if before is None:
                continue  # its last watch here closed meanwhile
            changed = _differing(run.tasks, {task.task_id: task for task in before.tasks})
            basic = _basic(run)
            if not changed and basic == _basic(before):
                continue
            self._latest[run_id] = run
            for watch in self._watches[run_id]:
                watch.put((basic, changed))
        for run_id in [run_id for run_id in self._opening if run_id in runs]:
            run = runs[run_id]
            self._latest[run_id] = run
            for watch in self._opening.pop(run_id):
                self._watches.setdefault(run_id, set()).add(watch)
                watch.started(run)
        return elsewhere


def _basic(run: WorkflowRun) -> WorkflowRun:
    return dataclasses.replace(run, tasks=(), next_task_page_token="")


def _differing(tasks: Iterable[TaskRun], known: Mapping[str, TaskRun]) -> tuple[TaskRun, ...]:
    return tuple(task for task in tasks if known.get(task.task_id) != task)
