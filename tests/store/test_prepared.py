"""The hot statements run on the driver's cursor store and read exactly what SQLAlchemy Core does,
on SQLite and on PostgreSQL.

Each write runs on two databases, through `Prepared` on one and through `Connection.execute` on
the other, and the tables are then compared as the driver returns them (on SQLite the text of
every time and JSON value, booleans as integers). Each read runs both ways on the same data and
must give the same rows with the same column names. Values come from Hypothesis: any JSON, any
time. On PostgreSQL the same checks run inside SQLAlchemy's greenlet bridge, as the store's do.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import BACKENDS, postgres_database
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from table_rows import a_run, a_task

from opscore.store import assignments, changes, templates
from opscore.store.database import PostgresDatabase, normalize_url
from opscore.store.prepared import Prepared
from opscore.store.queries.agents import KNOWN_AGENTS
from opscore.store.queries.base import _RUN_SHAPES, LOCK_RUNS_OF_TASKS
from opscore.store.queries.definitions import LATEST_DEFINITION
from opscore.store.queries.runs import _INSERT_RUN
from opscore.store.queries.tasks import _SIBLINGS, QUEUE, SIBLINGS_LOCKING_RUNS
from opscore.store.tables import metadata
from opscore.store.templates import TASK_COLUMNS

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


def run_both(dbs: Pair, statement: Prepared, params: Any) -> None:
    lean, core = dbs
    statement.execute(lean, params)
    core.execute(statement.statement, params)


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


def read_both(conn: Connection, statement: Prepared, params: dict[str, Any]) -> list[Any]:
    lean = statement.rows(conn, params)
    core = conn.execute(statement.statement, params).all()
    assert [tuple(row) for row in lean] == [tuple(row) for row in core]
    for lean_row, core_row in zip(lean, core, strict=True):
        assert lean_row._fields == tuple(core_row._fields)
    return lean


@settings(max_examples=40, deadline=None)
@given(payload=json_objects, output=json_objects, when=times)
def writes_match(
    databases: Pair, payload: dict[str, Any], output: dict[str, Any], when: datetime
) -> None:
    for conn in databases:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    later = when + timedelta(microseconds=1)
    run_both(databases, _INSERT_RUN, [a_run("r1", when, payload), a_run("r2", later, {})])
    tasks = [
        a_task("a", "r1", 0, input=payload, queued_at=when),
        a_task("b", "r1", 1, state="pending", labels={}, timeout_ms=250),
        a_task("c", "r2", 0, fallback="t1", retry_policy={"max_attempts": 3}),
    ]
    # As a trigger writes them: rows of driver values converted ahead (a run template's).
    lean, core = databases
    layout = templates.INSERT_TASKS.layout(lean.dialect, TASK_COLUMNS)
    templates.INSERT_TASKS.execute_rows(lean, TASK_COLUMNS, [layout.row(task) for task in tasks])
    core.execute(templates.INSERT_TASKS.statement, tasks)
    run_both(
        databases,
        assignments._ASSIGN,
        {"b_task_id": "a", "b_attempt": 1, "b_agent_id": "x", "b_now": when, "b_deadline": later},
    )
    run_both(
        databases, assignments._START_RUN, [{"b_run_id": r, "b_now": when} for r in ("r1", "r2")]
    )
    run_both(
        databases, changes.SUCCEED_TASK, {"b_task_id": "a", "b_output": output, "b_now": later}
    )
    run_both(databases, changes.QUEUE_TASK, [{"b_task_id": "b", "b_now": when}])
    run_both(
        databases, changes.FINISH_TASK, {"b_task_id": "c", "b_state": "skipped", "b_now": when}
    )
    run_both(
        databases, changes.FINISH_RUN, {"b_run_id": "r2", "b_state": "cancelled", "b_now": later}
    )
    assert stored(lean) == stored(core)


async def test_writes_store_what_core_stores(run_check: RunCheck) -> None:
    await run_check(writes_match)


@settings(max_examples=40, deadline=None)
@given(payload=json_objects, when=times, connected=st.lists(st.booleans(), min_size=3, max_size=3))
def reads_match(
    databases: Pair, payload: dict[str, Any], when: datetime, connected: list[bool]
) -> None:
    conn, _ = databases
    for table in reversed(metadata.sorted_tables):
        conn.execute(table.delete())
    agents = metadata.tables["agents"]
    conn.execute(
        insert(agents),
        [
            {
                "agent_id": f"g{index}",
                "name": "",
                "version": "",
                "labels": {},
                "max_concurrent_tasks": 1,
                "reported_state": state,
                "state_detail": "",
                "connected": up,
                "registered_at": when,
                "last_seen_at": when,
                "disconnected_at": None if up else when,
            }
            for index, (state, up) in enumerate(
                zip(("idle", "busy", "unspecified"), connected, strict=True)
            )
        ],
    )
    definitions = metadata.tables["definitions"]
    conn.execute(
        insert(definitions),
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
    _INSERT_RUN.execute(conn, [a_run("r1", when, payload)])
    templates.INSERT_TASKS.execute(
        conn,
        [
            a_task("a", "r1", 0, input=payload, state="succeeded", output=payload),
            a_task("b", "r1", 1, timeout_ms=5),
            a_task("c", "r1", 2, fallback="t1", state="failed", error="boom"),
        ],
    )
    taking = read_both(conn, assignments._TAKING_AGENTS, {"b_agent_ids": ["g0", "g1", "g2", "g9"]})
    assert {row.agent_id for row in taking} == {
        f"g{index}" for index, up in enumerate(connected) if up and index != 1
    }
    read_both(conn, KNOWN_AGENTS, {"b_agent_ids": []})
    read_both(conn, KNOWN_AGENTS, {"b_agent_ids": ["g2", "g9"]})
    assert read_both(conn, LATEST_DEFINITION, {"b_name": "flow"})[0].definition_id == "d2"
    queued = read_both(conn, assignments._QUEUED_TASKS_FOR_UPDATE, {"b_task_ids": ["a", "b", "z"]})
    assert [row.task_id for row in queued] == ["b"]
    context = read_both(conn, assignments._ASSIGNMENT_CONTEXT, {"b_task_ids": ["a", "c", "z"]})
    assert sorted(row.name for row in context) == ["t0", "t2"]
    assert read_both(conn, assignments._ASSIGNMENT_CONTEXT, {"b_task_ids": []}) == []
    # The queue read at start, labels as JSON text in each database's own spelling.
    loaded = read_both(conn, QUEUE, {})
    assert [(row.task_id, json.loads(row.labels)) for row in loaded] == [("b", {"zone": "\u00fc"})]
    # A task that succeeded is read only when asked for.
    siblings = read_both(conn, _SIBLINGS, {"b_task_ids": ["b"]})
    assert [row.task_id for row in siblings] == ["b", "c"]
    siblings = read_both(conn, _SIBLINGS, {"b_task_ids": ["a", "z"]})
    assert [row.task_id for row in siblings] == ["a", "b", "c"]
    if conn.dialect.name == "postgresql":
        # Where runs are locked, one statement locks them and reads the same rows.
        for asked in (["b"], ["a", "z"], ["z"]):
            params = {"b_task_ids": asked}
            assert read_both(conn, SIBLINGS_LOCKING_RUNS, params) == read_both(
                conn, _SIBLINGS, params
            )
    locked = read_both(conn, LOCK_RUNS_OF_TASKS, {"b_task_ids": ["a", "c", "z"]})
    assert [row.run_id for row in locked] == ["r1"]
    shapes = read_both(conn, _RUN_SHAPES, {"b_run_ids": ["r1", "r9"]})
    # Read as JSON text (decoded through a cache by the store), each database's own spelling.
    assert [json.loads(row.labels) for row in shapes] == [{"zone": "\u00fc"}] * 3


async def test_reads_give_what_core_gives(run_check: RunCheck) -> None:
    await run_check(reads_match)


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
