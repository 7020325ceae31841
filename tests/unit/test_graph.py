"""The run graph's rules, without a server."""

from __future__ import annotations

from opscore.domain import graph
from opscore.domain.models import RunState, TaskState

DIAMOND = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}
Q, P, A, S = TaskState.QUEUED, TaskState.PENDING, TaskState.ASSIGNED, TaskState.SUCCEEDED


def test_roots_are_queued_and_the_rest_wait() -> None:
    assert graph.initial_states(DIAMOND) == {"a": Q, "b": P, "c": P, "d": P}


def test_success_queues_dependents_whose_dependencies_all_succeeded() -> None:
    after_a = graph.succeed(DIAMOND, {"a": A, "b": P, "c": P, "d": P}, "a")
    assert after_a.tasks == {"a": S, "b": Q, "c": Q}
    assert after_a.names_in(Q) == ["b", "c"]
    assert after_a.run_state is None
    after_b = graph.succeed(DIAMOND, {"a": S, "b": A, "c": A, "d": P}, "b")
    assert after_b.tasks == {"b": S}
    after_c = graph.succeed(DIAMOND, {"a": S, "b": S, "c": A, "d": P}, "c")
    assert after_c.tasks == {"c": S, "d": Q}


def test_the_last_success_finishes_the_run() -> None:
    done = graph.succeed(DIAMOND, {"a": S, "b": S, "c": S, "d": A}, "d")
    assert done.run_state is RunState.SUCCEEDED


def test_failure_skips_every_unfinished_task() -> None:
    failed = graph.fail({"a": S, "b": A, "c": A, "d": P}, "b")
    assert failed.tasks == {"b": TaskState.FAILED, "c": TaskState.SKIPPED, "d": TaskState.SKIPPED}
    assert failed.run_state is RunState.FAILED


def test_cancel_touches_only_unfinished_tasks() -> None:
    cancelled = graph.cancel({"a": S, "b": A, "c": Q, "d": P})
    assert cancelled.tasks == dict.fromkeys("bcd", TaskState.CANCELLED)
    assert cancelled.run_state is RunState.CANCELLED
