"""The server's settings: one frozen dataclass, from flags over environment over defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from typing import Any

from opscore.domain.validation import Limits

DEFAULT_DB = "sqlite+aiosqlite:///opscore.db"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything an operator can set. Each field's environment variable is in `ENVIRONMENT`."""

    listen: str = "localhost:50051"
    """host:port the gRPC server binds (port 0 picks a free one)."""
    db_url: str = DEFAULT_DB
    """SQLAlchemy URL: sqlite:///path.db (default opscore.db here) or postgresql://..."""
    default_task_timeout: timedelta = timedelta(minutes=5)
    """How long an agent may hold a task whose spec sets no timeout."""
    shutdown_grace: float = 10.0
    """Seconds in-flight calls get to finish on SIGTERM/SIGINT before they are cancelled."""
    keepalive_time: float = 30.0
    """Seconds between keepalive pings on idle connections, which find dead agents' streams."""
    keepalive_timeout: float = 10.0
    """Seconds a keepalive ping may go unanswered before the connection is closed."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request or response message, in bytes."""
    log_format: str = "json"
    """`json` (one object per line, for machines) or `text` (for people)."""
    log_level: str = "INFO"
    """Python logging level name."""
    limits: Limits = field(default_factory=Limits)
    """Sizes the server accepts (tasks per definition, page sizes)."""


ENVIRONMENT = {
    "listen": "OPSCORE_LISTEN",
    "db_url": "OPSCORE_DB",
    "default_task_timeout": "OPSCORE_DEFAULT_TASK_TIMEOUT",
    "shutdown_grace": "OPSCORE_SHUTDOWN_GRACE",
    "keepalive_time": "OPSCORE_KEEPALIVE_TIME",
    "keepalive_timeout": "OPSCORE_KEEPALIVE_TIMEOUT",
    "max_message_bytes": "OPSCORE_MAX_MESSAGE_BYTES",
    "log_format": "OPSCORE_LOG_FORMAT",
    "log_level": "OPSCORE_LOG_LEVEL",
}
"""The environment variable of each setting (durations and seconds are given in seconds)."""


def _parse(name: str, raw: str) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "timedelta":
            return timedelta(seconds=float(raw))
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
    except ValueError:
        raise ValueError(f"{ENVIRONMENT[name]}={raw!r} is not a number") from None
    return raw


def load(environ: Mapping[str, str] = os.environ, **overrides: Any) -> Settings:
    """Settings from the environment, then `overrides` (the command line's flags, None skipped)."""
    values = {
        name: _parse(name, environ[var]) for name, var in ENVIRONMENT.items() if var in environ
    }
    values.update({name: value for name, value in overrides.items() if value is not None})
    settings = replace(Settings(), **values)
    if settings.log_format not in ("json", "text"):
        raise ValueError(f"log format must be json or text, not {settings.log_format!r}")
    return settings
