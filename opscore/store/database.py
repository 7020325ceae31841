"""Which database a URL names, and the backend that runs its transactions.

The URL picks the backend once, at startup: SQLite (`sqlite.py`) for a file, PostgreSQL
(`postgres.py`) otherwise; both run store operations behind `Database` (`transactions.py`). The
rest of the server names its database through the helpers here, so every one of them reads a
URL the same way.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url

from opscore.domain.health import StorageHealth
from opscore.store.postgres import PostgresDatabase
from opscore.store.sqlite import SqliteDatabase
from opscore.store.transactions import Database


def normalize_url(url: str) -> str:
    """Accept plain `sqlite:///` and `postgresql://` URLs and name the drivers used for them."""
    for plain, named in (
        ("sqlite+aiosqlite://", "sqlite+pysqlite://"),
        ("sqlite://", "sqlite+pysqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return named + url[len(plain) :]
    return url


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL, made absolute; None for an in-memory database."""
    database = make_url(normalize_url(url)).database
    return None if database in (None, "", ":memory:") else Path(database).absolute()


def name_of(url: str) -> str:
    """The database of `url` as an operator names it: a SQLite file's path, or the URL without
    its password."""
    if normalize_url(url).startswith("sqlite"):
        return str(sqlite_file(url) or ":memory:")
    return make_url(url).render_as_string(hide_password=True)


def open_database(url: str, health: StorageHealth | None = None) -> Database:
    """The Database for `url`: SQLite (a file path) or PostgreSQL; `health` is told how its
    transactions go (a tracker of its own if None)."""
    normalized = normalize_url(url)
    if normalized.startswith("sqlite"):
        return SqliteDatabase(normalized, health)
    return PostgresDatabase(normalized, health)
