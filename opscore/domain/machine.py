"""The run and task state machine: every rule of how tasks and runs move, in one place.

Each method takes plain values (a `state.RunNow`, a result, the time) and returns the
`state.Decision` its event makes: which rows change and how, and what the commit means for the
dispatcher and the agents. Nothing here reads or writes storage; the store reads what a method
needs, calls it, and writes what it decided, set-based, inside one transaction.

The rules:
- A succeeded task satisfies its dependents; a waiting task is queued once all its dependencies
  are satisfied (`graph.succeed`). The run succeeds when every task that is no fallback is.
- A failed attempt is retried, after a backoff (`retry`), while the agent said it may be and
  attempts remain; otherwise the task fails finally: its fallback is queued to stand in for it,
  or the run fails and its unfinished tasks are skipped (`graph.fail`).
- A fallback's output stands in for its failed task's in the dependents' assignments.
- An expired lease, or an agent lost after its grace period, fails the attempt as retryable,
  and the agent is told to stop. Leases expiring in a row quarantine an agent.
- A deregistered agent's attempts go back to the queue, except the tasks pinned to it, which
  no other agent may run: those fail finally.
- A run starts with its first assignment; it is cancelled only while unfinished.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from opscore.domain import graph
from opscore.domain.errors import FailedPrecondition, ResultConflict
from opscore.domain.models import (
    Assignment,
    Cancellation,
    Hold,
    JsonObject,
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
    Siblings,
    TaskMove,
    TaskNow,
)
from opscore.domain.waiting import DEREGISTERED

TIMED_OUT = "timed out"
"""The error of an attempt whose lease ended."""
AGENT_LOST = "agent lost"
"""The error of an attempt whose agent did not come back within its grace period."""

_FINISHING = {
    TaskState.FAILED: Move.FAIL,
    TaskState.SKIPPED: Move.SKIP,
    TaskState.CANCELLED: Move.CANCEL,
}
_STOP_REASONS = {RunState.CANCELLED: "run cancelled", RunState.FAILED: "run failed"}
_WAITING = (TaskState.QUEUED, TaskState.ASSIGNED)


class StateMachine:
    """The rules (see the module docstring), with the server's defaults for what a task's spec
    leaves unset: its retry policy and its timeout."""

    def __init__(
        self,
        retry: ResolvedRetryPolicy,
        default_timeout: timedelta,
        rng: random.Random | None = None,
    ) -> None:
        self._retry = retry
        self._default_timeout = default_timeout
        self._rng = rng or random.Random()

    # Starting --------------------------------------------------------------------------

    @staticmethod
    def initial_states(specs: Sequence[TaskSpec]) -> dict[str, TaskState]:
        """Each task's state, by name, as its run is triggered: roots queued, the rest pending."""
        return graph.initial_states({spec.name: spec for spec in specs})

    def lease_ends(self, timeout_ms: int | None, now: datetime) -> datetime:
        """When an attempt assigned at `now` must be done: its task's timeout, or the default."""
        timeout = (
            self._default_timeout if timeout_ms is None else timedelta(milliseconds=timeout_ms)
        )
        return now + timeout

    @staticmethod
    def starts_run(task: QueuedTask) -> bool:
        """Whether assigning `task` may be its run's first assignment: only a root's first
        attempt can be (any other task waited for one that was assigned)."""
        return not task.depends_on and not task.attempt

    @staticmethod
    def assignment(
        context: Siblings,
        task: QueuedTask,
        agent_id: str,
        deadline: datetime,
        *,
        redelivered: bool,
    ) -> Assignment:
        """The message of `task`'s next attempt, or of its current one when `redelivered`: its
        input, the outputs of its dependencies (one that failed and was stood in for gives its
        fallback's output, under its own name), and, for a fallback, the task it stands in for
        and that task's last error. `context` holds the siblings these refer to."""
        siblings = context.get(task.run_id, {})
        outputs: dict[str, JsonObject] = {}
        for name in task.depends_on:
            dependency = siblings[name]
            source = (
                siblings[dependency.fallback]
                if dependency.state is TaskState.FAILED and dependency.fallback
                else dependency
            )
            outputs[name] = source.output or {}
        primary = next((other for other in siblings.values() if other.fallback == task.name), None)
        return Assignment(
            task_id=task.task_id,
            run_id=task.run_id,
            task_name=task.name,
            capability=task.capability,
            attempt=task.attempt if redelivered else task.attempt + 1,
            agent_id=agent_id,
            input=dict(task.input),
            dependency_outputs=outputs,
            deadline=deadline,
            redelivered=redelivered,
            fallback_for=primary.name if primary is not None else "",
            fallback_error=primary.error if primary is not None else "",
        )

    # Results ---------------------------------------------------------------------------

    @staticmethod
    def holds(
        task: TaskNow, agent_id: str, attempt: int, reporting: Reporting, error: str = ""
    ) -> bool:
        """Whether `agent_id` holds `attempt` of `task`, so what it is `reporting` (a failure
        with `error`) is to be recorded. False when that holder's same report was recorded
        already (a retried call: nothing to do); RESULT_CONFLICT when it recorded another;
        FAILED_PRECONDITION for any other holder, attempt or state."""
        holder = task.agent_id == agent_id and task.attempt == attempt
        recorded = (
            task.state is TaskState.SUCCEEDED
            if reporting is Reporting.OUTPUT
            else reporting is Reporting.FAILURE and failed_as_reported(task) and task.error == error
        )
        if holder and task.state is TaskState.ASSIGNED:
            return True
        if holder and recorded:
            return False
        if holder and task.state is TaskState.SUCCEEDED:
            raise ResultConflict(task.task_id, "it succeeded")
        if holder and failed_as_reported(task):
            raise ResultConflict(task.task_id, "it failed")
        if task.state is TaskState.ASSIGNED or not holder:
            raise FailedPrecondition(
                f"agent {agent_id!r} does not hold attempt {attempt} of task {task.task_id!r}"
            )
        raise FailedPrecondition(f"task {task.task_id!r} is {task.state.value}, not assigned")

    def succeed(self, run: RunNow, name: str, output: JsonObject) -> Decision:
        """The holder of `name` reported its output: the task succeeded, and the graph moves on
        (`run` follows, so the next event in the same write starts from this outcome)."""
        task = run.tasks[name]
        transition = graph.succeed(run.shape.tasks, run.states, name)
        decision = Decision([TaskMove(Move.SUCCEED, task.task_id, output)])
        rest = {other: state for other, state in transition.tasks.items() if other != name}
        _follow(run, graph.Transition(rest, transition.run_state), decision)
        decision.effects.released.append(
            Hold(task.agent_id, task.task_id, run.run_id, task.attempt)
        )
        run.set(name, TaskState.SUCCEEDED)
        return decision

    def fail(
        self,
        run: RunNow,
        name: str,
        error: str,
        policy: RetryPolicy | None,
        now: datetime,
        *,
        retryable: bool,
        reported: bool,
    ) -> Decision:
        """An attempt of `name` failed (`reported` by its holder, or declared by the server): the
        task is queued again after its backoff while `policy` (the server's defaults filling
        what it leaves unset) allows and the failure is `retryable`; otherwise it fails finally
        (its fallback takes over, or the run fails). A queued task (one pinned to an agent
        that left) fails finally."""
        task = run.tasks[name]
        resolved = self._retry.resolve(policy)
        decision = Decision()
        if retryable and resolved.may_retry(task.attempt):
            not_before = now + resolved.delay(task.attempt, self._rng)
            decision.tasks.append(
                TaskMove(Move.RETRY, task.task_id, None, error, reported, not_before)
            )
            decision.effects.queued.append(run.shape.tasks[name].ready(run.run_id, not_before))
            run.set(name, TaskState.QUEUED)
        else:
            transition = graph.fail(run.shape.tasks, run.states, name)
            decision.tasks.append(TaskMove(Move.FAIL, task.task_id, None, error, reported))
            if task.state is TaskState.QUEUED:
                decision.effects.unqueued.append(task.task_id)
            rest = {other: state for other, state in transition.tasks.items() if other != name}
            _follow(run, graph.Transition(rest, transition.run_state), decision)
            run.set(name, TaskState.FAILED)
        if task.state is TaskState.ASSIGNED:
            decision.effects.released.append(
                Hold(task.agent_id, task.task_id, run.run_id, task.attempt)
            )
        return decision

    def expire(self, run: RunNow, name: str, policy: RetryPolicy | None, now: datetime) -> Decision:
        """The lease of the current attempt of `name` ended without a result."""
        return self._abandon(run, name, TIMED_OUT, policy, now)

    def lose(self, run: RunNow, name: str, policy: RetryPolicy | None, now: datetime) -> Decision:
        """The agent holding the current attempt of `name` did not come back in time."""
        return self._abandon(run, name, AGENT_LOST, policy, now)

    def _abandon(
        self, run: RunNow, name: str, reason: str, policy: RetryPolicy | None, now: datetime
    ) -> Decision:
        """The current attempt of `name` ended without a result: it failed, retryably, with
        `reason`, and its holder is told to stop."""
        task = run.tasks[name]
        decision = self.fail(run, name, reason, policy, now, retryable=True, reported=False)
        decision.effects.cancelled.append(
            Cancellation(task.agent_id, task.task_id, run.run_id, task.attempt, reason)
        )
        return decision

    @staticmethod
    def quarantined(expiries: Mapping[str, int], after: int) -> dict[str, str]:
        """Of agents and their counts of leases expired in a row, those that are quarantined now
        (put in ERROR until they report IDLE or register again), with the detail to show."""
        return {
            agent_id: f"quarantined: {count} task leases expired in a row; report IDLE or "
            "register again to take work"
            for agent_id, count in expiries.items()
            if count >= after
        }

    # Operators -------------------------------------------------------------------------

    @staticmethod
    def cancel(run: RunNow, run_state: RunState) -> Decision:
        """An operator cancels the run: every unfinished task is cancelled, and the agents that
        hold one are told to stop. FAILED_PRECONDITION if the run is finished."""
        if run_state.finished:
            raise FailedPrecondition(f"run {run.run_id!r} is already {run_state.value}")
        decision = Decision()
        _follow(run, graph.cancel(run.states), decision)
        return decision

    def deregister(self, runs: Sequence[RunNow], agent_id: str, now: datetime) -> Decision:
        """`agent_id` is removed. The attempts it holds in `runs` go back to the queue, not
        counted as failures; then the tasks pinned to it that wait for it or that it holds fail
        finally, as no other agent may run them (and so, in turn, does a fallback pinned to it
        that this queues)."""
        decision = Decision()
        for run in runs:
            shape = run.shape.tasks
            for name, task in list(run.tasks.items()):
                if (
                    task.state is TaskState.ASSIGNED
                    and task.agent_id == agent_id
                    and shape[name].pinned_agent_id != agent_id
                ):
                    decision.tasks.append(TaskMove(Move.HAND_BACK, task.task_id))
                    decision.effects.released.append(
                        Hold(agent_id, task.task_id, run.run_id, task.attempt)
                    )
                    decision.effects.queued.append(shape[name].ready(run.run_id))
                    run.set(name, TaskState.QUEUED)
        error = DEREGISTERED.format(agent_id=agent_id)
        for run in runs:
            shape = run.shape.tasks
            while pinned := [
                name
                for name, state in run.states.items()
                if state in _WAITING and shape[name].pinned_agent_id == agent_id
            ]:
                for name in pinned:
                    if run.states[name] in _WAITING:  # not skipped by an earlier one's failure
                        decision.merge(
                            self.fail(run, name, error, None, now, retryable=False, reported=False)
                        )
        # A fallback queued and failed within this decision never reached the dispatcher.
        effects = decision.effects
        gone = set(effects.unqueued) & {task.task_id for task in effects.queued}
        effects.queued = [task for task in effects.queued if task.task_id not in gone]
        effects.unqueued = [task_id for task_id in effects.unqueued if task_id not in gone]
        return decision


