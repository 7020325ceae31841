"""Workflow runs: triggering (set-based, idempotent by request id), reading and cancelling."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, func, insert, literal, select, tuple_
from sqlalchemy.engine import Connection

from opscore.domain import idempotency, waiting
from opscore.domain.errors import (
    InvalidArgument,
    NotFound,
    OpsCoreError,
    Resource,
)
from opscore.domain.ids import is_valid_id, new_id, new_ids
from opscore.domain.models import (
    Effects,
    Page,
    RunFilter,
    RunOrder,
    RunState,
    RunView,
    TaskRun,
    TaskState,
    WorkflowRun,
)
from opscore.domain.ports import CreatedRun, NewRun, OnCommit
from opscore.domain.responses import Budget, WireSizes, count_states
from opscore.domain.state import RunNow
from opscore.store import rows, templates
from opscore.store.changes import record
from opscore.store.prepared import SAMPLE_TIME, Prepared
from opscore.store.queries.agents import agents_by_id
from opscore.store.queries.base import Shared, tasks_of
from opscore.store.queries.definitions import LATEST_DEFINITION, definition_by_id
from opscore.store.queries.pages import read_by_bytes, scoped_key, scoped_token
from opscore.store.tables import RUNS, TASKS
from opscore.store.templates import NewTasks, RunTemplate
from opscore.store.writer import Observe, Tx

DEFINITION_CACHE_SIZE = 1024
"""Stored definitions whose run templates are kept in memory by id (the oldest seen is dropped
first)."""

_RUN = select(RUNS).where(RUNS.c.run_id == bindparam("b_run_id"))
_RUNS = select(RUNS).where(RUNS.c.run_id.in_(bindparam("b_run_ids", expanding=True)))
# What moves when a task changes: a watched run's tasks are read whole only when these differ.
_MOVING = (
    TASKS.c.state,
    TASKS.c.attempt,
    TASKS.c.agent_id,
    TASKS.c.queued_at,
    TASKS.c.assigned_at,
    TASKS.c.finished_at,
    TASKS.c.deadline,
    TASKS.c.not_before,
)
_TASKS_MOVING = select(TASKS.c.task_id, TASKS.c.run_id, *_MOVING).where(
    TASKS.c.run_id.in_(bindparam("b_run_ids", expanding=True))
)
_TASKS_BY_ID = select(TASKS).where(TASKS.c.task_id.in_(bindparam("b_task_ids", expanding=True)))
_RUN_FOR_UPDATE = _RUN.with_for_update()
_RUNS_BY_REQUEST = select(RUNS).where(
    RUNS.c.request_id.in_(bindparam("b_request_ids", expanding=True))
)
_INSERT_RUN = Prepared(
    "runs.insert_run",
    insert(RUNS),
    samples=[
        [
            {
                "run_id": run_id,
                "definition_id": None,
                "workflow_name": "flow",
                "agent_id": None,
                "state": RunState.PENDING.value,
                "input": {"run": run_id},
                "request_id": f"req-{run_id}",
                "created_at": SAMPLE_TIME,
            }
            for run_id in ("r3", "r4")
        ]
    ],
)
_RUN_EXISTS = select(RUNS.c.run_id).where(RUNS.c.run_id == bindparam("b_run_id"))
_TASK_COUNTS = (
    select(TASKS.c.run_id, TASKS.c.state, func.count().label("tasks"))
    .where(TASKS.c.run_id.in_(bindparam("b_run_ids", expanding=True)))
    .group_by(TASKS.c.run_id, TASKS.c.state)
)
_TASKS_FROM = (
    select(TASKS)
    .where(TASKS.c.run_id == bindparam("b_run_id"), TASKS.c.position >= bindparam("b_from"))
    .order_by(TASKS.c.position)
    .limit(bindparam("b_limit"))
)
_RUN_KEY = tuple_(RUNS.c.created_at, RUNS.c.run_id)
_RUN_ORDERS = {
    RunOrder.NEWEST_FIRST: (RUNS.c.created_at.desc(), RUNS.c.run_id.desc()),
    RunOrder.OLDEST_FIRST: (RUNS.c.created_at.asc(), RUNS.c.run_id.asc()),
}
_TOKEN_ROOM = 256
"""Bytes kept, before a run's tasks are measured, for the next_task_page_token it may get."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Runs:
    """The store's repository of workflow runs: triggering, reading, cancelling."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._rules = shared.rules
        self._templates: dict[str, tuple[str, RunTemplate]] = {}
        """Stored definitions by id: the workflow's name and the template of its runs."""

    def _template(self, conn: Connection, definition_id: str) -> tuple[str, RunTemplate]:
        """A stored definition's name and run template, from memory when seen before:
        definitions never change, so a cache by id is right on every replica, and triggering by
        id reads no definition row."""
        found = self._templates.get(definition_id)
        if found is None:
            definition = definition_by_id(conn, definition_id)
            found = (
                definition.workflow_name,
                RunTemplate.of(definition.tasks, conn.dialect, self._rules),
            )
            if len(self._templates) >= DEFINITION_CACHE_SIZE:
                self._templates.pop(next(iter(self._templates)))
            self._templates[definition_id] = found
        return found

    async def create_run(self, request: NewRun) -> WorkflowRun:
        """Start a run of a stored definition (by id, or the latest of a name) or of an inline
        one; its root tasks are queued at once. A repeated request_id returns the first run.
        Set-based: every trigger of a batch is written by one `_create_runs`.
        """
        run: WorkflowRun = await self._shared.writer.submit_grouped(self._create_runs, request)
        return run

    def _create_runs(
        self, conn: Connection, requests: Sequence[tuple[Tx, NewRun]]
    ) -> list[WorkflowRun | OpsCoreError]:
        earlier = self._runs_by_request(conn, [request for _, request in requests])
        agent_ids = sorted({request.agent_id for _, request in requests if request.agent_id})
        # Pinned agents whole (capabilities, labels): a run they cannot finish is refused.
        pinned = agents_by_id(conn, agent_ids)
        latest: dict[str, str] = {}
        run_values: list[dict[str, Any]] = []
        task_rows: list[list[Any]] = []
        outcomes: list[WorkflowRun | OpsCoreError] = []
        for tx, request in requests:
            outcome: CreatedRun | OpsCoreError
            repeated = earlier.get(request.request_id) if request.request_id else None
            if repeated is not None:
                run, fingerprint = repeated
                try:
                    idempotency.check_repeated_trigger(
                        request.request_id, request.fingerprint, run.run_id, fingerprint
                    )
                except OpsCoreError as error:
                    outcomes.append(error)
                    continue
                outcome = CreatedRun(run, False, Effects())
            else:
                try:
                    if request.agent_id and request.agent_id not in pinned:
                        raise NotFound(Resource.AGENT, request.agent_id)
                    source = self._source(conn, request, latest)
                    if request.agent_id:
                        waiting.check_pinned_agent(pinned[request.agent_id], source[2].specs)
                except OpsCoreError as error:
                    outcomes.append(error)
                    continue
                outcome, new = _new_run(request, source, run_values, task_rows)
                self._shared.shapes.remember(outcome.run.run_id, new.shape)
                inserted = tx.batch.inserted
                for root in new.roots:
                    inserted[root.task_id] = root
                if request.request_id:
                    earlier[request.request_id] = (outcome.run, request.fingerprint)
                tx.will_apply(outcome.effects)
            tx.after_commit(functools.partial(request.on_commit, outcome))
            outcomes.append(outcome.run)
        if run_values:
            _INSERT_RUN.execute(conn, run_values)
            templates.insert_tasks(conn, task_rows)
        return outcomes

    def _runs_by_request(
        self, conn: Connection, requests: list[NewRun]
    ) -> dict[str, tuple[WorkflowRun, str | None]]:
        """The runs already started for these requests' request_ids, with the fingerprints of
        the triggers that started them."""
        request_ids = sorted({request.request_id for request in requests if request.request_id})
        if not request_ids:
            return {}
        found = conn.execute(_RUNS_BY_REQUEST, {"b_request_ids": request_ids}).all()
        tasks = tasks_of(conn, [row.run_id for row in found])
        return {
            row.request_id: (
                rows.workflow_run(row, tasks.get(row.run_id, [])),
                row.request_fingerprint,
            )
            for row in found
        }

    def _source(
        self, conn: Connection, request: NewRun, latest: dict[str, str]
    ) -> tuple[str, str | None, RunTemplate]:
        """What a trigger runs: the workflow's name, its stored definition id (None for an
        inline definition) and the template of its runs. `latest` remembers, for this batch,
        the latest version of each name already looked up."""
        if request.inline is not None:
            return (
                request.inline.workflow_name,
                None,
                RunTemplate.of(request.inline.tasks, conn.dialect, self._rules),
            )
        definition_id = request.definition_id
        if not definition_id:
            name = request.workflow_name
            if name not in latest:
                found = LATEST_DEFINITION.rows(conn, {"b_name": name})
                if not found:
                    raise NotFound(Resource.DEFINITION, name, named=True)
                latest[name] = found[0].definition_id
            definition_id = latest[name]
        name, template = self._template(conn, definition_id)
        return name, definition_id, template

    async def read_run(self, run_id: str, view: RunView, budget: Budget) -> WorkflowRun:
        """One run in `view`, cut to fit `budget`; NOT_FOUND if unknown."""

        def op(conn: Connection) -> WorkflowRun:
            row = conn.execute(_RUN, {"b_run_id": run_id}).first()
            if row is None:
                raise NotFound(Resource.RUN, run_id)
            run = rows.workflow_run(row, [], task_counts(conn, [run_id]).get(run_id, ()))
            if view is RunView.BASIC:
                return run
            room = budget.bytes - budget.sizes.run(run)
            return _with_tasks(run, _stored_tasks(conn, run_id), room, budget.sizes)[0]

        return await self._shared.read(op)

    async def list_runs(
        self,
        page_size: int,
        page_token: str,
        where: RunFilter,
        order: RunOrder,
        view: RunView,
        budget: Budget,
    ) -> Page[WorkflowRun]:
        """A page of the runs `where` matches in `order`, in `view`, cut to fit `budget`."""
        scope = _runs_scope(where, order)
        first = _run_key_in(scoped_key(page_token, scope))

        def op(conn: Connection) -> Page[WorkflowRun]:
            query = _filtered(where)

            def fetch(start: tuple[datetime, str] | None, limit: int) -> list[WorkflowRun]:
                chunk = query
                if start is not None:
                    chunk = chunk.where(_from_run(start, order))
                found = conn.execute(chunk.order_by(*_RUN_ORDERS[order]).limit(limit)).all()
                counts = task_counts(conn, [row.run_id for row in found])
                return [rows.workflow_run(row, [], counts.get(row.run_id, ())) for row in found]

            runs, rest, used = read_by_bytes(
                lambda start, limit: fetch(start or first, limit),
                lambda run: (run.created_at, run.run_id),
                budget.sizes.run,
                page_size,
                budget.bytes,
            )
            if view is RunView.FULL:
                room = budget.bytes - used
                for index, run in enumerate(runs):
                    runs[index], room = _with_tasks(
                        run, _stored_tasks(conn, run.run_id), room, budget.sizes
                    )
            token = "" if rest is None else scoped_token(scope, _run_key_out(rest))
            return Page(tuple(runs), token)

        return await self._shared.read(op)

    async def list_run_tasks(
        self, run_id: str, page_size: int, page_token: str, budget: Budget
    ) -> Page[TaskRun]:
        """A page of a run's tasks in definition order, cut to fit `budget`; NOT_FOUND if the
        run is unknown."""
        first = _task_key_in(scoped_key(page_token, _tasks_scope(run_id)))

        def op(conn: Connection) -> Page[TaskRun]:
            if conn.execute(_RUN_EXISTS, {"b_run_id": run_id}).first() is None:
                raise NotFound(Resource.RUN, run_id)
            fetch = _stored_tasks(conn, run_id)
            tasks, rest, _ = read_by_bytes(
                lambda start, limit: fetch(first if start is None else start, limit),
                _position,
                budget.sizes.task,
                page_size,
                budget.bytes,
            )
            return Page(tuple(tasks), _task_token(run_id, rest))

        return await self._shared.read(op)

    async def observe_watched(self) -> None:
        """An empty write batch, for its observation of the watched runs (`observation`)."""
        await self._shared.write(_nothing)

    def observation(
        self,
        run_ids: Callable[[], list[str]],
        known: Callable[[str], Mapping[str, TaskRun]],
        observed: Callable[[dict[str, WorkflowRun]], None],
    ) -> Observe:
        """What every write batch does last (see `Writer.run`): read the runs `run_ids` names
        as the batch leaves them, and hand them to `observed` once it has committed. Of their
        tasks, only those whose state, attempt, agent or times differ from what `known` holds
        are read whole (outputs and errors change only with those)."""

        def observe(conn: Connection) -> Callable[[], None] | None:
            wanted = run_ids()
            if not wanted:
                return None
            knowns = {run_id: known(run_id) for run_id in wanted}
            seen: dict[str, list[str]] = {}
            before: dict[str, TaskRun] = {}
            moved: list[str] = []
            for row in conn.execute(_TASKS_MOVING, {"b_run_ids": wanted}):
                seen.setdefault(row.run_id, []).append(row.task_id)
                task = knowns[row.run_id].get(row.task_id)
                if task is None or _moving(task) != _moving_of(row):
                    moved.append(row.task_id)
                else:
                    before[row.task_id] = task
            if moved:
                found = conn.execute(_TASKS_BY_ID, {"b_task_ids": moved})
                before.update((task.task_id, task) for task in map(rows.task_run, found))
            runs = {
                row.run_id: rows.workflow_run(
                    row, [before[task_id] for task_id in seen.get(row.run_id, [])]
                )
                for row in conn.execute(_RUNS, {"b_run_ids": wanted})
            }
            return functools.partial(observed, runs)

        return observe

    def fit_run(self, run: WorkflowRun, budget: Budget) -> WorkflowRun:
        """A run read whole (as a trigger or a cancellation returns it) cut to fit `budget`: as
        many of its tasks as fit, and a token for the rest."""
        basic = dataclasses.replace(run, tasks=())

        def fetch(start: int | None, limit: int) -> Sequence[TaskRun]:
            return run.tasks[start or 0 : (start or 0) + limit]

        room = budget.bytes - budget.sizes.run(basic)
        return _with_tasks(basic, fetch, room, budget.sizes)[0]

    async def cancel_run(
        self, run_id: str, now: datetime, on_commit: OnCommit[Effects]
    ) -> WorkflowRun:
        """Cancel an unfinished run: its queued tasks leave the queue, its held ones are to be
        stopped. FAILED_PRECONDITION for a finished run.
        """

        def op(conn: Connection) -> tuple[WorkflowRun, Effects]:
            run = _get_run(conn, run_id, lock=True)
            decision = self._rules.cancel(RunNow.of_runs(run_id, run.tasks), run.state)
            effects = record(conn, decision, now)
            return _get_run(conn, run_id), effects

        return await self._shared.write_moving(op, on_commit)


