"""Every prepared statement stores and reads exactly what SQLAlchemy Core does, on SQLite and on
PostgreSQL; and SQLAlchemy is one this code is written against.

The statements are found in the registry (`prepared.REGISTERED`) after importing every module of
the store, and each is run with its own samples on a fixture of rows (`seed`) that the samples
name. Each write runs on two databases, through `Prepared` on one and through
`Connection.execute` on the other, and the tables are then compared as the driver returns them
(on SQLite the text of every time and JSON value, booleans as integers). Each read runs both ways
on the same data and must give the same rows with the same column names. A statement whose
samples write nothing or read no row fails, named. Every time and JSON object of the samples and
of the fixture comes from Hypothesis: any JSON, any time. On PostgreSQL the same checks run inside
SQLAlchemy's greenlet bridge, as the store's do.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from conftest import BACKENDS, postgres_database
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import JSON, DateTime, create_engine, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.selectable import Select
from table_rows import a_run, a_task

import opscore.store
from opscore.store import changes, templates
from opscore.store.database import normalize_url
from opscore.store.postgres import PostgresDatabase
from opscore.store.prepared import (
    REGISTERED,
    SQLALCHEMY_RANGE,
    Prepared,
    Sample,
    check_sqlalchemy,
)
from opscore.store.queries.runs import _INSERT_RUN
from opscore.store.queries.tasks import _SIBLINGS, SIBLINGS_LOCKING_RUNS
from opscore.store.tables import AGENTS, DEFINITIONS, RUNS, TASKS, metadata


def registered() -> dict[str, Prepared]:
    """Every prepared statement, after importing every module of the store (but its migrations)
    so that none is left out."""
    root = Path(opscore.store.__file__).parent
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] != "migrations":
            names = parts[:-1] if parts[-1] == "__init__" else parts
            importlib.import_module(".".join(("opscore.store", *names)))
    return REGISTERED


STATEMENTS = registered()
READS = [name for name, statement in STATEMENTS.items() if isinstance(statement.statement, Select)]
WRITES = [name for name in STATEMENTS if name not in READS]

# Any text gRPC can carry (valid UTF-8: no lone surrogates) but NUL, which the validation
# refuses; PostgreSQL can store neither.
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(texts, json_values, max_size=4)
times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
)


Pair = tuple[Connection, Connection]
"""A database written through `Prepared`, and one written through Core."""

Check = Callable[[Pair], None]
"""A check run on a pair of databases, each in a transaction that is rolled back after it."""


@contextmanager
def sqlite_pair() -> Iterator[Pair]:
    """Two empty in-memory SQLite databases with the schema."""
    engines = [create_engine("sqlite+pysqlite://") for _ in range(2)]
    for engine in engines:
        metadata.create_all(engine)
    with engines[0].connect() as lean, engines[1].connect() as core, lean.begin(), core.begin():
        yield lean, core
        lean.rollback()
        core.rollback()


@asynccontextmanager
async def postgres_pair() -> AsyncIterator[tuple[AsyncConnection, AsyncConnection]]:
    """Two empty PostgreSQL databases with the schema, on the store's driver and with the
    store's session set-up."""
    async with postgres_database() as lean_url, postgres_database() as core_url:
        stores = [PostgresDatabase(normalize_url(url)) for url in (lean_url, core_url)]
        try:
            for store in stores:
                async with store.engine.begin() as conn:
                    await conn.run_sync(metadata.create_all)
            async with stores[0].engine.connect() as lean, stores[1].engine.connect() as core:
                await lean.begin()
                await core.begin()
                yield lean, core
                await lean.rollback()
                await core.rollback()
        finally:
            for store in stores:
                await store.dispose()


RunCheck = Callable[[Check], Awaitable[None]]


@pytest.fixture(params=BACKENDS)
async def run_check(request: pytest.FixtureRequest) -> AsyncIterator[RunCheck]:
    """Runs a check on a pair of each backend. On PostgreSQL the check runs inside SQLAlchemy's
    greenlet bridge, as the store's operations do."""
    if request.param == "sqlite":
        with sqlite_pair() as pair:

            async def on_sqlite(check: Check) -> None:
                check(pair)

            yield on_sqlite
        return
    async with postgres_pair() as (lean, core):

        async def on_postgres(check: Check) -> None:
            await lean.run_sync(lambda lean_sync: check((lean_sync, core.sync_connection)))

        yield on_postgres