def failed_as_reported(task: TaskNow) -> bool:
    """Whether the task failed, or waits for its retry, after its holder reported a failure."""
    return task.state in (TaskState.FAILED, TaskState.QUEUED) and task.error_reported


def _follow(run: RunNow, transition: graph.Transition, decision: Decision) -> None:
    """Add a graph transition of `run` (its other tasks, and the run) to `decision`, and move
    `run` along: queued tasks go to the dispatcher, queued ones that finish leave it, and the
    holders of attempts that are skipped or cancelled are told to stop."""
    effects = decision.effects
    shape = run.shape.tasks
    reason = _STOP_REASONS.get(transition.run_state or RunState.RUNNING, "")
    for name, state in transition.tasks.items():
        before = run.states[name]
        task_id = shape[name].task_id
        run.set(name, state)
        if state is TaskState.QUEUED:
            decision.tasks.append(TaskMove(Move.QUEUE, task_id))
            effects.queued.append(shape[name].ready(run.run_id))
            continue
        decision.tasks.append(TaskMove(_FINISHING[state], task_id))
        if before is TaskState.QUEUED:
            effects.unqueued.append(task_id)
        elif before is TaskState.ASSIGNED and state in (TaskState.SKIPPED, TaskState.CANCELLED):
            held = run.tasks[name]
            effects.released.append(Hold(held.agent_id, task_id, run.run_id, held.attempt))
            effects.cancelled.append(
                Cancellation(held.agent_id, task_id, run.run_id, held.attempt, reason)
            )
    if transition.run_state is not None:
        effects.finished_runs.append((run.run_id, transition.run_state))
