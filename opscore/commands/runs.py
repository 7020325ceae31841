"""`opscore runs trigger|list|get|watch|cancel`: workflow runs."""

from __future__ import annotations

import json
from typing import Any

import click

from opscore.client import Client
from opscore.client._client import is_definition_id, with_tasks
from opscore.commands import render
from opscore.commands.connection import PAGE_SIZE, Output, operator_command
from opscore.commands.progress import follow
from opscore.v1 import workflow_pb2

STATES = {
    "pending": workflow_pb2.RUN_STATE_PENDING,
    "running": workflow_pb2.RUN_STATE_RUNNING,
    "succeeded": workflow_pb2.RUN_STATE_SUCCEEDED,
    "failed": workflow_pb2.RUN_STATE_FAILED,
    "cancelled": workflow_pb2.RUN_STATE_CANCELLED,
}


def json_object(_: click.Context, __: click.Parameter, value: str) -> dict[str, Any]:
    """The `--input` text as a dict: it must be a JSON object."""
    try:
        parsed = json.loads(value)
    except ValueError as error:
        raise click.BadParameter(f"not JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise click.BadParameter('a JSON object is needed, such as \'{"text": "..."}\'')
    return parsed


@click.group()
def runs() -> None:
    """Workflow runs."""


@runs.command("trigger")
@click.argument("workflow")
@click.option(
    "--input",
    "run_input",
    default="{}",
    callback=json_object,
    help="the run's input, a JSON object laid over each task's own",
)
@click.option("--agent", default="", help="pin every task of the run to this agent")
@click.option("--request-id", default=None, help="makes the call safe to repeat")
@click.option(
    "--watch", is_flag=True, help="follow the run until it ends; exit 1 unless it succeeds"
)
@operator_command
async def trigger(
    client: Client,
    out: Output,
    workflow: str,
    run_input: dict[str, Any],
    agent: str,
    request_id: str | None,
    watch: bool,
) -> int:
    """Start a run of WORKFLOW: a workflow name (its latest version) or a definition id."""
    try:
        run = await client.trigger(workflow, input=run_input, agent_id=agent, request_id=request_id)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--input") from error
    if watch:
        return await follow(client, out, run.run_id)
    return shown(out, run)


@runs.command("list")
@click.option("--state", type=click.Choice(list(STATES), case_sensitive=False), help="only these")
@click.option("--definition", default="", help="only runs of this workflow name or definition id")
@click.option("--agent", default="", help="only runs pinned to this agent")
@click.option("--page-size", type=PAGE_SIZE, default=0, help="most runs (0: 50)")
@click.option("--page-token", default="", help="the page after the one that gave this token")
@operator_command
async def list_runs(
    client: Client,
    out: Output,
    state: str | None,
    definition: str,
    agent: str,
    page_size: int,
    page_token: str,
) -> int:
    """List runs, newest first, one page."""
    by_id = is_definition_id(definition)
    page = await client.list_runs(
        state=STATES[state.lower()] if state else workflow_pb2.RUN_STATE_UNSPECIFIED,
        definition_id=definition if by_id else "",
        workflow_name="" if by_id else definition,
        agent_id=agent,
        page_size=page_size,
        page_token=page_token,
    )
    if out.json:
        out.document(render.listing("runs", page.items, page.next_page_token))
        return 0
    out.console.print(render.runs_table(page.items))
    if page.next_page_token:
        out.console.print(render.next_page(page.next_page_token))
    return 0


@runs.command("get")
@click.argument("run_id")
@operator_command
async def get_run(client: Client, out: Output, run_id: str) -> int:
    """Show one run and all its tasks."""
    run = await client.get_run(run_id)
    if run.next_task_page_token:
        run = with_tasks(run, await client.all_tasks(run))
    return shown(out, run)


@runs.command("watch")
@click.argument("run_id")
@operator_command
async def watch(client: Client, out: Output, run_id: str) -> int:
    """Follow a run until it ends: exit 0 if it succeeded, 1 otherwise."""
    return await follow(client, out, run_id)


@runs.command("cancel")
@click.argument("run_id")
@operator_command
async def cancel(client: Client, out: Output, run_id: str) -> int:
    """Cancel an unfinished run."""
    run = await client.cancel(run_id)
    return shown(out, run)


def shown(out: Output, run: workflow_pb2.WorkflowRun) -> int:
    """Print the run (as JSON, or as its view): the status of a command that succeeded."""
    if out.json:
        out.document(render.as_json(run))
    else:
        out.console.print(render.run_view(run))
    return 0
