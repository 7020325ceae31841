"""How Ops-Core's PostgreSQL sessions are set up, on the server the tests run against."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg
import pytest
from conftest import POSTGRES_URL, asyncpg_dsn, postgres_database
from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import Connection

from opscore.store import migrate, postgres
from opscore.store.database import open_database
from opscore.store.tables import TASK_IS_ASSIGNED, TASK_IS_QUEUED, metadata

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set")


def settings(conn: Connection) -> tuple[str, str]:
    autovacuum = conn.execute(text("SHOW autovacuum")).scalar_one()
    plan_cache_mode = conn.execute(text("SHOW plan_cache_mode")).scalar_one()
    return autovacuum, plan_cache_mode


async def test_a_server_without_autovacuum_is_warned_of_once_and_plans_stay_cached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without autovacuum nothing removes dead rows: the operator is told, once. Statements keep
    PostgreSQL's own plan caching either way (the young tables' ANALYZE keeps plans made for
    empty tables from staying; planned at each execution instead, chains measured 15% slower)."""
    caplog.set_level(logging.WARNING, logger="opscore.store")
    async with postgres_database() as url:
        database = open_database(url)
        plain = await asyncpg.connect(asyncpg_dsn(url))
        try:
            # Two sessions at once: the warning comes once all the same.
            first, second = await asyncio.gather(
                database.run(settings, write=False), database.run(settings, write=False)
            )
            servers_own = await plain.fetchval("SHOW plan_cache_mode")
        finally:
            await plain.close()
            await database.dispose()
    autovacuum, plan_cache_mode = first
    assert plan_cache_mode == servers_own
    assert second == first
    warnings = [r for r in caplog.records if "without autovacuum" in r.getMessage()]
    assert len(warnings) == (0 if autovacuum == "on" else 1)


def generic_plans(conn: Connection) -> list[str]:
    """The generic plans PostgreSQL makes for a look-up of queued tasks and one of assigned
    tasks by lease end, written as the store writes them (sequential scans priced out, so
    that an empty table does not decide)."""
    tasks = metadata.tables["tasks"]
    queries = [
        select(tasks.c.task_id).where(TASK_IS_QUEUED).order_by(tasks.c.queued_at),
        select(func.min(tasks.c.deadline)).where(TASK_IS_ASSIGNED),
    ]
    conn.execute(text("SET LOCAL enable_seqscan = off"))
    conn.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
    plans = []
    for index, query in enumerate(queries):
        sql = str(query.compile(dialect=conn.dialect))  # no parameter: the state is in the SQL
        conn.execute(text(f"PREPARE generic_{index} AS {sql}"))
        found = conn.execute(text(f"EXPLAIN EXECUTE generic_{index}")).scalars()
        plans.append("\n".join(found))
        conn.execute(text(f"DEALLOCATE generic_{index}"))
    return plans


async def test_generic_plans_find_queued_and_assigned_tasks_by_their_partial_indexes() -> None:
    """A state bound as a parameter would leave a generic plan no partial index to use (it
    cannot know the state): the store writes the state into the SQL."""
    async with postgres_database() as url:
        database = open_database(url)
        try:
            await migrate.upgrade(database)
            queued, assigned = await database.run(generic_plans, write=False)
        finally:
            await database.dispose()
    assert "ix_tasks_queued" in queued
    assert "ix_tasks_assigned_" in assigned  # on an empty table either partial index will do
    assert "Seq Scan" not in queued + assigned


def analyzed(conn: Connection) -> dict[str, tuple[bool, float]]:
    """Whether each of Ops-Core's tables was ever analyzed, and its rows as last analyzed."""
    rows = conn.execute(
        text(
            "SELECT s.relname, s.last_analyze IS NOT NULL, c.reltuples"
            " FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid"
            " WHERE s.schemaname = current_schema()"
        )
    )
    return {name: (done, rows_then) for name, done, rows_then in rows}


async def test_young_tables_are_analyzed_as_they_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new database's tables have no statistics, and the plans cached for its statements
    would be made for empty tables until the first ANALYZE: the server analyzes each table
    once it has grown past what its statistics say, and leaves the others alone."""
    monkeypatch.setattr(postgres, "STATISTICS_CHECK", 0.05)
    async with postgres_database() as url:
        database = open_database(url)
        await migrate.upgrade(database)
        agents = metadata.tables["agents"]
        now = datetime.now(UTC)

        def fill(conn: Connection) -> None:
            conn.execute(
                insert(agents),
                [
                    {
                        "agent_id": f"agent-{index}",
                        "name": "",
                        "version": "",
                        "labels": {},
                        "max_concurrent_tasks": 1,
                        "reported_state": "none",
                        "state_detail": "",
                        "connected": False,
                        "registered_at": now,
                        "last_seen_at": now,
                    }
                    for index in range(1_500)
                ],
            )

        await database.run(fill, write=True)
        # A session's counts reach the statistics system at the latest when it ends.
        await database.dispose()
        upkeep = asyncio.create_task(database.maintain())
        try:
            for _ in range(200):
                state = await database.run(analyzed, write=False)
                if state["agents"][0]:
                    break
                await asyncio.sleep(0.05)
        finally:
            upkeep.cancel()
            await asyncio.gather(upkeep, return_exceptions=True)
            await database.dispose()
    assert state["agents"] == (True, 1_500.0)
    # Too small to matter (and empty): no statistics taken.
    assert not state["runs"][0]
    assert not state["tasks"][0]


async def test_a_failing_statistics_refresh_is_logged_and_tried_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Upkeep is no reason to stop serving: a refresh that fails (no right to ANALYZE, the
    server restarting) is logged, and tried again later."""
    caplog.set_level(logging.WARNING, logger="opscore.store")
    monkeypatch.setattr(postgres, "STATISTICS_CHECK", 0.01)
    monkeypatch.setattr(postgres, "STATISTICS_RETRY", 0.01)
    monkeypatch.setattr(postgres, "_GROWN_TABLES", text("SELECT no_such_column"))
    async with postgres_database() as url:
        database = open_database(url)
        upkeep = asyncio.create_task(database.maintain())
        try:
            for _ in range(500):
                failures = [r for r in caplog.records if "statistics failed" in r.getMessage()]
                if len(failures) >= 2:
                    break
                await asyncio.sleep(0.01)
            assert not upkeep.done()
        finally:
            upkeep.cancel()
            await asyncio.gather(upkeep, return_exceptions=True)
            await database.dispose()
    assert len(failures) >= 2
