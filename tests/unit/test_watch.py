"""`Watches` without a server: a watch opens with the next observation of its run, later
observations become changes for each watch of the run, in order; a watch over its capacity is
sent what differs from what it was sent, as of the latest observation; a run nobody watches any
more is forgotten."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from opscore.domain.models import RunState, TaskRun, TaskState, WorkflowRun
from opscore.domain.watch import CAPACITY, RunWatch, Watches

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def task(name: str, state: TaskState = TaskState.QUEUED, attempt: int = 0) -> TaskRun:
    return TaskRun(name, "r", name, 0, state, attempt, "", None, "", None, None, None, None)


def run(*tasks: TaskRun, state: RunState = RunState.RUNNING) -> WorkflowRun:
    return WorkflowRun("r", "", "w", "", state, {}, tasks, T0, None, None)


def opened(watches: Watches, watch: RunWatch, first: WorkflowRun) -> None:
    """Open `watch` with `first` as its run's next observation."""
    watches.opening(watch)
    assert watch.run_id in watches.run_ids()
    watches.observed({watch.run_id: first})
    assert watch.first.result() == first


async def test_each_observation_is_a_change_of_the_tasks_that_changed() -> None:
    watches, watch = Watches(), RunWatch("r")
    opened(watches, watch, run(task("a"), task("b")))
    assert watches.run_ids() == ["r"]
    watches.observed({"r": run(task("a", TaskState.ASSIGNED, 1), task("b"))})
    watches.observed({"r": run(task("a", TaskState.ASSIGNED, 1), task("b"))})  # no change
    watches.observed(
        {"r": run(task("a", TaskState.SUCCEEDED, 1), task("b"), state=RunState.SUCCEEDED)}
    )
    latest = watches.latest("r")
    first, changed = await watch.next(latest)
    assert (first.tasks, changed) == ((), (task("a", TaskState.ASSIGNED, 1),))
    second, changed = await watch.next(latest)
    assert second.state is RunState.SUCCEEDED
    assert changed == (task("a", TaskState.SUCCEEDED, 1),)


async def test_a_watch_over_its_capacity_is_sent_the_latest_state() -> None:
    watches, watch = Watches(), RunWatch("r")
    opened(watches, watch, run(task("a"), task("b")))
    for attempt in range(1, CAPACITY + 2):
        watches.observed({"r": run(task("a", TaskState.ASSIGNED, attempt), task("b"))})
    watches.observed({"r": run(task("a", TaskState.SUCCEEDED, CAPACITY + 1), task("b"))})
    at, changed = await watch.next(watches.latest("r"))
    assert changed == (task("a", TaskState.SUCCEEDED, CAPACITY + 1),)  # b never changed
    assert at.tasks == ()


async def test_a_run_nobody_watches_is_not_observed() -> None:
    watches, first, second = Watches(), RunWatch("r"), RunWatch("r")
    opened(watches, first, run(task("a")))
    opened(watches, second, run(task("a")))
    watches.remove(first)
    assert watches.run_ids() == ["r"]
    assert watches.due()
    watches.remove(second)
    assert watches.run_ids() == []
    assert not watches.due()
    watches.observed({"r": run(dataclasses.replace(task("a"), attempt=1))})  # ignored


async def test_runs_other_replicas_watch_are_told_when_they_change_until_final() -> None:
    watches, here = Watches(), RunWatch("mine")
    opened(watches, here, dataclasses.replace(run(task("a")), run_id="mine"))
    watches.watched_elsewhere(["r"], until=10.0)
    assert sorted(watches.run_ids()) == ["mine", "r"]
    assert watches.watching() == {"mine"}
    # Seen for the first time: what changed before is not known, so it is told.
    assert watches.observed({"r": run(task("a"))}) == {"r"}
    assert watches.observed({"r": run(task("a"))}) == set()
    assert watches.observed({"r": run(task("a", TaskState.ASSIGNED, 1))}) == {"r"}
    done = run(task("a", TaskState.SUCCEEDED, 1), state=RunState.SUCCEEDED)
    assert watches.observed({"r": done}) == {"r"}
    assert watches.run_ids() == ["mine"]  # final: nothing more to tell of it
    watches.watched_elsewhere(["s"], until=10.0)
    watches.expire(now=10.0)
    assert watches.run_ids() == ["mine"]


async def test_a_watch_opening_beside_another_takes_the_run_as_the_batch_left_it() -> None:
    """A batch that changed a watched run opens a new watch of it too: the open watch gets the
    change, the new one starts from it."""
    watches, old, new = Watches(), RunWatch("r"), RunWatch("r")
    opened(watches, old, run(task("a")))
    watches.opening(new)
    moved = run(task("a", TaskState.ASSIGNED, 1))
    watches.observed({"r": moved})
    assert new.first.result() == moved
    assert (await old.next(watches.latest("r")))[1] == (task("a", TaskState.ASSIGNED, 1),)


async def test_a_watch_closed_before_its_first_observation_stays_closed() -> None:
    watches, watch = Watches(), RunWatch("r")
    watches.opening(watch)
    watches.remove(watch)  # the call went away before a batch observed its run
    watches.observed({"r": run(task("a"))})
    assert watches.run_ids() == []
    assert not watch.first.done()
