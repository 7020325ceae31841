"""The installed `opscore` command, run as operators run it: a separate process, configured by flags
or environment, stopped by a signal. No server runs in the test's process here.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from processes import (
    OPSCORE,
    ROOT,
    RUN_WAIT,
    ServerProcess,
    clean_environment,
    free_port,
    run_async,
)


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
    async with ServerProcess.on_sqlite(database, port, tmp_path / "serve.log") as server:
        assert database.is_file()
        server.terminate()
        code = await server.wait()

    assert code == 0, server.log_text()
    events = server.log_records()
    names = [record.get("event") for record in events]
    assert "server started" in names, server.log_text()
    assert "server stopped" in names, server.log_text()
    assert names.index("server started") < names.index("server stopped")
    started = events[names.index("server started")]
    assert started["port"] == port
    assert started["level"] == "INFO"
    assert {"tasks", "alembic_version"} <= tables_of(database)


async def test_serving_open_on_loopback_says_so_first(tmp_path: Path) -> None:
    """`make serve`'s case: no token, on localhost. It serves, and its first line says it is
    open to anyone who can reach the address."""
    port = free_port()
    open_server = ServerProcess.on_sqlite(
        tmp_path / "open.db", port, tmp_path / "serve.log", OPSCORE_OPERATOR_TOKEN=""
    )
    async with open_server as server:
        server.terminate()
        assert await server.wait() == 0, server.log_text()
    first = server.log_records()[0]
    assert (first["level"], first["event"]) == (
        "WARNING",
        "authentication is off: every call is open to anyone who can reach the address",
    )


async def test_serve_takes_its_settings_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "env.db"
    environment = clean_environment(
        OPSCORE_LISTEN=f"127.0.0.1:{port}", OPSCORE_DB=f"sqlite:///{database}"
    )
    async with ServerProcess(
        [], port=port, log=tmp_path / "serve.log", cwd=tmp_path, environment=environment
    ) as server:
        assert database.is_file()
        assert not (tmp_path / "opscore.db").exists(), "the default database was used"
        server.terminate()
        code = await server.wait()

    assert code == 0, server.log_text()
    names = [record.get("event") for record in server.log_records()]
    assert "server started" in names
    assert "server stopped" in names


@pytest.mark.parametrize(("chosen", "expected"), [(None, "uvloop"), ("asyncio", "asyncio")])
async def test_serve_runs_on_uvloop_when_installed_unless_told_otherwise(
    tmp_path: Path, chosen: str | None, expected: str
) -> None:
    port = free_port()
    settings = {} if chosen is None else {"OPSCORE_EVENT_LOOP": chosen}
    server = ServerProcess.on_sqlite(tmp_path / "loop.db", port, tmp_path / "serve.log", **settings)
    async with server:  # answers SERVING once started
        server.terminate()
        assert await server.wait() == 0, server.log_text()
    [started] = [r for r in server.log_records() if r.get("event") == "server started"]
    assert started["event_loop"] == expected
    assert started["protobuf"] == "upb"


async def test_serve_warns_when_protobuf_runs_in_pure_python(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess.on_sqlite(
        tmp_path / "pb.db",
        port,
        tmp_path / "serve.log",
        PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python",
    )
    async with server:  # it serves all the same
        server.terminate()
        assert await server.wait() == 0, server.log_text()
    records = server.log_records()
    [started] = [r for r in records if r.get("event") == "server started"]
    assert started["protobuf"] == "python"
    [warning] = [r for r in records if "pure-Python" in str(r.get("event"))]
    assert warning["level"] == "WARNING"


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


def test_every_package_of_the_source_tree_is_installed(tmp_path: Path) -> None:
    """pyproject.toml lists the packages one by one (that is how `opscore.v1` maps onto
    generated/): a package added to the tree but not to that list would be missing from every
    install, while the tests, run from the repository, might not notice."""
    packages = sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "opscore").rglob("__init__.py")
    )
    assert "opscore.store.queries" in packages
    result = run_command(
        [
            sys.executable,
            "-c",
            f"import importlib\nfor name in {packages!r}: importlib.import_module(name)",
        ],
        clean_environment(),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
