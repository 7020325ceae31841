"""Shared fixtures: a real Ops-Core server in-process on an ephemeral port, over a real database
(a SQLite file, or a fresh PostgreSQL database when OPSCORE_TEST_POSTGRES_URL is set), and real
gRPC channels to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import asyncpg
import auth
import grpc
import pytest
from helpers import Client, connect
from opscore.v1 import agent_lifecycle_pb2_grpc, workflow_service_pb2_grpc

from opscore.config import Settings
from opscore.server import OpsCoreServer
from opscore.store import migrate
from opscore.store.database import open_database

POSTGRES_URL = os.environ.get("OPSCORE_TEST_POSTGRES_URL", "")

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set"),
    ),
]


def asyncpg_dsn(url: str) -> str:
    """The URL as asyncpg takes it (without SQLAlchemy's driver name)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@asynccontextmanager
async def postgres_database(template: str = "") -> AsyncIterator[str]:
    """A new PostgreSQL database for one test, empty or a copy of `template`, dropped
    afterwards."""
    name = f"opscore_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(POSTGRES_URL))
    try:
        copied = f' TEMPLATE "{template}"' if template else ""
        if template and admin.get_server_version().major >= 15:
            # Copying a migrated database file by file takes a quarter of the time its default,
            # block by block through the WAL, takes (an empty one is faster the default way).
            copied += " STRATEGY FILE_COPY"
        await admin.execute(f'CREATE DATABASE "{name}"{copied}')
        base, _, _ = POSTGRES_URL.rpartition("/")
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(params=BACKENDS)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database URL on each supported backend, fresh for each test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'opscore.db'}"
    else:
        async with postgres_database() as url:
            yield url


async def _migrate(url: str) -> None:
    database = open_database(url)
    try:
        await migrate.upgrade(database)
    finally:
        await database.dispose()


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once a session, which tests start from copies of."""
    path = tmp_path_factory.mktemp("migrated") / "opscore.db"
    asyncio.run(_migrate(f"sqlite:///{path}"))
    return path


@contextlib.contextmanager
def blocking(context: AbstractAsyncContextManager[str]) -> Iterator[str]:
    """An async context manager entered and left from synchronous code, on a loop of its own
    (for fixtures set up outside any test's loop)."""
    with asyncio.Runner() as runner:
        value = runner.run(context.__aenter__())
        try:
            yield value
        finally:
            runner.run(context.__aexit__(None, None, None))


@pytest.fixture(scope="session")
def migrated_postgres() -> Iterator[str]:
    """A PostgreSQL database migrated once a session, the template tests' databases copy."""
    with blocking(postgres_database()) as url:
        asyncio.run(_migrate(url))
        yield url.rpartition("/")[2]


def _copy(migrated: Path, tmp_path: Path) -> str:
    """A copy of the migrated SQLite database in `tmp_path`, as a URL."""
    copy = tmp_path / "opscore.db"
    shutil.copyfile(migrated, copy)
    return f"sqlite:///{copy}"


@pytest.fixture(params=BACKENDS)
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL on each supported backend, fresh for each test and already migrated (a
    copy of a database migrated once: a migration per test would cost more than most tests)."""
    if request.param == "sqlite":
        yield _copy(request.getfixturevalue("migrated_sqlite"), tmp_path)
    else:
        with blocking(postgres_database(request.getfixturevalue("migrated_postgres"))) as url:
            yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file, fresh for each test (for tests that need one backend only)."""
    return f"sqlite:///{tmp_path / 'opscore.db'}"


ServerFactory = Callable[..., AbstractAsyncContextManager[OpsCoreServer]]


@pytest.fixture
def start_server() -> ServerFactory:
    """Start a server on a database URL: `async with start_server(url) as server:`.

    Authentication is on, with `auth.OPERATOR_TOKEN`. Keyword arguments override `Settings`
    fields (e.g. `default_task_timeout`)."""

    @asynccontextmanager
    async def start(url: str, **overrides: object) -> AsyncIterator[OpsCoreServer]:
        settings = replace(
            Settings(listen="127.0.0.1:0", db_url=url, shutdown_grace=1.0, **auth.SETTINGS),
            **overrides,
        )
        server = OpsCoreServer(settings)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()

    return start


@asynccontextmanager
async def serve(
    start_server: ServerFactory, url: str, **overrides: object
) -> AsyncIterator[Client]:
    """A server on `url` with `Settings` fields overridden, and a Client on a real channel to it
    (see helpers.connect): `async with serve(start_server, sqlite_url, ...) as client:`."""
    async with start_server(url, **overrides) as server, connect(server.port, server) as client:
        yield client


@asynccontextmanager
async def client_at(
    start_server: ServerFactory, url: str, receive_limit: int | None = None, **overrides: object
) -> AsyncIterator[Client]:
    """A server on `url` with `Settings` overridden, and a client whose receive limit is
    `receive_limit` (None: gRPC's default, 4 MiB)."""
    options = [] if receive_limit is None else [("grpc.max_receive_message_length", receive_limit)]
    async with start_server(url, **overrides) as server:
        channel = auth.channel(f"127.0.0.1:{server.port}", options=options)
        async with channel:
            client = Client(channel, server)
            try:
                yield client
            finally:
                await client.close()


@pytest.fixture
async def server(
    start_server: ServerFactory, migrated_sqlite: Path, tmp_path: Path
) -> AsyncIterator[OpsCoreServer]:
    """A running server on a fresh SQLite file (migrated already)."""
    async with start_server(_copy(migrated_sqlite, tmp_path)) as running:
        yield running


@pytest.fixture
async def channel(server: OpsCoreServer) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC channel to `server`."""
    async with auth.channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


@pytest.fixture
def lifecycle(channel: grpc.aio.Channel) -> agent_lifecycle_pb2_grpc.AgentLifecycleStub:
    """An AgentLifecycle client."""
    return agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)


@pytest.fixture
def workflows(channel: grpc.aio.Channel) -> workflow_service_pb2_grpc.WorkflowServiceStub:
    """A WorkflowService client."""
    return workflow_service_pb2_grpc.WorkflowServiceStub(channel)


@pytest.fixture
async def client(server: OpsCoreServer, channel: grpc.aio.Channel) -> AsyncIterator[Client]:
    """Both clients and agent helpers over `channel` to `server` (see tests/helpers.py)."""
    opened = Client(channel, server)
    yield opened
    await opened.close()
