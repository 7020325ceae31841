"""A run followed live (`runs watch`, `runs trigger --watch`): a progress bar of the tasks
finished out of all, and each task's state, redrawn at each change WatchWorkflowRun streams; or,
with `--output json`, one JSON document a line per change."""

from __future__ import annotations

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from opscore.client import Client, RunUpdate
from opscore.commands import render
from opscore.commands.connection import Output
from opscore.v1 import workflow_pb2

DONE = frozenset(
    {
        workflow_pb2.TASK_STATE_SUCCEEDED,
        workflow_pb2.TASK_STATE_FAILED,
        workflow_pb2.TASK_STATE_CANCELLED,
        workflow_pb2.TASK_STATE_SKIPPED,
    }
)
"""The states a task never leaves."""


def finished(run: workflow_pb2.WorkflowRun) -> int:
    """How many of the run's tasks are over."""
    return sum(each.count for each in run.task_counts if each.state in DONE)


def view(update: RunUpdate) -> Group:
    """The run as of `update`: its name, state and bar, then its tasks."""
    run = update.run
    total = sum(each.count for each in run.task_counts) or len(run.tasks)
    done = finished(run)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        Text(run.workflow_name, style="bold"),
        ProgressBar(total=max(total, 1), completed=done, width=30),
        Text(f"{done}/{total} tasks"),
        render.run_state(run.state),
    )
    return Group(bar, Text(f"run {run.run_id}", style="dim"), render.tasks_table(run.tasks))


async def follow(client: Client, out: Output, run_id: str) -> int:
    """Follow the run until it is final: 0 if it succeeded, 1 otherwise."""
    last: RunUpdate | None = None
    if out.json:
        async for update in client.watch(run_id):
            last = update
            out.document(
                {
                    "run": render.as_json(update.run),
                    "changed_tasks": [render.as_json(each) for each in update.changed],
                }
            )
    elif out.console.is_terminal:
        with Live(console=out.console, auto_refresh=False) as live:
            async for update in client.watch(run_id):
                last = update
                live.update(view(update), refresh=True)
    else:  # redrawing needs a terminal: where it goes to a file, the run as it ended
        async for update in client.watch(run_id):
            last = update
        if last is not None:
            out.console.print(view(last))
    succeeded = last is not None and last.run.state == workflow_pb2.RUN_STATE_SUCCEEDED
    return 0 if succeeded else 1
