"""The state machine without a database or an event loop: table-driven cases of each rule, and
properties of every run it can be driven through."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opscore.domain.errors import FailedPrecondition, ResultConflict
from opscore.domain.machine import AGENT_LOST, TIMED_OUT, StateMachine
from opscore.domain.models import (
    Cancellation,
    Hold,
    RetryPolicy,
    RunState,
    TaskSpec,
    TaskState,
)
from opscore.domain.retry import ResolvedRetryPolicy
from opscore.domain.state import (
    Decision,
    Move,
    QueuedTask,
    Reporting,
    RunNow,
    RunShape,
    Sibling,
    TaskMove,
    TaskNow,
    TaskShape,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
Q, P, A, S, F, K, C = (
    TaskState.QUEUED,
    TaskState.PENDING,
    TaskState.ASSIGNED,
    TaskState.SUCCEEDED,
    TaskState.FAILED,
    TaskState.SKIPPED,
    TaskState.CANCELLED,
)


def machine(max_attempts: int = 3) -> StateMachine:
    retry = ResolvedRetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=timedelta(seconds=2),
        backoff_multiplier=2.0,
        max_backoff=timedelta(seconds=60),
    )
    return StateMachine(retry, timedelta(minutes=5), random.Random(7))


def run_of(specs: list[TaskSpec], states: dict[str, tuple[TaskState, int, str]]) -> RunNow:
    """A run "r" of these specs, each task in (state, attempt, holder) as given, else as its
    run starts."""
    rules = machine()
    initial = rules.initial_states(specs)
    shape = RunShape.of(
        {
            spec.name: TaskShape(f"id-{spec.name}", spec.depends_on, spec.fallback, "", (), "")
            for spec in specs
        }
    )
    tasks = [
        TaskNow(f"id-{spec.name}", spec.name, *states.get(spec.name, (initial[spec.name], 0, "")))
        for spec in specs
    ]
    return RunNow.of("r", shape, tasks)


CHAIN = [TaskSpec("a"), TaskSpec("b", depends_on=("a",))]
WITH_FALLBACK = [
    TaskSpec("main", fallback="backup"),
    TaskSpec("backup"),
    TaskSpec("after", depends_on=("main",)),
]


def moves(decision: Decision) -> list[tuple[Move, str]]:
    return [(move.move, move.task_id.removeprefix("id-")) for move in decision.tasks]


# Each rule, case by case -------------------------------------------------------------------


def test_roots_start_queued_and_a_fallback_waits() -> None:
    assert machine().initial_states(WITH_FALLBACK) == {"main": Q, "backup": P, "after": P}


def test_success_queues_the_dependents_and_releases_the_slot() -> None:
    run = run_of(CHAIN, {"a": (A, 1, "w")})
    decision = machine().succeed(run, "a", {"x": 1})
    assert decision.tasks[0] == TaskMove(Move.SUCCEED, "id-a", {"x": 1})
    assert moves(decision) == [(Move.SUCCEED, "a"), (Move.QUEUE, "b")]
    assert [task.task_id for task in decision.effects.queued] == ["id-b"]
    assert decision.effects.released == [Hold("w", "id-a", "r", 1)]
    assert decision.runs == []
    assert run.states == {"a": S, "b": Q}


def test_the_last_success_finishes_the_run_and_skips_an_unneeded_fallback() -> None:
    run = run_of(WITH_FALLBACK, {"main": (S, 1, "w"), "after": (A, 1, "w")})
    assert machine().succeed(run, "after", {}).runs == [("r", RunState.SUCCEEDED)]
    run = run_of(WITH_FALLBACK, {"main": (A, 1, "w")})
    decision = machine().succeed(run, "main", {})
    assert moves(decision) == [(Move.SUCCEED, "main"), (Move.SKIP, "backup"), (Move.QUEUE, "after")]


@pytest.mark.parametrize(
    ("attempt", "retryable", "max_attempts", "retried"),
    [
        (1, True, 3, True),
        (2, True, 3, True),
        (3, True, 3, False),
        (1, False, 3, False),
        (1, True, 1, False),
    ],
)
def test_a_failure_is_retried_while_the_policy_allows(
    attempt: int, retryable: bool, max_attempts: int, retried: bool
) -> None:
    run = run_of(CHAIN, {"a": (A, attempt, "w")})
    policy = RetryPolicy(max_attempts=max_attempts)
    decision = machine().fail(run, "a", "boom", policy, NOW, retryable=retryable, reported=True)
    assert decision.effects.released == [Hold("w", "id-a", "r", attempt)]
    if retried:
        [move] = decision.tasks
        assert (move.move, move.error, move.reported) == (Move.RETRY, "boom", True)
        backoff = timedelta(seconds=2 * 2 ** (attempt - 1))
        assert move.not_before is not None
        assert NOW + backoff / 2 <= move.not_before <= NOW + backoff
        [queued] = decision.effects.queued
        assert queued.not_before == move.not_before
        assert run.states["a"] is Q
    else:
        assert moves(decision) == [(Move.FAIL, "a"), (Move.SKIP, "b")]
        assert decision.runs == [("r", RunState.FAILED)]
        assert decision.effects.finished_runs == [("r", RunState.FAILED)]


def test_a_final_failure_queues_the_fallback_instead_of_failing_the_run() -> None:
    run = run_of(WITH_FALLBACK, {"main": (A, 1, "w")})
    decision = machine().fail(run, "main", "boom", None, NOW, retryable=False, reported=True)
    assert moves(decision) == [(Move.FAIL, "main"), (Move.QUEUE, "backup")]
    assert decision.runs == []
    assert run.states == {"main": F, "backup": Q, "after": P}
    # The fallback's success stands in for its task: the dependents go on.
    run.tasks["backup"] = run.tasks["backup"]._replace(state=A, attempt=1, agent_id="v")
    run.states["backup"] = A
    assert moves(machine().succeed(run, "backup", {})) == [
        (Move.SUCCEED, "backup"),
        (Move.QUEUE, "after"),
    ]


def test_a_failing_run_stops_the_attempts_of_its_other_tasks() -> None:
    specs = [TaskSpec("a"), TaskSpec("b")]
    run = run_of(specs, {"a": (A, 1, "w"), "b": (A, 2, "v")})
    decision = machine().fail(run, "a", "boom", None, NOW, retryable=False, reported=True)
    assert decision.effects.cancelled == [Cancellation("v", "id-b", "r", 2, "run failed")]
    assert decision.effects.released == [Hold("v", "id-b", "r", 2), Hold("w", "id-a", "r", 1)]


@pytest.mark.parametrize(("event", "reason"), [("expire", TIMED_OUT), ("lose", AGENT_LOST)])
def test_an_attempt_that_ends_without_a_result_is_retried_and_its_holder_told(
    event: str, reason: str
) -> None:
    run = run_of(CHAIN, {"a": (A, 1, "w")})
    decision = getattr(machine(), event)(run, "a", None, NOW)
    [move] = decision.tasks
    assert (move.move, move.error, move.reported) == (Move.RETRY, reason, False)
    assert decision.effects.cancelled == [Cancellation("w", "id-a", "r", 1, reason)]


def test_cancelling_stops_every_unfinished_task() -> None:
    specs = [TaskSpec("a"), TaskSpec("b"), TaskSpec("c", depends_on=("a",))]
    run = run_of(specs, {"a": (S, 1, "w"), "b": (A, 1, "w")})
    decision = machine().cancel(run, RunState.RUNNING)
    assert moves(decision) == [(Move.CANCEL, "b"), (Move.CANCEL, "c")]
    assert decision.effects.cancelled == [Cancellation("w", "id-b", "r", 1, "run cancelled")]
    assert decision.runs == [("r", RunState.CANCELLED)]
    with pytest.raises(FailedPrecondition):
        machine().cancel(run, RunState.SUCCEEDED)


def test_deregistering_hands_back_attempts_and_fails_what_was_pinned() -> None:
    shape = RunShape.of(
        {
            "free": TaskShape("id-free", (), "", "", (), ""),
            "pinned": TaskShape("id-pinned", (), "spare", "", (), "w"),
            "spare": TaskShape("id-spare", (), "", "", (), "w"),
        }
    )
    run = RunNow.of(
        "r",
        shape,
        [
            TaskNow("id-free", "free", A, 1, "w"),
            TaskNow("id-pinned", "pinned", A, 1, "w"),
            TaskNow("id-spare", "spare", P, 0, ""),
        ],
    )
    decision = machine().deregister([run], "w", NOW)
    assert moves(decision) == [
        (Move.HAND_BACK, "free"),
        (Move.FAIL, "pinned"),
        (Move.QUEUE, "spare"),
        (Move.FAIL, "spare"),
        (Move.SKIP, "free"),
    ]
    assert decision.tasks[1].error == "pinned agent 'w' was deregistered"
    assert decision.runs == [("r", RunState.FAILED)]
    # What was queued and finished in the same write never reaches the dispatcher's queue.
    assert decision.effects.queued == []
    assert decision.effects.unqueued == []
    assert decision.effects.released == [
        Hold("w", "id-free", "r", 1),
        Hold("w", "id-pinned", "r", 1),
    ]


@pytest.mark.parametrize(
    ("state", "reporting", "error", "expected"),
    [
        (A, Reporting.OUTPUT, "", True),
        (S, Reporting.OUTPUT, "", False),
        (F, Reporting.OUTPUT, "", ResultConflict),
        (S, Reporting.FAILURE, "boom", ResultConflict),
        (F, Reporting.FAILURE, "boom", False),
        (F, Reporting.FAILURE, "other", ResultConflict),
        (A, Reporting.NOTHING, "", True),
        (S, Reporting.NOTHING, "", ResultConflict),
    ],
)
def test_only_the_holder_of_the_attempt_reports_once(
    state: TaskState, reporting: Reporting, error: str, expected: bool | type[Exception]
) -> None:
    task = TaskNow("t", "a", state, 2, "w", "boom", error_reported=True)
    if isinstance(expected, bool):
        assert machine().holds(task, "w", 2, reporting, error) is expected
    else:
        with pytest.raises(expected):
            machine().holds(task, "w", 2, reporting, error)
    with pytest.raises(FailedPrecondition):
        machine().holds(task._replace(state=A), "other", 2, reporting, error)
    with pytest.raises(FailedPrecondition):
        machine().holds(task._replace(state=A), "w", 1, reporting, error)


def test_an_assignment_gets_the_fallback_output_for_a_dependency_that_failed() -> None:
    task = QueuedTask("t", "r", "after", "", {"k": 1}, ("main",), 0, None, is_fallback=False)
    context = {
        "r": {
            "main": Sibling("main", F, "backup", None, "boom"),
            "backup": Sibling("backup", S, "", {"from": "backup"}, ""),
        }
    }
    assignment = machine().assignment(context, task, "w", NOW, redelivered=False)
    assert assignment.dependency_outputs == {"main": {"from": "backup"}}
    assert assignment.attempt == 1
    stand_in = QueuedTask("b", "r", "backup", "", {}, (), 0, None, is_fallback=True)
    for_fallback = machine().assignment(context, stand_in, "w", NOW, redelivered=False)
    assert (for_fallback.fallback_for, for_fallback.fallback_error) == ("main", "boom")


def test_the_lease_and_the_run_start() -> None:
    rules = machine()
    assert rules.lease_ends(None, NOW) == NOW + timedelta(minutes=5)
    assert rules.lease_ends(1500, NOW) == NOW + timedelta(seconds=1.5)
    root = QueuedTask("t", "r", "a", "", {}, (), 0, None, is_fallback=False)
    assert rules.starts_run(root)
    assert not rules.starts_run(root._replace(attempt=1))
    assert not rules.starts_run(root._replace(depends_on=("z",)))


def test_quarantine_takes_the_agents_at_the_threshold() -> None:
    due = machine().quarantined({"a": 2, "b": 3, "c": 4}, 3)
    assert sorted(due) == ["b", "c"]
    assert due["b"].startswith("quarantined: 3 task leases expired in a row")


# Properties of every run -------------------------------------------------------------------


@st.composite
def definitions(draw: st.DrawFn) -> list[TaskSpec]:
    """A valid task graph: each task depends on earlier ones; some have a fallback, a leaf."""
    count = draw(st.integers(1, 7))
    specs: list[TaskSpec] = []
    for index in range(count):
        name = f"t{index}"
        depends = (
            tuple(sorted(draw(st.sets(st.sampled_from([s.name for s in specs]))))) if specs else ()
        )
        specs.append(TaskSpec(name, depends_on=depends))
    for index in range(count):
        if draw(st.booleans()):
            backup = f"f{index}"
            specs[index] = TaskSpec(
                specs[index].name, depends_on=specs[index].depends_on, fallback=backup
            )
            specs.append(TaskSpec(backup))
    return specs


Event = tuple[str, int]
"""What happens next to a task the agents hold: ("ok" | "fail" | "retry" | "expire", choice)."""


@dataclass
class Trace:
    """What the properties look at while a run is driven."""

    queued_when: list[tuple[str, dict[str, TaskState]]] = field(default_factory=list)
    attempts: dict[str, list[int]] = field(default_factory=dict)
    outcome: list[RunState] = field(default_factory=list)
    """The run's final state, each time one was decided (once, or the rules are wrong)."""


