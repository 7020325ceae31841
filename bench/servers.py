"""The servers under test, each a subprocess: `opscore serve` on a database of its own, and the
ceiling (`python -m bench.ceiling`). Started, waited for until they answer SERVING on the gRPC
health service, measured (RSS), stopped with SIGTERM and killed if they linger; and a fresh
PostgreSQL database per run when OPSCORE_BENCH_POSTGRES_URL is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psutil  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2

from bench import ROOT

OPSCORE = Path(sys.executable).parent / "opscore"
"""The console script the package installs (what operators run)."""

START_WAIT = 60.0
"""Seconds a server may take to answer SERVING (a large database takes a while to recover)."""

STOP_WAIT = 20.0
"""Seconds a server may take to exit after SIGTERM before it is killed."""


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server did not start, a load process failed)."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


OPERATOR_TOKEN = "bench-operator-token-0123456789"
"""The operator token of every server the benchmark starts: Ops-Core is measured with
authentication on, as it is deployed (the ceiling ignores it)."""


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)


OPERATOR = bearer(OPERATOR_TOKEN)
"""The metadata of the benchmark's operator calls (definitions, triggers, registrations)."""


def clean_environment() -> dict[str, str]:
    """The environment without OPSCORE_* settings or PYTHONSAFEPATH, and with the operator token:
    servers run on defaults plus the flags given, and `python -m bench.ceiling` can import
    `bench` from the root."""
    kept = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OPSCORE_") and key not in ("PYTHONSAFEPATH", "PYTHONPATH")
    }
    return {**kept, "OPSCORE_OPERATOR_TOKEN": OPERATOR_TOKEN}


def is_serving(port: int, timeout: float = 0.5) -> bool:
    """Whether the server on `port` answers SERVING (a fresh channel each time, so a refused
    connection's reconnect backoff never delays the next look)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


class ServerProcess:
    """One server subprocess; `start` returns when it is SERVING, `close` makes sure it is gone."""

    def __init__(self, label: str, command: list[str], port: int, cwd: Path, log: Path) -> None:
        self.label = label
        self.command = command
        self.port = port
        self.cwd = cwd
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        """time.monotonic() just before the process was created."""

    @property
    def target(self) -> str:
        """The address clients dial."""
        return f"127.0.0.1:{self.port}"

    def spawn(self) -> None:
        """Create the process (without waiting for it to serve)."""
        with self.log.open("ab") as sink:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=clean_environment(),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )

    def wait_serving(self, timeout: float = START_WAIT) -> float:
        """Poll health (every 10 ms, bounded) until SERVING; seconds since the process was
        created. Fails if the process exits or the time runs out."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not is_serving(self.port):
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.label} exited with {self.process.returncode}: {self.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label} not SERVING within {timeout} s: {self.tail()}")
            time.sleep(0.01)
        return time.monotonic() - self.started_at

    def start(self) -> float:
        """Create the process and wait until it serves; seconds to SERVING."""
        self.spawn()
        try:
            return self.wait_serving()
        except BaseException:
            self.close()
            raise

    def rss(self) -> int:
        """Resident memory of the server process (and its children), in bytes."""
        assert self.process is not None
        process = psutil.Process(self.process.pid)
        total: int = process.memory_info().rss
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def close(self) -> None:
        """SIGTERM, wait (bounded), SIGKILL if still there; nothing if never started."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_WAIT)

    def tail(self, size: int = 2000) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""


def opscore_server(label: str, db_url: str, workdir: Path) -> ServerProcess:
    """`opscore serve` on loopback and a port of its own, on `db_url`, logging into workdir."""
    port = free_port()
    command = [str(OPSCORE), "serve", "--listen", f"127.0.0.1:{port}", "--db", db_url]
    return ServerProcess(label, command, port, workdir, workdir / f"{label}.log")


def ceiling_server(workdir: Path, preload: int = 0, label: str = "ceiling") -> ServerProcess:
    """The bare server (`python -m bench.ceiling`), run from the repository root."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.ceiling",
        "--listen",
        f"127.0.0.1:{port}",
        "--preload",
        str(preload),
    ]
    return ServerProcess(label, command, port, Path(ROOT), workdir / f"{label}.log")


def sqlite_url(path: Path) -> str:
    """The URL of a SQLite file at an absolute path."""
    return f"sqlite:///{path}"


POSTGRES_SETTINGS = ("server_version", "autovacuum", "fsync", "synchronous_commit")
"""What the benchmark records of the PostgreSQL it measured: its version, and the settings that
move Ops-Core's figures there the most (without autovacuum, statements are planned at every
execution and dead rows stay: chains at 8 agents measured 0.21 of the ceiling against 0.35)."""


def _admin_url(server_url: str) -> str:
    return urlunsplit(
        urlsplit(server_url.replace("postgresql+asyncpg://", "postgresql://"))._replace(
            scheme="postgresql"
        )
    )


async def _on_server(server_url: str, statement: str) -> Any:
    """The first value of `statement`, run on the server of `server_url`."""
    import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415 - PostgreSQL only

    connection = await asyncpg.connect(_admin_url(server_url), timeout=10)
    try:
        return await connection.fetchval(statement)
    finally:
        await connection.close()


def postgres_settings(server_url: str) -> dict[str, str]:
    """The `POSTGRES_SETTINGS` of the server of `server_url`."""
    return {
        name: str(asyncio.run(_on_server(server_url, f"SHOW {name}"))) for name in POSTGRES_SETTINGS
    }


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A fresh database on the PostgreSQL server of `server_url` for the length of the block,
    dropped afterwards (even if the server still holds connections: WITH (FORCE))."""
    name = f"opscore_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_on_server(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield urlunsplit(urlsplit(_admin_url(server_url))._replace(path=f"/{name}"))
    finally:
        asyncio.run(_on_server(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
