"""The `opscore` command: `serve` and `db upgrade`. Parses settings and hands over, and reports a
start that the world made fail (see opscore.startup) as one CRITICAL log line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from importlib import metadata
from typing import Any, TypeVar

# gRPC's core writes a plain-text line for every failed TLS handshake, which anyone who reaches
# the port can cause: the log stays one JSON object a line. Read once, when grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from opscore import config, logs
from opscore.server import serve
from opscore.startup import StartupError, failing_as
from opscore.store import migrate, ownership
from opscore.store.database import name_of, open_database
from opscore.store.ownership import Holder

T = TypeVar("T")

log = logging.getLogger("opscore.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opscore", description="The Ops-Core control plane.")
    version = f"%(prog)s {metadata.version('opscore')}"
    parser.add_argument("--version", action="version", version=version)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gRPC server")
    serve_cmd.add_argument("--listen", help="host:port to bind (env OPSCORE_LISTEN)")
    serve_cmd.add_argument("--db", dest="db_url", help="database URL (env OPSCORE_DB)")
    serve_cmd.add_argument(
        "--auth", choices=("on", "off", "auto"), help="require credentials (env OPSCORE_AUTH)"
    )
    serve_cmd.add_argument(
        "--operator-token-file",
        help="file of operator tokens, one a line (env OPSCORE_OPERATOR_TOKEN_FILE)",
    )
    serve_cmd.add_argument(
        "--registration-token-file",
        help="file of registration tokens, one a line (env OPSCORE_REGISTRATION_TOKEN_FILE)",
    )
    serve_cmd.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="allow authentication off on an address other machines can reach",
    )
    serve_cmd.add_argument(
        "--tls-cert", help="PEM certificate (chain) to serve TLS with (env OPSCORE_TLS_CERT)"
    )
    serve_cmd.add_argument("--tls-key", help="PEM key of --tls-cert (env OPSCORE_TLS_KEY)")
    serve_cmd.add_argument(
        "--tls-client-ca",
        help="PEM authorities whose client certificates are required (env OPSCORE_TLS_CLIENT_CA)",
    )
    db_cmd = commands.add_parser("db", help="database maintenance")
    db_commands = db_cmd.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply the schema migrations")
    upgrade.add_argument("--db", dest="db_url", help="database URL (env OPSCORE_DB)")
    return parser


_SERVE_FLAGS = (
    "listen",
    "db_url",
    "auth",
    "operator_token_file",
    "registration_token_file",
    "insecure",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
)
"""The flags of `serve` (and `db upgrade`, which has some of them) that override settings."""


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


async def _upgrade(url: str) -> None:
    """Migrate the database, owning it meanwhile: never under a running server."""
    name = name_of(url)
    with failing_as(f"cannot upgrade the database {name}", database=name):
        async with contextlib.AsyncExitStack() as resources:
            owned = await ownership.claim(url, Holder("db upgrade"))
            resources.push_async_callback(owned.release)
            database = open_database(url)
            resources.push_async_callback(database.dispose)
            await migrate.upgrade(database)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    try:
        flags = {flag: getattr(args, flag, None) for flag in _SERVE_FLAGS}
        settings = config.load(os.environ, **flags)
        run = runner(settings.event_loop)
    except ValueError as error:
        print(f"opscore: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        if args.command == "db":
            asyncio.run(_upgrade(settings.db_url))
            return 0
        return run(serve(settings))
    except StartupError as error:
        log.critical(str(error), extra={**error.subject, "cause": error.cause})
        return 1


if __name__ == "__main__":
    sys.exit(main())