def drive(specs: list[TaskSpec], events: list[Event], trace: Trace) -> RunNow:
    """Drive a run: assign every queued task, then apply each event to a held task, until the
    events run out or the run finishes; then finish what is left by success."""
    rules = machine()
    run = run_of(specs, {})

    def assign_queued() -> None:
        for name, state in run.states.items():
            if state is Q:
                trace.queued_when.append((name, dict(run.states)))
                before = run.tasks[name]
                run.tasks[name] = before._replace(state=A, attempt=before.attempt + 1, agent_id="w")
                run.states[name] = A
                trace.attempts.setdefault(name, []).append(before.attempt + 1)

    def apply(decision: Decision) -> None:
        trace.outcome.extend(state for _, state in decision.runs)

    assign_queued()
    for kind, choice in [*events, *[("ok", 0)] * (2 * len(specs) * 3)]:
        held = sorted(name for name, state in run.states.items() if state is A)
        if trace.outcome or not held:
            break
        name = held[choice % len(held)]
        if kind == "ok":
            apply(rules.succeed(run, name, {"by": name}))
        elif kind == "expire":
            apply(rules.expire(run, name, None, NOW))
        else:
            retryable = kind == "retry"
            apply(rules.fail(run, name, "boom", None, NOW, retryable=retryable, reported=True))
        assign_queued()
    return run


