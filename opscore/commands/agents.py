"""`opscore agents list|get`: the registered agents."""

from __future__ import annotations

import click

from opscore.client import Client
from opscore.commands import render
from opscore.commands.connection import PAGE_SIZE, Output, operator_command
from opscore.v1 import agent_pb2

STATES = {
    "idle": agent_pb2.AGENT_STATE_IDLE,
    "busy": agent_pb2.AGENT_STATE_BUSY,
    "error": agent_pb2.AGENT_STATE_ERROR,
    "offline": agent_pb2.AGENT_STATE_OFFLINE,
}


@click.group()
def agents() -> None:
    """The registered agents."""


@agents.command("list")
@click.option("--state", type=click.Choice(list(STATES), case_sensitive=False), help="only these")
@click.option("--capability", default="", help="only agents offering this capability")
@click.option("--page-size", type=PAGE_SIZE, default=0, help="most agents (0: 50)")
@click.option("--page-token", default="", help="the page after the one that gave this token")
@operator_command
async def list_agents(
    client: Client,
    out: Output,
    state: str | None,
    capability: str,
    page_size: int,
    page_token: str,
) -> int:
    """List agents, in agent_id order, one page."""
    page = await client.list_agents(
        state=STATES[state.lower()] if state else agent_pb2.AGENT_STATE_UNSPECIFIED,
        capability=capability,
        page_size=page_size,
        page_token=page_token,
    )
    if out.json:
        out.document(render.listing("agents", page.items, page.next_page_token))
        return 0
    out.console.print(render.agents_table(page.items))
    if page.next_page_token:
        out.console.print(render.next_page(page.next_page_token))
    return 0


@agents.command("get")
@click.argument("agent_id")
@operator_command
async def get_agent(client: Client, out: Output, agent_id: str) -> int:
    """Show one agent."""
    agent = await client.get_agent(agent_id)
    if out.json:
        out.document(render.as_json(agent))
    else:
        out.console.print(render.agent_fields(agent))
    return 0
