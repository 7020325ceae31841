"""`opscore definitions create|list|get`: workflow definitions, created from YAML or JSON files
in the definition's protobuf JSON form."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from opscore.client import Client
from opscore.commands import render
from opscore.commands.connection import PAGE_SIZE, Output, operator_command


def read_definition(path: str) -> dict[str, Any]:
    """The definition in a file: JSON if it ends in `.json`, YAML otherwise (`-`: standard
    input, as YAML, which JSON also is)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise click.BadParameter(f"cannot read {path}: {error}", param_hint="-f") from error
    try:
        loaded = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise click.BadParameter(f"{path} is not valid: {error}", param_hint="-f") from error
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"{path} does not hold a definition (an object)", param_hint="-f")
    return loaded


@click.group()
def definitions() -> None:
    """Workflow definitions."""


@definitions.command("create")
@click.option(
    "-f",
    "--file",
    "path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    help="YAML or JSON file of the definition (- for standard input)",
)
@click.option("--request-id", default=None, help="makes the call safe to repeat")
@operator_command
async def create_definition(client: Client, out: Output, path: str, request_id: str | None) -> int:
    """Create a definition (the next version of its workflow_name) from a file."""
    loaded = read_definition(path)
    try:
        created = await client.create_definition(loaded, request_id=request_id)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="-f") from error
    if out.json:
        out.document(render.as_json(created))
    else:
        out.console.print(render.definition_view(created))
    return 0


@definitions.command("list")
@click.option("--workflow", default="", help="only the versions of this workflow")
@click.option("--page-size", type=PAGE_SIZE, default=0, help="most definitions (0: 50)")
@click.option("--page-token", default="", help="the page after the one that gave this token")
@operator_command
async def list_definitions(
    client: Client, out: Output, workflow: str, page_size: int, page_token: str
) -> int:
    """List definitions, oldest first, one page."""
    page = await client.list_definitions(
        workflow_name=workflow, page_size=page_size, page_token=page_token
    )
    if out.json:
        out.document(render.listing("definitions", page.items, page.next_page_token))
        return 0
    out.console.print(render.definitions_table(page.items))
    if page.next_page_token:
        out.console.print(render.next_page(page.next_page_token))
    return 0


@definitions.command("get")
@click.argument("definition_id")
@operator_command
async def get_definition(client: Client, out: Output, definition_id: str) -> int:
    """Show one definition and its tasks."""
    definition = await client.get_definition(definition_id)
    if out.json:
        out.document(render.as_json(definition))
    else:
        out.console.print(render.definition_view(definition))
    return 0