def seed(conn: Connection, payload: dict[str, Any], when: datetime) -> None:
    """The rows the samples name, written through Core: agents g0 (idle, connected), g1 (busy)
    and g2 (disconnected); definitions d1 and d2 of `flow`; runs r1 and r2, both pending; in r1
    tasks a (succeeded), b (queued) and c (failed, with a fallback); in r2 task d (pending)."""
    for table in reversed(metadata.sorted_tables):
        conn.execute(table.delete())
    conn.execute(
        insert(AGENTS),
        [
            {
                "agent_id": f"g{index}",
                "name": "",
                "version": "",
                "labels": payload,
                "max_concurrent_tasks": 1,
                "reported_state": state,
                "state_detail": "",
                "connected": up,
                "replica_id": "p1" if up else None,
                "registered_at": when,
                "last_seen_at": when,
                "disconnected_at": None if up else when,
            }
            for index, (state, up) in enumerate(
                (("idle", True), ("busy", True), ("unspecified", False))
            )
        ],
    )
    conn.execute(
        insert(DEFINITIONS),
        [
            {
                "definition_id": f"d{version}",
                "name": "flow",
                "version": version,
                "description": "",
                "tasks": [],
                "request_id": None,
                "created_at": when,
            }
            for version in (1, 2)
        ],
    )
    conn.execute(insert(RUNS), [a_run("r1", when, payload), a_run("r2", when, {})])
    conn.execute(
        insert(TASKS),
        [
            a_task("a", "r1", 0, input=payload, state="succeeded", output=payload, queued_at=when),
            a_task("b", "r1", 1, timeout_ms=5, labels=payload, queued_at=when),
            a_task("c", "r1", 2, fallback="t1", state="failed", error="boom"),
            a_task("d", "r2", 0, state="pending", retry_policy={"max_attempts": 3}),
        ],
    )


def varied(
    statement: Prepared, conn: Connection, sample: Sample, value: dict[str, Any], when: datetime
) -> Any:
    """`sample` with each time replaced by `when` (a microsecond later for each row) and each
    JSON object by `value`, as the statement's own types say (None stays None)."""

    def one(params: Mapping[str, Any], index: int) -> dict[str, Any]:
        keys = list(params) if getattr(statement.statement, "is_insert", False) else None
        compiled = statement.statement.compile(dialect=conn.dialect, column_keys=keys)
        out = dict(params)
        for key, given_value in params.items():
            kind = compiled.binds[key].type
            kind = getattr(kind, "impl_instance", kind)
            if given_value is not None and isinstance(kind, DateTime):
                out[key] = when + timedelta(microseconds=index)
            elif isinstance(given_value, dict) and isinstance(kind, JSON):
                out[key] = value
        return out

    if isinstance(sample, Mapping):
        return one(sample, 0)
    return [one(params, index) for index, params in enumerate(sample)]


def stored(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table as the driver returns it (no conversion)."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    rows = {}
    for name, table in metadata.tables.items():
        cursor = dbapi.cursor()
        key = ", ".join(column.name for column in table.primary_key)
        cursor.execute(f"SELECT * FROM {name} ORDER BY {key}")
        rows[name] = [tuple(row) for row in cursor.fetchall()]
    return rows


def run_both(dbs: Pair, statement: Prepared, params: Any, *, ahead: bool = False) -> None:
    """`statement` through `Prepared` on one database and through Core on the other; an INSERT
    `ahead` as a trigger writes a template's rows: rows of driver values converted ahead."""
    lean, core = dbs
    if ahead and getattr(statement.statement, "is_insert", False):
        rows = [params] if isinstance(params, dict) else params
        keys = tuple(rows[0])
        layout = statement.layout(lean.dialect, keys)
        statement.execute_rows(lean, keys, [layout.row(row) for row in rows])
    else:
        statement.execute(lean, params)
    core.execute(statement.statement, params)


def read_both(conn: Connection, statement: Prepared, params: dict[str, Any]) -> list[Any]:
    lean = statement.rows(conn, params)
    core = conn.execute(statement.statement, params).all()
    differs = f"the prepared statement {statement.name} read otherwise"
    assert [tuple(row) for row in lean] == [tuple(row) for row in core], differs
    for lean_row, core_row in zip(lean, core, strict=True):
        assert lean_row._fields == tuple(core_row._fields), differs
    return lean


def sampled(databases: Pair, names: list[str]) -> list[Prepared]:
    """The statements named, those that run on these databases; each must have samples."""
    for name in names:
        assert STATEMENTS[name].samples, f"the prepared statement {name} has no samples"
    dialect = databases[0].dialect.name
    return [STATEMENTS[name] for name in names if dialect in STATEMENTS[name].dialects]


@settings(max_examples=20, deadline=None)
@given(payload=json_objects, value=json_objects, when=times, ahead=st.booleans())
def writes_match(
    databases: Pair, payload: dict[str, Any], value: dict[str, Any], when: datetime, ahead: bool
) -> None:
    lean, core = databases
    for statement in sampled(databases, WRITES):
        for conn in databases:
            seed(conn, payload, when)
        before = stored(lean)
        for sample in statement.samples:
            params = varied(statement, lean, sample, value, when)
            run_both(databases, statement, params, ahead=ahead)
        after = stored(lean)
        assert after != before, (
            f"the samples of the prepared statement {statement.name} wrote nothing"
        )
        assert after == stored(core), f"the prepared statement {statement.name} stored otherwise"


async def test_writes_store_what_core_stores(run_check: RunCheck) -> None:
    await run_check(writes_match)


@settings(max_examples=40, deadline=None)
@given(payload=json_objects, value=json_objects, when=times)
def reads_match(
    databases: Pair, payload: dict[str, Any], value: dict[str, Any], when: datetime
) -> None:
    conn, _ = databases
    seed(conn, payload, when)
    for statement in sampled(databases, READS):
        found = []
        for sample in statement.samples:
            params = varied(statement, conn, sample, value, when)
            found.append(read_both(conn, statement, params))
        assert any(found), f"the samples of the prepared statement {statement.name} read no row"
    if conn.dialect.name == "postgresql":
        # Where runs are locked, one statement locks them and reads the same rows.
        for asked in (["b"], ["a", "z"], ["z"]):
            params = {"b_task_ids": asked}
            assert read_both(conn, SIBLINGS_LOCKING_RUNS, params) == read_both(
                conn, _SIBLINGS, params
            )


async def test_reads_give_what_core_gives(run_check: RunCheck) -> None:
    await run_check(reads_match)


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match=r"tasks\.queue"):
        Prepared("tasks.queue", select(TASKS.c.task_id), samples=[{}])
    assert all(statement.dialects for statement in STATEMENTS.values())