def satisfied(run: RunNow, name: str) -> bool:
    state = run.states[name]
    fallback = run.shape.tasks[name].fallback
    return state is S or (state is F and bool(fallback) and run.states[fallback] is S)


@settings(max_examples=300, deadline=None)
@given(
    definitions(),
    st.lists(st.tuples(st.sampled_from(["ok", "fail", "retry", "expire"]), st.integers(0, 9))),
)
def test_every_run_is_driven_to_a_final_state_by_the_rules(
    specs: list[TaskSpec], events: list[Event]
) -> None:
    trace = Trace()
    run = drive(specs, events, trace)
    # Every run reaches a final state: no task is left waiting or held.
    assert all(state.finished for state in run.states.values()), run.states
    # A task is queued only once its dependencies are satisfied; a fallback only after its
    # task finally failed.
    stands_in_for = run.shape.fallbacks
    for name, states in trace.queued_when:
        before = RunNow("r", run.shape, {}, states)
        assert all(satisfied(before, dependency) for dependency in run.shape.tasks[name].depends_on)
        if name in stands_in_for:
            assert states[stands_in_for[name]] is F
    # Attempts only grow, one at a time.
    for attempts in trace.attempts.values():
        assert attempts == list(range(1, len(attempts) + 1))


@settings(max_examples=200, deadline=None)
@given(definitions(), st.lists(st.sampled_from(["ok", "fail"]), max_size=20))
def test_a_run_succeeds_exactly_when_every_task_that_is_no_fallback_is_satisfied(
    specs: list[TaskSpec], kinds: list[str]
) -> None:
    trace = Trace()
    run = drive(specs, [(kind, 0) for kind in kinds], trace)
    primaries = [name for name in run.shape.tasks if name not in run.shape.fallbacks]
    [outcome] = trace.outcome
    assert (outcome is RunState.SUCCEEDED) == all(satisfied(run, name) for name in primaries)
    if outcome is RunState.FAILED:
        # What failed it had no fallback left to stand in for it.
        assert any(
            state is F
            and not satisfied(run, name)
            and run.states.get(run.shape.tasks[name].fallback or name) is not Q
            for name, state in run.states.items()
        )
