"""Settings from the environment and flags, and the `opscore` command run in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import sqlite3
import sys
from collections.abc import Iterator
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import pytest

from opscore import cli, config, logs
from opscore.domain.engine import EngineSettings
from opscore.domain.health import FAILURES_TO_UNHEALTHY
from opscore.domain.membership import MembershipSettings
from opscore.domain.retry import ResolvedRetryPolicy
from opscore.store import ownership
from opscore.streams import StreamLimits


@pytest.fixture(autouse=True)
def keep_root_logging() -> Iterator[None]:
    """`opscore` configures the root logger; give the test run its own back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_environment_then_flags_override_defaults() -> None:
    settings = config.load(
        {
            "OPSCORE_LISTEN": "0.0.0.0:1",
            "OPSCORE_DEFAULT_TASK_TIMEOUT": "90",
            "OPSCORE_LOG_FORMAT": "text",
        },
        listen="127.0.0.1:2",
        db_url=None,
    )
    assert settings.listen == "127.0.0.1:2"
    assert settings.db_url == config.DEFAULT_DB
    assert settings.default_task_timeout == timedelta(seconds=90)
    assert settings.log_format == "text"


def test_storage_settings_come_from_the_environment() -> None:
    settings = config.load(
        {"OPSCORE_STORAGE_FAILURE_THRESHOLD": "5", "OPSCORE_SQLITE_FREE_SPACE_RESERVE": "0"}
    )
    assert (settings.storage_failure_threshold, settings.sqlite_free_space_reserve) == (5, 0)
    assert config.Settings().sqlite_free_space_reserve == 64 << 20


def test_backpressure_settings_come_from_the_environment() -> None:
    settings = config.load(
        {
            "OPSCORE_STREAM_BUFFER_MESSAGES": "8",
            "OPSCORE_STREAM_BUFFER_BYTES": "65536",
            "OPSCORE_STREAM_STALL_TIMEOUT": "2.5",
            "OPSCORE_QUARANTINE_LEASE_EXPIRIES": "5",
        }
    )
    assert settings.streams == StreamLimits(max_messages=8, max_bytes=65536, stall_timeout=2.5)
    assert settings.quarantine_after == 5
    assert (config.Settings().streams, config.Settings().quarantine_after) == (StreamLimits(), 3)


def test_unset_settings_give_the_domain_its_own_defaults() -> None:
    settings = config.load({})
    # Where it listens is the deployment's own, not a default of the domain.
    engine = dataclasses.replace(settings.engine(), replicas=MembershipSettings())
    assert engine == EngineSettings()
    assert settings.engine().replicas.lease == MembershipSettings().lease
    assert settings.retry == ResolvedRetryPolicy()
    assert settings.storage_failure_threshold == FAILURES_TO_UNHEALTHY


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OPSCORE_SHUTDOWN_GRACE", "soon"),
        ("OPSCORE_MAX_MESSAGE_BYTES", "1.5"),
        ("OPSCORE_LOG_FORMAT", "xml"),
        ("OPSCORE_EVENT_LOOP", "trio"),
        ("OPSCORE_STORAGE_FAILURE_THRESHOLD", "0"),
        ("OPSCORE_SQLITE_FREE_SPACE_RESERVE", "-1"),
        ("OPSCORE_STREAM_BUFFER_MESSAGES", "0"),
        ("OPSCORE_STREAM_STALL_TIMEOUT", "never"),
        ("OPSCORE_QUARANTINE_LEASE_EXPIRIES", "0"),
    ],
)
def test_bad_values_are_refused_by_name(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=value):
        config.load({variable: value})


def test_db_upgrade_command_creates_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "cli.db"
    assert cli.main(["db", "upgrade", "--db", f"sqlite:///{path}"]) == 0
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert {"agents", "definitions", "runs", "tasks", "alembic_version"} <= tables


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"opscore {metadata.version('opscore')}\n"


def critical_line(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """The one line a refused command writes to standard error, which must be CRITICAL."""
    [line] = capsys.readouterr().err.splitlines()
    record: dict[str, str] = json.loads(line)
    assert record["level"] == "CRITICAL", record
    return record


def test_db_upgrade_of_a_held_database_exits_with_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'held.db'}"
    held = asyncio.run(ownership.claim(url, ownership.Holder("serve", "127.0.0.1:7070")))
    try:
        assert cli.main(["db", "upgrade", "--db", url]) == 1
    finally:
        asyncio.run(held.release())
    record = critical_line(capsys)
    assert record["database"] == str(tmp_path / "held.db")
    assert "127.0.0.1:7070" in record["cause"]
    assert not (tmp_path / "held.db").exists()


def test_serve_on_a_taken_address_exits_with_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSCORE_OPERATOR_TOKEN", "an-operator-token-of-some-length")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        assert (
            cli.main(["serve", "--listen", listen, "--db", f"sqlite:///{tmp_path / 'x.db'}"]) == 1
        )
    record = critical_line(capsys)
    assert record["address"] == listen
    assert record["event"].startswith(f"cannot listen on {listen}: ")


def test_a_bad_setting_exits_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPSCORE_SHUTDOWN_GRACE", "never")
    assert cli.main(["serve"]) == 2
    assert "OPSCORE_SHUTDOWN_GRACE" in capsys.readouterr().err


def test_the_event_loop_is_uvloop_when_installed_unless_asked_otherwise() -> None:
    import uvloop  # noqa: PLC0415 - installed with the dev dependencies

    assert cli.runner("auto") is uvloop.run
    assert cli.runner("uvloop") is uvloop.run
    assert cli.runner("asyncio") is asyncio.run


def test_without_uvloop_the_default_loop_serves_and_asking_for_uvloop_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert cli.runner("auto") is asyncio.run
    monkeypatch.setenv("OPSCORE_EVENT_LOOP", "uvloop")
    assert cli.main(["serve"]) == 2
    assert "uvloop is not installed" in capsys.readouterr().err


def test_log_lines_carry_their_fields() -> None:
    record = logging.makeLogRecord(
        {"msg": "task assigned", "levelname": "INFO", "name": "opscore.engine", "task_id": "t1"}
    )
    entry = json.loads(logs.JsonFormatter().format(record))
    assert (entry["event"], entry["task_id"], entry["level"]) == ("task assigned", "t1", "INFO")
    assert "task assigned task_id=t1" in logs.TextFormatter().format(record)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    assert "RuntimeError: boom" in json.loads(logs.JsonFormatter().format(failed))["exception"]
    assert "RuntimeError: boom" in logs.TextFormatter().format(failed)