def _moving(task: TaskRun) -> tuple[Any, ...]:
    return (
        task.state,
        task.attempt,
        task.agent_id,
        task.queued_at,
        task.assigned_at,
        task.finished_at,
        task.deadline,
        task.not_before,
    )


def _moving_of(row: Any) -> tuple[Any, ...]:
    return (
        rows.TASK_STATES[row.state],
        row.attempt,
        row.agent_id or "",
        row.queued_at,
        row.assigned_at,
        row.finished_at,
        row.deadline,
        row.not_before,
    )


def _nothing(conn: Connection) -> None:
    """A write that writes nothing."""


TaskFetch = Callable[[int | None, int], Sequence[TaskRun]]
"""At most `limit` tasks of a run, in definition order, from the position `start` on."""


def _stored_tasks(conn: Connection, run_id: str) -> TaskFetch:
    def fetch(start: int | None, limit: int) -> list[TaskRun]:
        found = conn.execute(
            _TASKS_FROM, {"b_run_id": run_id, "b_from": start or 0, "b_limit": limit}
        )
        return [rows.task_run(row) for row in found]

    return fetch


def _position(task: TaskRun) -> int:
    return task.position


def _with_tasks(
    run: WorkflowRun, fetch: TaskFetch, room: int, sizes: WireSizes
) -> tuple[WorkflowRun, int]:
    """`run` (without tasks) with as many of its tasks as fit in `room` bytes (what is left of
    a response once the run itself is counted), and a token for the rest; and the room left
    after them."""
    total = sum(count for _, count in run.task_counts)
    if total == 0:
        return run, room
    tasks: list[TaskRun] = []
    rest: int | None = 0  # when no task can fit, the rest starts at the first
    used = 0
    if room > _TOKEN_ROOM:
        tasks, rest, used = read_by_bytes(
            fetch, _position, sizes.task, total, room - _TOKEN_ROOM, at_least_one=False
        )
    token = _task_token(run.run_id, rest)
    room -= used + (len(token) + 3 if token else 0)
    return dataclasses.replace(run, tasks=tuple(tasks), next_task_page_token=token), room


