"""The servers under test, each a subprocess: `opscore serve` on a database of its own, several
of them on one PostgreSQL database (replicas), and the ceiling (`python -m bench.ceiling`).
Started, waited for until they answer SERVING on the gRPC health service, measured (RSS and CPU
time from /proc), stopped with SIGTERM and killed if they linger; a fresh PostgreSQL database per
run when OPSCORE_BENCH_POSTGRES_URL is set, and what that database did (commits, statements or
rows, its connections' CPU time) between two looks.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import grpc
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


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/PID/status), in bytes; 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""The unit of the CPU times in /proc/PID/stat, per second."""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (/proc/PID/stat), in seconds; 0 once it is
    gone. Its threads are included, its children are not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) is in parentheses and may hold spaces: count after the last ")".
    # Fields 14 and 15, utime and stime, are then the 12th and 13th.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """The process ids of a process's children, and theirs (every thread's list in /proc)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    found += [int(child), *children(int(child))]
    return found


class Deployment(Protocol):
    """What the scenarios start, drive and stop: one server, or several replicas of one."""

    label: str

    @property
    def target(self) -> str:
        """The address operator calls go to (definitions, single-target steps)."""

    @property
    def targets(self) -> list[str]:
        """Every address it serves on; agents and triggers are spread over them in turn."""

    def start(self) -> float:
        """Start it; returns once it serves."""

    def close(self) -> None:
        """Make sure it is gone."""


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

    @property
    def targets(self) -> list[str]:
        """Its one address (a `Deployment` of one server)."""
        return [self.target]

    @property
    def pid(self) -> int:
        """Its process id (it must have been started)."""
        assert self.process is not None
        return self.process.pid

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
        return sum(rss_bytes(pid) for pid in (self.pid, *children(self.pid)))

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server process has used so far, in seconds."""
        return cpu_seconds(self.pid)

    def terminate(self) -> None:
        """SIGTERM, without waiting; nothing if it is not running."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """SIGTERM, wait (bounded), SIGKILL if still there; nothing if never started."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        self.terminate()
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


class Replicas:
    """`opscore serve` processes on one PostgreSQL database, each on a port of its own: the first
    is started alone (it migrates the schema), the others together once it serves. Stopped
    together: SIGTERM to each, then a bounded wait for each."""

    def __init__(self, label: str, count: int, db_url: str, workdir: Path) -> None:
        self.label = label
        self.servers = [
            opscore_server(f"{label}-{index}", db_url, workdir) for index in range(count)
        ]

    @property
    def target(self) -> str:
        """The first replica's address."""
        return self.servers[0].target

    @property
    def targets(self) -> list[str]:
        """Every replica's address, the first first."""
        return [server.target for server in self.servers]

    def start(self) -> float:
        """Start the first, then the others; seconds until the last serves."""
        started = time.monotonic()
        try:
            self.servers[0].start()
            for server in self.servers[1:]:
                server.spawn()
            for server in self.servers[1:]:
                server.wait_serving()
        except BaseException:
            self.close()
            raise
        return time.monotonic() - started

    def cpu_seconds(self) -> list[float]:
        """Each replica's CPU time so far, in seconds."""
        return [server.cpu_seconds() for server in self.servers]

    def close(self) -> None:
        """Stop every replica (see the class docstring)."""
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            server.close()


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


@dataclass(frozen=True, slots=True)
class Activity:
    """What one PostgreSQL database has done so far, as its statistics say at one look: the
    counters only move forward, and what happened between two looks is their difference
    (`minus`). A backend reports its counters to the statistics at most once a second while it
    is busy, and within ten seconds of going idle or at once when it exits: a look sees
    everything only that long after the work, or after its connections closed."""

    commits: int
    """Transactions committed (pg_stat_database.xact_commit)."""
    rollbacks: int
    """Transactions rolled back (pg_stat_database.xact_rollback)."""
    statements: int | None
    """Statements run, transaction control (BEGIN, COMMIT, ...) left out, from
    pg_stat_statements; None where that is not loaded."""
    rows_written: int
    """Rows inserted, updated and deleted in its tables (pg_stat_user_tables n_tup_ins,
    n_tup_upd, n_tup_del)."""
    scans: int
    """Scans of its tables, sequential and by index (pg_stat_user_tables seq_scan, idx_scan)."""
    cpu: dict[int, float] = field(default_factory=dict)
    """CPU seconds used so far by each backend connected to it (/proc/PID/stat), by pid."""

    def minus(self, before: Activity) -> dict[str, float]:
        """What happened since `before`, by counter (statements only where both counted them)."""
        happened = {
            "commits": float(self.commits - before.commits),
            "rollbacks": float(self.rollbacks - before.rollbacks),
            "rows_written": float(self.rows_written - before.rows_written),
            "scans": float(self.scans - before.scans),
        }
        if self.statements is not None and before.statements is not None:
            happened["statements"] = float(self.statements - before.statements)
        return happened

    def cpu_since(self) -> float:
        """CPU seconds the backends connected at this look have used since, those still there
        (one that closed meanwhile is not counted: a pool keeps its connections)."""
        used = 0.0
        for pid, before in self.cpu.items():
            now = cpu_seconds(pid)
            if now >= before:
                used += now - before
        return used


STATEMENTS = """
    SELECT sum(calls)::bigint FROM pg_stat_statements
    WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND query !~* '^\\s*(begin|commit|rollback|start transaction|savepoint|release|end)\\M'
"""
"""The statements run in this database, transaction control left out (pg_stat_statements)."""


async def _activity(db_url: str) -> Activity:
    """One look at the database of `db_url` (see `Activity`)."""
    import asyncpg  # noqa: PLC0415 - PostgreSQL only

    connection = await asyncpg.connect(_admin_url(db_url), timeout=10)
    try:
        database = await connection.fetchrow(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        tables = await connection.fetchrow(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint AS written, "
            "coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0)::bigint AS scans "
            "FROM pg_stat_user_tables"
        )
        pids = await connection.fetch(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        statements: int | None = None
        if await connection.fetchval(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'"
        ):
            with contextlib.suppress(asyncpg.PostgresError):
                statements = int(await connection.fetchval(STATEMENTS) or 0)
    finally:
        await connection.close()
    return Activity(
        commits=int(database["xact_commit"]),
        rollbacks=int(database["xact_rollback"]),
        statements=statements,
        rows_written=int(tables["written"]),
        scans=int(tables["scans"]),
        cpu={row["pid"]: cpu_seconds(row["pid"]) for row in pids},
    )


def activity(db_url: str) -> Activity:
    """One look at what the database of `db_url` has done so far (see `Activity`)."""
    return asyncio.run(_activity(db_url))


async def _count_statements(db_url: str) -> bool:
    import asyncpg  # noqa: PLC0415 - PostgreSQL only

    connection = await asyncpg.connect(_admin_url(db_url), timeout=10)
    try:
        try:
            await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        except asyncpg.PostgresError:  # not installed, or no right to create it
            return False
        try:
            await connection.fetchval(STATEMENTS)
        except asyncpg.PostgresError:  # installed, not loaded
            await connection.execute("DROP EXTENSION pg_stat_statements")
            return False
        return True
    finally:
        await connection.close()


def count_statements(db_url: str) -> bool:
    """Whether the statements run in the database of `db_url` can be counted: pg_stat_statements
    is created in it when the server has it loaded (`shared_preload_libraries`), and left out
    otherwise (`Activity.statements` is then None)."""
    return asyncio.run(_count_statements(db_url))
