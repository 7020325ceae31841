"""Run templates: what every run of one definition writes alike, worked out once.

Triggering a run writes a row for each of its tasks, and nearly all of each row comes from the
definition: the task's position, name, capability, labels, dependencies, fallback, timeout,
retry policy, input, and its state at the start (queued for a root, pending otherwise). A
template holds those rows as the driver takes them (JSON encoded, and so on) and the run's graph,
so a trigger fills in only what is its own: the ids, the agent the run is pinned to, the time its
roots were queued, and the input when the trigger adds some. The store keeps a template per
stored definition; an inline definition gets one for its single run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection, Dialect

from opscore.domain.models import JsonObject, ReadyTask, TaskRun, TaskSpec, TaskState
from opscore.domain.ports import Rules
from opscore.domain.state import QueuedTask, RunShape, TaskShape
from opscore.store.prepared import Prepared, RowLayout
from opscore.store.rows import millis, retry_to_json
from opscore.store.tables import TASKS

TASK_COLUMNS = (
    "task_id",
    "run_id",
    "position",
    "name",
    "capability",
    "labels",
    "depends_on",
    "fallback",
    "timeout_ms",
    "retry_policy",
    "pinned_agent_id",
    "input",
    "state",
    "attempt",
    "agent_id",
    "output",
    "error",
    "queued_at",
)
"""The columns a new task's row is inserted with (the rest take their defaults)."""

INSERT_TASKS = Prepared(
    "templates.insert_tasks",
    insert(TASKS),
    samples=[
        [
            {
                **dict.fromkeys(TASK_COLUMNS),
                "task_id": f"n{position}",
                "run_id": "r2",
                "position": position,
                "name": f"t{position}",
                "capability": "work",
                "labels": {"zone": "\u00fc"},
                "depends_on": [f"t{position - 1}"],
                "fallback": "",
                "input": {"n": position},
                "state": TaskState.PENDING.value,
                "attempt": 0,
                "error": "",
            }
            for position in (1, 2)
        ]
    ],
)
"""The INSERT of new tasks' rows: a template's rows, in the order of its layout."""


def insert_tasks(conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
    """Insert the rows of new tasks, made by `RunTemplate.new_tasks`."""
    INSERT_TASKS.execute_rows(conn, TASK_COLUMNS, rows)


@dataclass(frozen=True, slots=True)
class NewTasks:
    """A new run's tasks: the rows to insert, the tasks as inserted (read back from nothing),
    the run's shape, and the tasks ready at once, as the dispatcher and an assignment see them."""

    rows: list[list[Any]]
    tasks: tuple[TaskRun, ...]
    shape: RunShape
    queued: list[ReadyTask]
    roots: list[QueuedTask]


@dataclass(frozen=True, slots=True)
class RunTemplate:
    """The tasks of every run of one definition, as far as they are alike (see the module
    docstring)."""

    specs: tuple[TaskSpec, ...]
    states: tuple[TaskState, ...]
    """Each task's state when its run starts."""
    fallbacks: dict[str, str]
    """The tasks that stand in for another, by name, each mapped to the task it stands in for
    (shared by the shapes of all its runs: nothing changes a graph)."""
    labels: tuple[tuple[tuple[str, str], ...], ...]
    """Each task's labels, sorted by key (as the dispatcher takes them)."""
    layout: RowLayout
    rows: tuple[tuple[Any, ...], ...]
    """Each task's row, the values that differ from run to run left to fill in."""

    @classmethod
    def of(cls, specs: Sequence[TaskSpec], dialect: Dialect, rules: Rules) -> RunTemplate:
        """The template of a definition with these tasks, its rows for `dialect`'s driver, its
        tasks' first states as `rules` decide them."""
        layout = INSERT_TASKS.layout(dialect, TASK_COLUMNS)
        initial = rules.initial_states(specs)
        return cls(
            specs=tuple(specs),
            states=tuple(initial[spec.name] for spec in specs),
            fallbacks={spec.fallback: spec.name for spec in specs if spec.fallback},
            labels=tuple(tuple(sorted(spec.labels.items())) for spec in specs),
            layout=layout,
            rows=tuple(
                tuple(
                    layout.row(
                        {
                            "task_id": None,
                            "run_id": None,
                            "position": position,
                            "name": spec.name,
                            "capability": spec.capability,
                            "labels": spec.labels,
                            "depends_on": list(spec.depends_on),
                            "fallback": spec.fallback,
                            "timeout_ms": millis(spec.timeout),
                            "retry_policy": retry_to_json(spec.retry_policy),
                            "pinned_agent_id": None,
                            "input": spec.input,
                            "state": initial[spec.name].value,
                            "attempt": 0,
                            "agent_id": None,
                            "output": None,
                            "error": "",
                            "queued_at": None,
                        }
                    )
                )
                for position, spec in enumerate(specs)
            ),
        )

    def new_tasks(
        self,
        run_id: str,
        task_ids: Sequence[str],
        agent_id: str,
        run_input: JsonObject,
        now: datetime,
    ) -> NewTasks:
        """The tasks of a new run: `task_ids` in definition order, pinned to `agent_id` (or
        none: empty), each task's input overlaid with `run_input`, roots queued at `now`."""
        layout = self.layout
        index = layout.index
        at_task_id, at_run_id = index["task_id"], index["run_id"]
        at_pinned, at_input = index["pinned_agent_id"], index["input"]
        at_queued = index["queued_at"]
        run_value = layout.convert("run_id", run_id)
        pinned = layout.convert("pinned_agent_id", agent_id or None)
        queued_at = layout.convert("queued_at", now)
        new_rows: list[list[Any]] = []
        tasks: list[TaskRun] = []
        shapes: dict[str, TaskShape] = {}
        queued: list[ReadyTask] = []
        roots: list[QueuedTask] = []
        for position, (spec, state, labels, template, task_id) in enumerate(
            zip(self.specs, self.states, self.labels, self.rows, task_ids, strict=True)
        ):
            row = list(template)
            row[at_task_id] = layout.convert("task_id", task_id)
            row[at_run_id] = run_value
            row[at_pinned] = pinned
            task_input = spec.input
            if run_input:
                task_input = {**spec.input, **run_input}
                row[at_input] = layout.convert("input", task_input)
            is_queued = state is TaskState.QUEUED
            if is_queued:
                row[at_queued] = queued_at
                queued.append(ReadyTask(task_id, run_id, spec.capability, labels, agent_id, None))
                # A task queued at the start is never a fallback: those wait for their task.
                roots.append(
                    QueuedTask(
                        task_id,
                        run_id,
                        spec.name,
                        spec.capability,
                        task_input,
                        spec.depends_on,
                        0,
                        millis(spec.timeout),
                        is_fallback=False,
                    )
                )
            new_rows.append(row)
            tasks.append(
                TaskRun(
                    task_id=task_id,
                    run_id=run_id,
                    name=spec.name,
                    position=position,
                    state=state,
                    attempt=0,
                    agent_id="",
                    output=None,
                    error="",
                    queued_at=now if is_queued else None,
                    assigned_at=None,
                    finished_at=None,
                    deadline=None,
                    capability=spec.capability,
                    labels=dict(spec.labels),
                    depends_on=spec.depends_on,
                    fallback=spec.fallback,
                    pinned_agent_id=agent_id,
                )
            )
            shapes[spec.name] = TaskShape(
                task_id, spec.depends_on, spec.fallback, spec.capability, labels, agent_id
            )
        shape = RunShape(shapes, self.fallbacks)
        return NewTasks(new_rows, tuple(tasks), shape, queued, roots)
