"""How writes lock on PostgreSQL, where writers run concurrently (several replicas on one
database): every write that moves a run locks the run's row before any of its tasks, so that two
writes never wait for each other's locks in opposite orders."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest
from conftest import POSTGRES_URL, asyncpg_dsn, postgres_database
from sqlalchemy import insert
from sqlalchemy.engine import Connection
from table_rows import a_run, a_task

from opscore.store import migrate
from opscore.store.database import open_database
from opscore.store.queries.tasks import SIBLINGS_LOCKING_RUNS
from opscore.store.tables import RUNS, TASKS

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="OPSCORE_TEST_POSTGRES_URL is not set")

WAIT = 10.0
"""Seconds a step may take (each one takes milliseconds)."""


def two_runs(conn: Connection) -> None:
    """Run r1: a task assigned, two pending behind it; run r2: one task queued."""
    when = datetime(2026, 1, 2, tzinfo=UTC)
    conn.execute(insert(RUNS), [a_run("r1", when, {}), a_run("r2", when, {})])
    conn.execute(
        insert(TASKS),
        [
            a_task("a", "r1", 0, state="assigned", agent_id="g1", attempt=1),
            a_task("b", "r1", 1, state="pending"),
            a_task("c", "r1", 2, state="pending"),
            a_task("d", "r2", 0),
        ],
    )


async def test_a_completion_batch_locks_its_runs_before_any_of_their_tasks() -> None:
    """The completions' read locks their runs and their tasks in one statement. While another
    session holds one of the runs, the read waits for it having locked none of the tasks: a
    third session takes every task of that run without waiting."""
    async with postgres_database() as url:
        database = open_database(url)
        holder = await asyncpg.connect(asyncpg_dsn(url))
        prober = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await migrate.upgrade(database)
            await database.run(two_runs, write=True)
            await holder.execute("BEGIN")
            await holder.execute("SELECT 1 FROM runs WHERE run_id = 'r1' FOR UPDATE")

            def read(conn: Connection) -> tuple[int, list[str]]:
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                found = SIBLINGS_LOCKING_RUNS.rows(conn, {"b_task_ids": ["a", "d"]})
                return pid, [row.task_id for row in found]

            reading = asyncio.create_task(database.run(read, write=True))
            async with asyncio.timeout(WAIT):
                while (waiting := await prober.fetchval(WAITING_FOR_A_LOCK)) is None:
                    await asyncio.sleep(0.01)

            async with prober.transaction():
                # NOWAIT: an error at once if any of the run's tasks were locked.
                taken = await prober.fetch(
                    "SELECT task_id FROM tasks WHERE run_id IN ('r1', 'r2')"
                    " ORDER BY task_id FOR UPDATE NOWAIT"
                )
            assert [row["task_id"] for row in taken] == ["a", "b", "c", "d"]
            assert not reading.done()

            await holder.execute("ROLLBACK")
            async with asyncio.timeout(WAIT):
                pid, task_ids = await reading
            assert pid == waiting
            # The runs' tasks that have not succeeded, those asked for among them.
            assert task_ids == ["a", "b", "c", "d"]
        finally:
            await holder.close()
            await prober.close()
            await database.dispose()


WAITING_FOR_A_LOCK = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
"""
"""The session of this database that waits for a lock, if any."""
