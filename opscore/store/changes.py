"""Row changes of a write, collected and run set-based; and how each decided move is written.

A set-based write (see `writer.Grouped`) moves many runs at once. Rather than one UPDATE per task
and per run, each change is added to `Changes` and the changes of one statement are run together
as one executemany when the write flushes. Order still holds where it matters: a row changed by a
second kind of statement flushes everything collected before it first, so the last change of a
row is always the last one run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.engine import Connection

from opscore.domain.models import Effects, TaskState
from opscore.domain.state import Decision, Move, TaskMove
from opscore.store.prepared import SAMPLE_TIME, Prepared, Sample
from opscore.store.tables import RUNS, TASKS


def task_update(name: str, samples: Sequence[Sample], /, **values: Any) -> Prepared:
    """An UPDATE of one task by `b_task_id`, setting `values` (see `Prepared` for `name` and
    `samples`). Parameters are named `b_*` because SQLAlchemy reserves column names for the
    values of an UPDATE."""
    return Prepared(
        name,
        update(TASKS).where(TASKS.c.task_id == bindparam("b_task_id")).values(**values),
        samples=samples,
    )


SUCCEED_TASK = task_update(
    "changes.succeed_task",
    [{"b_task_id": "b", "b_output": {"done": True}, "b_now": SAMPLE_TIME}],
    state=TaskState.SUCCEEDED.value,
    output=bindparam("b_output"),
    not_before=None,
    finished_at=bindparam("b_now"),
)
QUEUE_TASK = task_update(
    "changes.queue_task",
    [[{"b_task_id": "c", "b_now": SAMPLE_TIME}, {"b_task_id": "d", "b_now": SAMPLE_TIME}]],
    state=TaskState.QUEUED.value,
    not_before=None,
    queued_at=bindparam("b_now"),
)
FINISH_TASK = task_update(
    "changes.finish_task",
    [{"b_task_id": "c", "b_state": "skipped", "b_now": SAMPLE_TIME}],
    state=bindparam("b_state"),
    not_before=None,
    finished_at=bindparam("b_now"),
)
_ERROR_SAMPLE = {
    "b_task_id": "c",
    "b_error": "boom",
    "b_reported": True,
    "b_now": SAMPLE_TIME,
    "b_not_before": SAMPLE_TIME,
}
RETRY_TASK = task_update(
    "changes.retry_task",
    [_ERROR_SAMPLE],
    state=TaskState.QUEUED.value,
    error=bindparam("b_error"),
    error_reported=bindparam("b_reported"),
    queued_at=bindparam("b_now"),
    not_before=bindparam("b_not_before"),
)
FAIL_TASK = task_update(
    "changes.fail_task",
    [{key: value for key, value in _ERROR_SAMPLE.items() if key != "b_not_before"}],
    state=TaskState.FAILED.value,
    error=bindparam("b_error"),
    error_reported=bindparam("b_reported"),
    not_before=None,
    finished_at=bindparam("b_now"),
)
HAND_BACK_TASK = task_update(
    "changes.hand_back_task",
    [{"b_task_id": "c", "b_now": SAMPLE_TIME}],
    state=TaskState.QUEUED.value,
    queued_at=bindparam("b_now"),
    deadline=None,
)
FINISH_RUN = Prepared(
    "changes.finish_run",
    update(RUNS)
    .where(RUNS.c.run_id == bindparam("b_run_id"))
    .values(state=bindparam("b_state"), finished_at=bindparam("b_now")),
    samples=[{"b_run_id": "r2", "b_state": "cancelled", "b_now": SAMPLE_TIME}],
)


class Changes:
    """Row changes waiting to be run, grouped by statement (see the module docstring)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._pending: dict[Prepared, list[dict[str, Any]]] = {}
        self._changed_by: dict[str, Prepared] = {}

    def add(self, statement: Prepared, row_key: str, params: dict[str, Any]) -> None:
        """Change the row `row_key` (a task or run id) with `statement` and `params`."""
        previous = self._changed_by.get(row_key)
        if previous is not None and previous is not statement:
            self.flush()
        self._changed_by[row_key] = statement
        self._pending.setdefault(statement, []).append(params)

    def flush(self) -> None:
        """Run every change collected, one executemany per statement."""
        for statement, params in self._pending.items():
            statement.execute(self._conn, params)
        self._pending.clear()
        self._changed_by.clear()


def record(conn: Connection, decision: Decision, now: datetime) -> Effects:
    """Write what the state machine decided; what its commit will mean for memory."""
    changes = Changes(conn)
    write_decision(changes, decision, now)
    changes.flush()
    return decision.effects


def write_decision(changes: Changes, decision: Decision, now: datetime) -> None:
    """Add the row changes the state machine decided to `changes`, each to its statement."""
    for move in decision.tasks:
        statement, params = _TASK_WRITES[move.move]
        changes.add(statement, move.task_id, params(move, now))
    for run_id, state in decision.runs:
        changes.add(FINISH_RUN, run_id, {"b_run_id": run_id, "b_state": state.value, "b_now": now})


def _finished(state: TaskState) -> Callable[[TaskMove, datetime], dict[str, Any]]:
    def params(move: TaskMove, now: datetime) -> dict[str, Any]:
        return {"b_task_id": move.task_id, "b_state": state.value, "b_now": now}

    return params


def _failed(move: TaskMove, now: datetime) -> dict[str, Any]:
    return {
        "b_task_id": move.task_id,
        "b_error": move.error,
        "b_reported": move.reported,
        "b_now": now,
    }


def _retried(move: TaskMove, now: datetime) -> dict[str, Any]:
    return {**_failed(move, now), "b_not_before": move.not_before}


def _at(move: TaskMove, now: datetime) -> dict[str, Any]:
    return {"b_task_id": move.task_id, "b_now": now}


def _succeeded(move: TaskMove, now: datetime) -> dict[str, Any]:
    return {"b_task_id": move.task_id, "b_output": move.output, "b_now": now}


_TASK_WRITES: dict[Move, tuple[Prepared, Callable[[TaskMove, datetime], dict[str, Any]]]] = {
    Move.SUCCEED: (SUCCEED_TASK, _succeeded),
    Move.QUEUE: (QUEUE_TASK, _at),
    Move.RETRY: (RETRY_TASK, _retried),
    Move.HAND_BACK: (HAND_BACK_TASK, _at),
    Move.FAIL: (FAIL_TASK, _failed),
    Move.SKIP: (FINISH_TASK, _finished(TaskState.SKIPPED)),
    Move.CANCEL: (FINISH_TASK, _finished(TaskState.CANCELLED)),
}