def test_sqlalchemy_is_the_series_the_statements_are_written_against() -> None:
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert f"sqlalchemy[asyncio]{SQLALCHEMY_RANGE}" in dependencies
    check_sqlalchemy(sqlalchemy.__version__)


@pytest.mark.parametrize("version", ["2.0.30", "2.1.8", "2.2.0", "3.0.0", "2.2.0b1", "unknown"])
def test_another_sqlalchemy_is_refused_naming_the_range(version: str) -> None:
    with pytest.raises(ImportError, match=f"SQLAlchemy {SQLALCHEMY_RANGE}.*installed: {version}"):
        check_sqlalchemy(version)


def error_matches(databases: Pair) -> None:
    lean, core = databases
    when = datetime(2026, 1, 2, tzinfo=UTC)
    for conn in databases:
        _INSERT_RUN.execute(conn, a_run("r1", when, {}))
    with pytest.raises(IntegrityError):
        _INSERT_RUN.execute(lean, [a_run("r2", when, {}), a_run("r1", when, {})])
    with pytest.raises(IntegrityError):
        core.execute(_INSERT_RUN.statement, [a_run("r2", when, {}), a_run("r1", when, {})])


async def test_a_driver_error_is_raised_as_sqlalchemy_raises_it(run_check: RunCheck) -> None:
    await run_check(error_matches)


def times_match(databases: Pair) -> None:
    """Times are converted remembering the last one (a batch writes its `now` on many rows):
    rows with different times in one statement, in turn, each store their own."""
    first = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    second = first + timedelta(seconds=1)
    tasks = [a_task(name, "r1", position) for position, name in enumerate("abc")]
    for conn in databases:
        _INSERT_RUN.execute(conn, a_run("r1", first, {}))
        templates.INSERT_TASKS.execute(conn, tasks)
    run_both(
        databases,
        changes.QUEUE_TASK,
        [
            {"b_task_id": task_id, "b_now": when}
            for task_id, when in (
                ("a", first),
                ("b", second),
                # The same instant in another zone.
                ("c", second.astimezone(timezone(timedelta(hours=2)))),
            )
        ],
    )
    lean, core = databases
    assert stored(lean) == stored(core)
    found = {row.task_id: row.queued_at for row in lean.execute(select(metadata.tables["tasks"]))}
    assert found == {"a": first, "b": second, "c": second}
    # A naive time is refused, even right after the aware time it would equal in UTC.
    with pytest.raises(ValueError, match="naive"):
        changes.QUEUE_TASK.execute(lean, {"b_task_id": "a", "b_now": second.replace(tzinfo=None)})


async def test_times_in_turn_each_store_their_own(run_check: RunCheck) -> None:
    await run_check(times_match)
