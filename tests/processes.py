"""`opscore serve` as a separate process, run as operators run it: the installed console script,
on a port of its own, configured by flags and an environment the test chooses alone, its standard
error (the JSON log) appended to a file. No server runs in the test's process here.

    async with ServerProcess.on_sqlite(database, free_port(), log) as server:
        ...  # it answers SERVING; stop it with server.terminate() or server.kill()
    records = server.log_records()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import auth
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

OPSCORE = Path(sys.executable).parent / "opscore"
"""The console script the package installs."""

START_WAIT = 15.0
"""Seconds a server process may take to answer SERVING."""

STOP_WAIT = 5.0
"""Seconds a server process may take to exit after a signal."""

SERVING = health_pb2.HealthCheckResponse.SERVING


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


ROOT = Path(__file__).resolve().parents[1]
"""The repository root, from which `python -m bench` finds the `bench` package."""


def run_from_root(
    *arguments: str, timeout: float = 120.0, environment: dict[str, str] | None = None
) -> str:
    """`python *arguments` from the repository root in a clean environment (plus
    `environment`); its standard output once it has exited with status 0 (else the test fails
    with everything it printed)."""
    completed = subprocess.run(
        [sys.executable, *arguments],
        cwd=ROOT,
        env=clean_environment(**(environment or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


RUN_WAIT = 30.0
"""Seconds a short command (`db upgrade`, a failing start, an import) may take."""


async def run_async(
    args: list[str], environment: dict[str, str], cwd: Path, timeout: float = RUN_WAIT
) -> tuple[int, str]:
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
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def health_status(port: int) -> int | None:
    """The overall health status of the server on `port`, or None if nothing answers."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return None
        return int(response.status)


def log_records(text: str, *, strict: bool = True) -> list[dict[str, Any]]:
    """The JSON records of a server's log. With `strict`, every line that is not blank must be a
    JSON object; without it, any other line is passed over (a killed server may leave its last
    line cut).
    """
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        if strict:
            if line.strip():
                record = json.loads(line)
                assert isinstance(record, dict), line
                records.append(record)
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


class ServerProcess:
    """One `opscore serve` process: started, waited for until it answers SERVING, signalled,
    and killed at the end if it is still alive. As an async context manager it is started on
    entry and closed (killed if alive) on exit.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        port: int,
        log: Path,
        cwd: Path,
        environment: Mapping[str, str],
    ) -> None:
        """`opscore serve *args`, which must listen on `port`, run in `cwd` with exactly
        `environment`; its standard error is appended to `log`."""
        self.args = list(args)
        self.port = port
        self.log = log
        self.cwd = cwd
        self.environment = dict(environment)
        self._process: asyncio.subprocess.Process | None = None

    @classmethod
    def on_sqlite(cls, database: Path, port: int, log: Path, **settings: str) -> ServerProcess:
        """`opscore serve --listen 127.0.0.1:<port> --db sqlite:///<database>`, run in the
        database's folder, in a clean environment plus `settings` (OPSCORE_* variables)."""
        return cls.on_url(f"sqlite:///{database}", port, log, database.parent, **settings)

    @classmethod
    def on_url(cls, url: str, port: int, log: Path, cwd: Path, **settings: str) -> ServerProcess:
        """`opscore serve --listen 127.0.0.1:<port> --db <url>`, run in `cwd`, in a clean
        environment plus `settings` (OPSCORE_* variables), with authentication on (the
        operator token of tests/auth.py) unless `settings` say otherwise."""
        return cls(
            ["--listen", f"127.0.0.1:{port}", "--db", url],
            port=port,
            log=log,
            cwd=cwd,
            environment=clean_environment(**{**auth.ENVIRONMENT, **settings}),
        )

    @property
    def process(self) -> asyncio.subprocess.Process:
        """The running (or exited) process; the server must have been started."""
        assert self._process is not None, "the server process was never started"
        return self._process

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while the process runs (or was never started)."""
        return None if self._process is None else self._process.returncode

    async def start(self) -> None:
        """Start the process and wait until it answers SERVING; if it does not, kill it and
        fail the test."""
        with self.log.open("ab") as sink:
            self._process = await asyncio.create_subprocess_exec(
                str(OPSCORE),
                "serve",
                *self.args,
                cwd=self.cwd,
                env=self.environment,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=sink,
            )
        try:
            await self.wait_serving()
        except BaseException:
            await self.close()
            raise

    async def wait_serving(self, timeout: float = START_WAIT) -> None:
        """Poll the health service (bounded) until the server answers SERVING; fails the test if
        the process exits first or `timeout` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await health_status(self.port) != SERVING:
            assert self.returncode is None, (
                f"opscore serve exited with {self.returncode}: {self.log_text()}"
            )
            assert loop.time() < deadline, (
                f"no SERVING answer within {timeout} s: {self.log_text()}"
            )
            await asyncio.sleep(0.05)

    def terminate(self) -> None:
        """Send SIGTERM: the server drains and exits."""
        self.process.terminate()

    def kill(self) -> None:
        """Send SIGKILL: the server is gone at once, whatever it was doing."""
        self.process.kill()

    async def wait(self, timeout: float = STOP_WAIT) -> int:
        """Wait (bounded) for the process to exit; its exit status."""
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def close(self) -> None:
        """Kill the process if it is still alive, and wait (bounded) until it is gone. Does
        nothing if it was never started."""
        if self._process is None:
            return
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        await self.wait()

    def log_text(self) -> str:
        """The log so far (of every process that appended to the same file)."""
        return self.log.read_text(errors="replace")

    def log_records(self, *, strict: bool = True) -> list[dict[str, Any]]:
        """The JSON records of the log so far (see `log_records`)."""
        return log_records(self.log_text(), strict=strict)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
