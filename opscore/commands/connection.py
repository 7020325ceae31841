"""What every operator command shares: the options that say how to reach the server (the SDK's
settings: addresses, operator token, TLS) and how to print, and the running of the command's
coroutine with a `Client`, a refusal reported on standard error as exit status 1."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import click
from rich.console import Console

from opscore.client import Client, OpsCoreError, Tls

DEFAULT_ADDRESS = "localhost:50051"

Command = Callable[..., Coroutine[Any, Any, int]]
"""An operator command's body: `async def body(client, out, **its_arguments) -> status`."""


@dataclass(frozen=True)
class Output:
    """Where and how a command prints: `json` (one document, for scripts) or tables."""

    json: bool
    console: Console

    def document(self, value: object) -> None:
        """Print one JSON document on a line of its own (flushed: a watch's lines are read
        as they come)."""
        click.echo(json.dumps(value))


PAGE_SIZE = click.IntRange(0, 2**31 - 1)
"""A `--page-size`: the field is an int32 (the server reads more than 1,000 as 1,000)."""


def _token(_context: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A token goes into a header: printable ASCII without spaces, or gRPC cannot send it."""
    if value and not (value.isascii() and value.isprintable() and " " not in value):
        raise click.BadParameter("a token is printable ASCII without spaces")
    return value


_OPTIONS = [
    click.option(
        "--address",
        envvar="OPSCORE_ADDRESS",
        default=DEFAULT_ADDRESS,
        show_default=True,
        help="host:port of the server, or several (replicas), comma-separated "
        "(env OPSCORE_ADDRESS)",
    ),
    click.option(
        "--token",
        envvar="OPSCORE_TOKEN",
        callback=_token,
        help="operator token (env OPSCORE_TOKEN)",
    ),
    click.option(
        "--tls", is_flag=True, help="use TLS, trusting the system's certificate authorities"
    ),
    click.option(
        "--tls-ca",
        envvar="OPSCORE_TLS_CA",
        type=click.Path(exists=True, dir_okay=False),
        help="use TLS, trusting the PEM authorities of this file (env OPSCORE_TLS_CA)",
    ),
    click.option(
        "--tls-client-cert",
        envvar="OPSCORE_TLS_CLIENT_CERT",
        type=click.Path(exists=True, dir_okay=False),
        help="PEM client certificate, for mutual TLS (env OPSCORE_TLS_CLIENT_CERT)",
    ),
    click.option(
        "--tls-client-key",
        envvar="OPSCORE_TLS_CLIENT_KEY",
        type=click.Path(exists=True, dir_okay=False),
        help="PEM key of --tls-client-cert (env OPSCORE_TLS_CLIENT_KEY)",
    ),
    click.option(
        "--output",
        "-o",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="tables for people, or JSON for scripts",
    ),
]


def operator_command(body: Command) -> Callable[..., int]:
    """A click command's callback made of `body`: it takes the connection and output options,
    opens a `Client`, runs `body(client, out, **arguments)`, and returns its status; a refusal
    is printed on standard error (as JSON with `--output json`) and is status 1."""

    @functools.wraps(body)
    def command(
        address: str,
        token: str | None,
        tls: bool,
        tls_ca: str | None,
        tls_client_cert: str | None,
        tls_client_key: str | None,
        output: str,
        **arguments: Any,
    ) -> int:
        addresses = [part.strip() for part in address.split(",") if part.strip()]
        if not addresses:
            raise click.BadParameter("no address given", param_hint="--address")
        try:
            secure = (
                Tls(tls_ca, tls_client_cert, tls_client_key)
                if tls or tls_ca or tls_client_cert or tls_client_key
                else None
            )
        except ValueError as error:
            raise click.UsageError(str(error)) from error
        out = Output(json=output == "json", console=Console())

        async def run() -> int:
            async with Client(addresses, token=token or None, tls=secure) as client:
                return await body(client, out, **arguments)

        try:
            return asyncio.run(run())
        except OpsCoreError as error:
            _report(error, out.json)
            return 1

    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def _report(error: OpsCoreError, as_json: bool) -> None:
    """A refusal on standard error: its code, message, and the details the server gave."""
    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    if as_json:
        errors.out(
            json.dumps(
                {
                    "code": error.code.name,
                    "message": error.message,
                    "reason": error.reason,
                    "metadata": error.metadata,
                    "violations": [
                        {"field": v.field, "description": v.description} for v in error.violations
                    ],
                }
            )
        )
        return
    errors.print(f"opscore: {error.code.name}: {error.message}", markup=False)
    if error.reason and error.reason != error.code.name:
        errors.print(f"  reason: {error.reason}", markup=False)
    for violation in error.violations:
        line = f"{violation.field}: {violation.description}"
        if line not in error.message:  # the server's message names the first ones already
            errors.print(f"  {line}", markup=False)
