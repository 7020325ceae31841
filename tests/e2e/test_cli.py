"""The installed `opscore` command, run as operators run it: a separate process, configured by flags
or environment, stopped by a signal. No server runs in the test's process here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

OPSCORE = Path(sys.executable).parent / "opscore"
"""The console script the package installs."""

START_WAIT = 15.0
"""Seconds a server process may take to answer SERVING."""

STOP_WAIT = 5.0
"""Seconds a server process may take to exit after SIGTERM."""

RUN_WAIT = 30.0
"""Seconds a short command (`db upgrade`, a failing start, an import) may take."""


def clean_environment(**extra: str) -> dict[str, str]:
    """The test's environment without any OPSCORE_* setting, PYTHONPATH or PYTHONSAFEPATH, plus
    `extra`: what the command sees comes from the test alone.
    """
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OPSCORE_") and key not in ("PYTHONPATH", "PYTHONSAFEPATH")
    }
    environment.update(extra)
    return environment


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def log_events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log records in a process's standard error (every line must be one)."""
    records = []
    for line in stderr.splitlines():
        if line.strip():
            record = json.loads(line)
            assert isinstance(record, dict), line
            records.append(record)
    return records


@dataclass
class Served:
    """A running `opscore serve` process."""

    process: asyncio.subprocess.Process
    port: int
    stderr: str = ""


@asynccontextmanager
async def opscore_serve(
    args: list[str], environment: dict[str, str], cwd: Path, port: int
) -> AsyncIterator[Served]:
    """Start `opscore serve`, wait until it answers SERVING on `port`; kill it if still alive at
    the end (a test stops it itself to check how it stops).
    """
    process = await asyncio.create_subprocess_exec(
        str(OPSCORE),
        "serve",
        *args,
        cwd=cwd,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    served = Served(process, port)
    try:
        await wait_serving(served)
        yield served
    finally:
        if process.returncode is None:
            process.kill()
        try:
            _, err = await asyncio.wait_for(process.communicate(), STOP_WAIT)
            served.stderr += err.decode()
        except TimeoutError:  # pragma: no cover - only if the process is stuck beyond kill
            pass


async def wait_serving(served: Served) -> None:
    """Poll the health service (bounded) until the server answers SERVING."""
    request = health_pb2.HealthCheckRequest(service="")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT
        while True:
            if served.process.returncode is not None:
                _, err = await served.process.communicate()
                raise AssertionError(
                    f"opscore serve exited with {served.process.returncode}: {err.decode()}"
                )
            try:
                response = await health.Check(request, timeout=1.0)
            except grpc.aio.AioRpcError:
                response = None
            if response is not None and response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            assert loop.time() < deadline, f"no SERVING answer within {START_WAIT} s"
            await asyncio.sleep(0.1)


async def stop_with_sigterm(served: Served) -> int:
    """Send SIGTERM, wait (bounded) for the exit; its exit status. Stderr is kept on `served`."""
    served.process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(served.process.communicate(), STOP_WAIT)
    served.stderr += err.decode()
    assert served.process.returncode is not None
    return served.process.returncode


def run_command(
    args: list[str], environment: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run a short command to its end (bounded)."""
    return subprocess.run(
        args,
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_WAIT,
        check=False,
    )


async def run_async(args: list[str], environment: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run a short command to its end (bounded) as an asyncio subprocess: status and stderr."""
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), RUN_WAIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


def tables_of(database: Path) -> set[str]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    connection.close()
    return {name for (name,) in rows}


def test_console_script_is_installed() -> None:
    assert OPSCORE.is_file(), f"{OPSCORE} is missing: run `make .venv/.dev`"


async def test_serve_with_flags_starts_logs_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "x.db"
    async with opscore_serve(
        ["--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{database}"],
        clean_environment(),
        tmp_path,
        port,
    ) as served:
        assert database.is_file()
        code = await stop_with_sigterm(served)

    assert code == 0, served.stderr
    events = log_events(served.stderr)
    names = [record.get("event") for record in events]
    assert "server started" in names, served.stderr
    assert "server stopped" in names, served.stderr
    assert names.index("server started") < names.index("server stopped")
    started = events[names.index("server started")]
    assert started["port"] == port
    assert started["level"] == "INFO"
    assert {"tasks", "alembic_version"} <= tables_of(database)


async def test_serve_takes_its_settings_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "env.db"
    environment = clean_environment(
        OPSCORE_LISTEN=f"127.0.0.1:{port}", OPSCORE_DB=f"sqlite:///{database}"
    )
    async with opscore_serve([], environment, tmp_path, port) as served:
        assert database.is_file()
        assert not (tmp_path / "opscore.db").exists(), "the default database was used"
        code = await stop_with_sigterm(served)

    assert code == 0, served.stderr
    names = [record.get("event") for record in log_events(served.stderr)]
    assert "server started" in names
    assert "server stopped" in names


def test_db_upgrade_creates_the_tables(tmp_path: Path) -> None:
    database = tmp_path / "y.db"
    result = run_command(
        [str(OPSCORE), "db", "upgrade", "--db", f"sqlite:///{database}"],
        clean_environment(),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    tables = tables_of(database)
    assert "tasks" in tables
    assert "alembic_version" in tables
    with sqlite3.connect(database) as connection:
        (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    connection.close()
    assert version


async def test_bad_environment_values_exit_with_2(tmp_path: Path) -> None:
    bad = {"OPSCORE_SHUTDOWN_GRACE": "abc", "OPSCORE_LOG_FORMAT": "xml"}
    database = tmp_path / "z.db"

    async def start_with(variable: str, value: str) -> tuple[int, str]:
        return await run_async(
            [
                str(OPSCORE),
                "serve",
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--db",
                f"sqlite:///{database}",
            ],
            clean_environment(**{variable: value}),
            tmp_path,
        )

    # Both at once: each is a whole interpreter start-up.
    results = await asyncio.gather(*(start_with(name, value) for name, value in bad.items()))
    for (variable, value), (code, stderr) in zip(bad.items(), results, strict=True):
        assert code == 2, (variable, stderr)
        assert stderr.startswith("opscore: "), stderr
        assert value in stderr, stderr
        assert "Traceback" not in stderr
    assert "OPSCORE_SHUTDOWN_GRACE" in results[0][1]
    assert not database.exists(), "a server went on despite the bad setting"


def test_installed_package_resolves_opscore_v1_outside_the_repository(tmp_path: Path) -> None:
    result = run_command(
        [
            sys.executable,
            "-c",
            "import opscore.v1.workflow_service_pb2_grpc as m, opscore.domain.engine; "
            "print(m.__file__)",
        ],
        clean_environment(),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    location = Path(result.stdout.strip())
    assert location.name == "workflow_service_pb2_grpc.py"
    assert location.parent.name == "v1"
    assert location.parent.parent.name == "opscore"
    assert location.is_file()
    assert tmp_path not in location.parents