def _tasks_scope(run_id: str) -> str:
    return json.dumps(["tasks", run_id])


def _task_token(run_id: str, position: int | None) -> str:
    return "" if position is None else scoped_token(_tasks_scope(run_id), [position])


def _task_key_in(key: list[Any] | None) -> int | None:
    """The position a task page token starts at; INVALID_ARGUMENT if it is not one."""
    if key is None:
        return None
    if len(key) != 1 or type(key[0]) is not int or key[0] < 0:
        raise InvalidArgument.single("page_token", "is not a token this server issued")
    position: int = key[0]
    return position


def _runs_scope(where: RunFilter, order: RunOrder) -> str:
    """What a listing of runs was asked for, which its page tokens are valid for."""
    return json.dumps(
        [
            "runs",
            where.state.value if where.state is not None else "",
            where.definition_id,
            where.agent_id,
            where.workflow_name,
            _micros(where.created_after),
            _micros(where.created_before),
            order.value,
        ]
    )


def _micros(value: datetime | None) -> int | None:
    return None if value is None else (value - _EPOCH) // _MICROSECOND


def _run_key_out(key: tuple[datetime, str]) -> list[Any]:
    return [_micros(key[0]), key[1]]


def _run_key_in(key: list[Any] | None) -> tuple[datetime, str] | None:
    """The run a run page token starts at; INVALID_ARGUMENT if it is not one."""
    if key is None:
        return None
    if (
        len(key) != 2
        or type(key[0]) is not int
        or not isinstance(key[1], str)
        or not is_valid_id(key[1])
    ):
        raise InvalidArgument.single("page_token", "is not a token this server issued")
    try:
        return _EPOCH + key[0] * _MICROSECOND, key[1]
    except OverflowError:
        raise InvalidArgument.single("page_token", "is not a token this server issued") from None


