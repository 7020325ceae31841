"""The run graph's rules, without a server."""

from __future__ import annotations

from opscore.domain import graph
from opscore.domain.models import RunState, TaskSpec, TaskState

DIAMOND = {
    "a": TaskSpec("a"),
    "b": TaskSpec("b", depends_on=("a",)),
    "c": TaskSpec("c", depends_on=("a",)),
    "d": TaskSpec("d", depends_on=("b", "c")),
}
WITH_FALLBACK = {
    "main": TaskSpec("main", fallback="backup"),
    "backup": TaskSpec("backup"),
    "after": TaskSpec("after", depends_on=("main",)),
}
Q, P, A, S, F, K = (
    TaskState.QUEUED,
    TaskState.PENDING,
    TaskState.ASSIGNED,
    TaskState.SUCCEEDED,
    TaskState.FAILED,
    TaskState.SKIPPED,
)


def test_roots_are_queued_and_the_rest_wait() -> None:
    assert graph.initial_states(DIAMOND) == {"a": Q, "b": P, "c": P, "d": P}


def test_a_fallback_is_not_a_root() -> None:
    assert graph.initial_states(WITH_FALLBACK) == {"main": Q, "backup": P, "after": P}
    assert graph.fallbacks(WITH_FALLBACK) == {"backup": "main"}


def test_success_queues_dependents_whose_dependencies_all_succeeded() -> None:
    after_a = graph.succeed(DIAMOND, {"a": A, "b": P, "c": P, "d": P}, "a")
    assert after_a.tasks == {"a": S, "b": Q, "c": Q}
    assert after_a.run_state is None
    after_b = graph.succeed(DIAMOND, {"a": S, "b": A, "c": A, "d": P}, "b")
    assert after_b.tasks == {"b": S}
    after_c = graph.succeed(DIAMOND, {"a": S, "b": S, "c": A, "d": P}, "c")
    assert after_c.tasks == {"c": S, "d": Q}


def test_the_last_success_finishes_the_run() -> None:
    done = graph.succeed(DIAMOND, {"a": S, "b": S, "c": S, "d": A}, "d")
    assert done.run_state is RunState.SUCCEEDED


def test_failure_without_fallback_skips_every_unfinished_task() -> None:
    failed = graph.fail(DIAMOND, {"a": S, "b": A, "c": A, "d": P}, "b")
    assert failed.tasks == {"b": F, "c": K, "d": K}
    assert failed.run_state is RunState.FAILED


def test_a_failed_task_is_stood_in_for_by_its_fallback() -> None:
    failed = graph.fail(WITH_FALLBACK, {"main": A, "backup": P, "after": P}, "main")
    assert failed.tasks == {"main": F, "backup": Q}
    assert failed.run_state is None
    rescued = graph.succeed(WITH_FALLBACK, {"main": F, "backup": A, "after": P}, "backup")
    assert rescued.tasks == {"backup": S, "after": Q}
    assert graph.satisfied(WITH_FALLBACK, {"main": F, "backup": S, "after": P}, "main")
    done = graph.succeed(WITH_FALLBACK, {"main": F, "backup": S, "after": A}, "after")
    assert done.run_state is RunState.SUCCEEDED


def test_a_succeeding_task_skips_its_fallback() -> None:
    ok = graph.succeed(WITH_FALLBACK, {"main": A, "backup": P, "after": P}, "main")
    assert ok.tasks == {"main": S, "backup": K, "after": Q}


def test_a_failing_fallback_fails_the_run() -> None:
    failed = graph.fail(WITH_FALLBACK, {"main": F, "backup": A, "after": P}, "backup")
    assert failed.tasks == {"backup": F, "after": K}
    assert failed.run_state is RunState.FAILED


def test_cancel_touches_only_unfinished_tasks() -> None:
    cancelled = graph.cancel({"a": S, "b": A, "c": Q, "d": P})
    assert cancelled.tasks == dict.fromkeys("bcd", TaskState.CANCELLED)
    assert cancelled.run_state is RunState.CANCELLED
