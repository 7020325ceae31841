"""The `opscore` command: `serve` and `db upgrade`, which parse settings and hand over and report a
start that the world made fail (see opscore.startup) as one CRITICAL log line; and the
operator's commands `agents`, `definitions` and `runs` (opscore.commands), which talk to a
server through `opscore.client.Client`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

# gRPC's core writes a plain-text line for every failed TLS handshake, which anyone who reaches
# the port can cause: the log stays one JSON object a line. Read once, when grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import click

from opscore.commands.agents import agents
from opscore.commands.definitions import definitions
from opscore.commands.runs import runs

if TYPE_CHECKING:
    from opscore.config import Settings

# `serve` and `db` import the server's modules (the settings among them: half a second, for
# SQLAlchemy) when they run, so that the operator's commands start without them.

T = TypeVar("T")

log = logging.getLogger("opscore.cli")


def _print_version(context: click.Context, _: click.Parameter, value: bool) -> None:
    if value:
        click.echo(f"opscore {metadata.version('opscore')}")
        context.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
def opscore() -> None:
    """The Ops-Core control plane."""


@opscore.command()
@click.option("--listen", help="host:port to bind (env OPSCORE_LISTEN)")
@click.option("--db", "db_url", help="database URL (env OPSCORE_DB)")
@click.option(
    "--auth",
    type=click.Choice(["on", "off", "auto"]),
    help="require credentials (env OPSCORE_AUTH)",
)
@click.option(
    "--operator-token-file",
    help="file of operator tokens, one a line (env OPSCORE_OPERATOR_TOKEN_FILE)",
)
@click.option(
    "--registration-token-file",
    help="file of registration tokens, one a line (env OPSCORE_REGISTRATION_TOKEN_FILE)",
)
@click.option(
    "--insecure",
    is_flag=True,
    default=None,
    help="allow authentication off on an address other machines can reach",
)
@click.option("--tls-cert", help="PEM certificate (chain) to serve TLS with (env OPSCORE_TLS_CERT)")
@click.option("--tls-key", help="PEM key of --tls-cert (env OPSCORE_TLS_KEY)")
@click.option(
    "--tls-client-ca",
    help="PEM authorities whose client certificates are required (env OPSCORE_TLS_CLIENT_CA)",
)
def serve(**flags: Any) -> int:
    """Run the gRPC server."""
    from opscore.server import serve as serving  # noqa: PLC0415 - see above

    return _start(flags, lambda settings, run: run(serving(settings)))


@opscore.group()
def db() -> None:
    """Database maintenance."""


@db.command()
@click.option("--db", "db_url", help="database URL (env OPSCORE_DB)")
def upgrade(db_url: str | None) -> int:
    """Apply the schema migrations."""

    def migrate(settings: Settings, _: Callable[[Coroutine[Any, Any, Any]], Any]) -> int:
        asyncio.run(_upgrade(settings.db_url))
        return 0

    return _start({"db_url": db_url}, migrate)


opscore.add_command(agents)
opscore.add_command(definitions)
opscore.add_command(runs)


def runner(event_loop: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """How to run the server: on uvloop when asked, or by default when it is installed (its
    loop costs measurably less CPU per task than asyncio's), else on asyncio's own loop. Asking
    for uvloop where it is not installed is a ValueError."""
    if event_loop == "asyncio":
        return asyncio.run
    try:
        import uvloop  # noqa: PLC0415 - optional, imported only when it is used
    except ImportError:
        if event_loop == "uvloop":
            raise ValueError("OPSCORE_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return asyncio.run
    return uvloop.run


def _start(
    flags: dict[str, Any],
    body: Callable[[Settings, Callable[[Coroutine[Any, Any, Any]], Any]], int],
) -> int:
    """Load the settings (the environment, then `flags`), configure the log, and run `body`:
    2 for a bad setting, 1 for a start the world made fail."""
    from opscore import config, logs  # noqa: PLC0415 - see above
    from opscore.startup import StartupError  # noqa: PLC0415

    try:
        settings = config.load(os.environ, **flags)
        run = runner(settings.event_loop)
    except ValueError as error:
        print(f"opscore: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        return body(settings, run)
    except StartupError as error:
        log.critical(str(error), extra={**error.subject, "cause": error.cause})
        return 1


async def _upgrade(url: str) -> None:
    """Migrate the database, owning it meanwhile: never under a running server."""
    from opscore.startup import failing_as  # noqa: PLC0415 - see above
    from opscore.store import migrate, ownership  # noqa: PLC0415
    from opscore.store.database import name_of, open_database  # noqa: PLC0415
    from opscore.store.ownership import Holder  # noqa: PLC0415

    name = name_of(url)
    with failing_as(f"cannot upgrade the database {name}", database=name):
        async with contextlib.AsyncExitStack() as resources:
            owned = await ownership.claim(url, Holder("db upgrade"))
            resources.push_async_callback(owned.release)
            database = open_database(url)
            resources.push_async_callback(database.dispose)
            await migrate.upgrade(database)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script: the command's exit status (2 for a usage error)."""
    try:
        status = opscore.main(args=argv, prog_name="opscore", standalone_mode=False)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        return 130  # Ctrl-C at a prompt or during a command
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
