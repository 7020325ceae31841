"""The `opscore` command: `serve` and `db upgrade`. Parses settings and hands over; nothing else."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from opscore import config, logs
from opscore.server import serve
from opscore.store import migrate
from opscore.store.database import open_database

T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opscore", description="The Ops-Core control plane.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gRPC server")
    serve_cmd.add_argument("--listen", help="host:port to bind (env OPSCORE_LISTEN)")
    serve_cmd.add_argument("--db", dest="db_url", help="database URL (env OPSCORE_DB)")
    db_cmd = commands.add_parser("db", help="database maintenance")
    db_commands = db_cmd.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply the schema migrations")
    upgrade.add_argument("--db", dest="db_url", help="database URL (env OPSCORE_DB)")
    return parser


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
    database = open_database(url)
    try:
        await migrate.upgrade(database)
    finally:
        await database.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    try:
        settings = config.load(
            listen=getattr(args, "listen", None), db_url=getattr(args, "db_url", None)
        )
        run = runner(settings.event_loop)
    except ValueError as error:
        print(f"opscore: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "db":
        asyncio.run(_upgrade(settings.db_url))
        return 0
    return run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