def _from_run(start: tuple[datetime, str], order: RunOrder) -> ColumnElement[bool]:
    """The runs from `start` on, in `order` (a row-value comparison, which both backends
    answer from the index on the key)."""
    bound = tuple_(literal(start[0], RUNS.c.created_at.type), literal(start[1], RUNS.c.run_id.type))
    return bound >= _RUN_KEY if order is RunOrder.NEWEST_FIRST else bound <= _RUN_KEY


def _filtered(where: RunFilter) -> Select[Any]:
    """The runs `where` matches, unordered."""
    query = select(RUNS)
    if where.state is not None:
        query = query.where(RUNS.c.state == where.state.value)
    if where.definition_id:
        query = query.where(RUNS.c.definition_id == where.definition_id)
    if where.agent_id:
        query = query.where(RUNS.c.agent_id == where.agent_id)
    if where.workflow_name:
        query = query.where(RUNS.c.workflow_name == where.workflow_name)
    if where.created_after is not None:
        query = query.where(RUNS.c.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(RUNS.c.created_at < where.created_before)
    return query


_STATE_ORDER = {state: index for index, state in enumerate(TaskState)}


def task_counts(
    conn: Connection, run_ids: list[str]
) -> dict[str, tuple[tuple[TaskState, int], ...]]:
    """How many tasks of each of these runs are in each state, by run."""
    if not run_ids:
        return {}
    grouped: dict[str, list[tuple[TaskState, int]]] = {}
    for row in conn.execute(_TASK_COUNTS, {"b_run_ids": run_ids}):
        grouped.setdefault(row.run_id, []).append((rows.TASK_STATES[row.state], row.tasks))
    return {
        run_id: tuple(sorted(counts, key=lambda count: _STATE_ORDER[count[0]]))
        for run_id, counts in grouped.items()
    }


def _load_run(conn: Connection, row: Any) -> WorkflowRun:
    tasks = tasks_of(conn, [row.run_id])
    return rows.workflow_run(row, tasks.get(row.run_id, []))


def _get_run(conn: Connection, run_id: str, *, lock: bool = False) -> WorkflowRun:
    row = conn.execute(_RUN_FOR_UPDATE if lock else _RUN, {"b_run_id": run_id}).first()
    if row is None:
        raise NotFound(Resource.RUN, run_id)
    return _load_run(conn, row)


def _new_run(
    request: NewRun,
    source: tuple[str, str | None, RunTemplate],
    run_values: list[dict[str, Any]],
    task_rows: list[list[Any]],
) -> tuple[CreatedRun, NewTasks]:
    """Add a new run's row and its tasks' rows to the rows to insert; the run as inserted,
    built from those values rather than read back, with its root tasks queued; and its tasks."""
    name, stored_id, template = source
    run_id = new_id()
    run_values.append(
        {
            "run_id": run_id,
            "definition_id": stored_id,
            "workflow_name": name,
            "agent_id": request.agent_id or None,
            "state": RunState.PENDING.value,
            "input": request.run_input,
            "request_id": request.request_id or None,
            "request_fingerprint": request.fingerprint or None,
            "created_at": request.now,
        }
    )
    new = template.new_tasks(
        run_id,
        new_ids(len(template.specs)),
        request.agent_id,
        request.run_input,
        request.now,
    )
    task_rows.extend(new.rows)
    run = WorkflowRun(
        run_id=run_id,
        definition_id=stored_id or "",
        workflow_name=name,
        agent_id=request.agent_id,
        state=RunState.PENDING,
        input=dict(request.run_input),
        tasks=new.tasks,
        created_at=request.now,
        started_at=None,
        finished_at=None,
        task_counts=count_states(new.tasks),
    )
    return CreatedRun(run, True, Effects(queued=new.queued)), new
