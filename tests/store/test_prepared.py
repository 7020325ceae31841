"""The hot statements run on SQLite's driver store and read exactly what SQLAlchemy Core does.

Each write runs on two databases, through `Prepared` on one and through `Connection.execute` on
the other, and the tables are then compared as the driver stores them (the text of every time and
JSON value, booleans as integers). Each read runs both ways on the same data and must give the
same rows with the same column names. Values come from Hypothesis: any JSON, any time.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from table_rows import a_run, a_task

from opscore.store import assignments, changes, queries
from opscore.store.prepared import Prepared
from opscore.store.tables import metadata

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
)


@pytest.fixture
def databases() -> Iterator[tuple[Connection, Connection]]:
    """Two empty SQLite databases with the schema: one written through `Prepared`, one through
    Core. Each runs in a transaction that is rolled back."""
    engines = [create_engine("sqlite+pysqlite://") for _ in range(2)]
    for engine in engines:
        metadata.create_all(engine)
    with engines[0].connect() as lean, engines[1].connect() as core, lean.begin(), core.begin():
        yield lean, core
        lean.rollback()
        core.rollback()


def run_both(dbs: tuple[Connection, Connection], statement: Prepared, params: Any) -> None:
    lean, core = dbs
    statement.execute(lean, params)
    core.execute(statement.statement, params)


def stored(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table as the driver returns it (no conversion)."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    return {
        table: dbapi.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
        for table in metadata.tables
    }


def read_both(conn: Connection, statement: Prepared, params: dict[str, Any]) -> list[Any]:
    lean = statement.rows(conn, params)
    core = conn.execute(statement.statement, params).all()
    assert [tuple(row) for row in lean] == [tuple(row) for row in core]
    for lean_row, core_row in zip(lean, core, strict=True):
        assert lean_row._fields == tuple(core_row._fields)
    return lean


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=json_objects, output=json_objects, when=times)
def test_writes_store_what_core_stores(
    databases: tuple[Connection, Connection],
    payload: dict[str, Any],
    output: dict[str, Any],
    when: datetime,
) -> None:
    for conn in databases:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())
    later = when + timedelta(microseconds=1)
    run_both(databases, queries._INSERT_RUN, [a_run("r1", when, payload), a_run("r2", later, {})])
    run_both(
        databases,
        queries._INSERT_TASKS,
        [
            a_task("a", "r1", 0, input=payload, queued_at=when),
            a_task("b", "r1", 1, state="pending", labels={}, timeout_ms=250),
            a_task("c", "r2", 0, fallback="t1", retry_policy={"max_attempts": 3}),
        ],
    )
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
    lean, core = databases
    assert stored(lean) == stored(core)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=json_objects, when=times, connected=st.lists(st.booleans(), min_size=3, max_size=3))
def test_reads_give_what_core_gives(
    databases: tuple[Connection, Connection],
    payload: dict[str, Any],
    when: datetime,
    connected: list[bool],
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
    queries._INSERT_RUN.execute(conn, [a_run("r1", when, payload)])
    queries._INSERT_TASKS.execute(
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
    read_both(conn, queries._KNOWN_AGENTS, {"b_agent_ids": []})
    read_both(conn, queries._KNOWN_AGENTS, {"b_agent_ids": ["g2", "g9"]})
    assert read_both(conn, queries._LATEST_DEFINITION, {"b_name": "flow"})[0].definition_id == "d2"
    queued = read_both(conn, assignments._QUEUED_TASKS_FOR_UPDATE, {"b_task_ids": ["a", "b", "z"]})
    assert [(row.task_id, row.is_fallback) for row in queued] == [("b", True)]
    read_both(conn, assignments._ASSIGNMENT_CONTEXT, {"b_run_ids": ["r1"], "b_names": ["a"]})
    read_both(conn, assignments._ASSIGNMENT_CONTEXT, {"b_run_ids": ["r1", "r9"], "b_names": []})
    siblings = read_both(conn, queries._SIBLINGS_FOR_UPDATE, {"b_task_ids": ["b"]})
    assert [row.task_id for row in siblings] == ["a", "b", "c"]
    shapes = read_both(conn, queries._RUN_SHAPES, {"b_run_ids": ["r1", "r9"]})
    assert sorted(row.labels for row in shapes) == ['{"zone": "\\u00fc"}'] * 3


def test_a_driver_error_is_raised_as_sqlalchemy_raises_it(
    databases: tuple[Connection, Connection],
) -> None:
    lean, core = databases
    when = datetime(2026, 1, 2, tzinfo=UTC)
    for conn in databases:
        queries._INSERT_RUN.execute(conn, a_run("r1", when, {}))
    with pytest.raises(IntegrityError):
        queries._INSERT_RUN.execute(lean, [a_run("r2", when, {}), a_run("r1", when, {})])
    with pytest.raises(IntegrityError):
        core.execute(queries._INSERT_RUN.statement, [a_run("r2", when, {}), a_run("r1", when, {})])
