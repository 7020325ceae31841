"""PostgreSQL transactions, and the upkeep of young tables' statistics.

Store operations run through asyncpg on the event loop (no threads), each through SQLAlchemy's
greenlet bridge (`AsyncConnection.run_sync`); its statements are network round trips anyway.
Beside them the server analyzes its tables while they grow (see `PostgresDatabase.maintain`),
so that the plans PostgreSQL caches are not made for empty tables.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, TypeVar

from sqlalchemy import event, text
from sqlalchemy.engine import AdaptedConnection, Connection
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from opscore.domain.errors import StorageFault
from opscore.domain.health import StorageHealth
from opscore.store.tables import metadata
from opscore.store.transactions import Committed, Database, Work

T = TypeVar("T")

STATISTICS_CHECK = 1.0
"""Seconds between two looks at how Ops-Core's tables have grown, on PostgreSQL (see
`PostgresDatabase.maintain`)."""
STATISTICS_RETRY = 60.0
"""Seconds before looking again after a look or an ANALYZE failed."""
ANALYZE_GROWTH = 4
"""A table is analyzed once it holds this many times the rows its statistics say it has..."""
ANALYZE_MIN_ROWS = 1_000
"""...and at least this many: below, any plan is cheap."""

log = logging.getLogger("opscore.store")


class PostgresDatabase(Database):
    """PostgreSQL through asyncpg (see the module docstring)."""

    dialect = "postgresql"

    def __init__(self, url: str, health: StorageHealth | None = None, **options: Any) -> None:
        self.health = StorageHealth() if health is None else health
        self.engine: AsyncEngine = create_async_engine(url, **options)
        _warn_without_autovacuum(self.engine)

    async def _run(self, work: Work[T], write: bool, alone: bool, committed: Committed[T]) -> T:
        """Run `work` on a pooled connection through the greenlet bridge (no thread to spare
        a write that comes alone)."""
        async with self.engine.connect() as conn, conn.begin():
            value = await conn.run_sync(work)
        if committed is not None:
            committed(value)
        return value

    async def dispose(self) -> None:
        """Close the pool."""
        await self.engine.dispose()

    async def maintain(self) -> None:
        """Analyze Ops-Core's tables while they are young: each one that holds `ANALYZE_GROWTH`
        times the rows its statistics say (and at least `ANALYZE_MIN_ROWS`).

        The driver prepares every statement, and PostgreSQL caches a generic plan for it after
        five executions, made from the statistics of the moment. A new database's tables have
        none, so the plans are made for empty tables and hold until the first ANALYZE, which
        autovacuum runs up to a minute or so later, and a server without autovacuum never
        (there this is what refreshes them, see `_warn_without_autovacuum`). Plans made for empty
        tables slow a new database down until then (the figures are in the performance log).
        An ANALYZE samples at most 30,000 rows and
        takes no lock that writes wait for; it invalidates the cached plans, which are made
        again from the new statistics. Once a table has grown to its working size, autovacuum
        (where it runs) keeps its statistics, and this no longer fires."""
        tables = [table.name for table in metadata.sorted_tables]
        while True:
            await asyncio.sleep(STATISTICS_CHECK)
            try:
                grown = await self.run(functools.partial(_analyze_grown, tables), write=False)
            except StorageFault:
                continue  # the outage is logged by `health`; the next look comes as usual
            except DBAPIError:
                log.warning("refreshing table statistics failed", exc_info=True)
                await asyncio.sleep(STATISTICS_RETRY)
                continue
            if grown:
                log.info("table statistics refreshed", extra={"tables": grown})


def _analyze_grown(tables: list[str], conn: Connection) -> list[str]:
    """ANALYZE the tables among `tables` that have grown (see `PostgresDatabase.maintain`);
    their names."""
    grown = list(
        conn.execute(
            _GROWN_TABLES, {"tables": tables, "growth": ANALYZE_GROWTH, "rows": ANALYZE_MIN_ROWS}
        ).scalars()
    )
    if grown:
        quote = conn.dialect.identifier_preparer.quote
        conn.execute(text(f"ANALYZE {', '.join(quote(name) for name in grown)}"))
    return grown


_GROWN_TABLES = text(
    """
    SELECT s.relname
    FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
    WHERE s.schemaname = current_schema()
      AND s.relname = ANY(:tables)
      AND s.n_live_tup >= :rows
      AND s.n_live_tup > :growth * GREATEST(c.reltuples, 0)
    ORDER BY s.relname
    """
)
"""Ops-Core's tables whose live rows (as PostgreSQL's statistics system counts them, within a
second of each commit) have outgrown the row count of their last ANALYZE (`reltuples`, -1 when
never analyzed)."""


def _warn_without_autovacuum(engine: AsyncEngine) -> None:
    """Log once, at the first connection, if the server runs without autovacuum: nothing then
    removes the dead rows that every update of a task leaves, nor refreshes statistics once the
    tables have stopped growing (`PostgresDatabase.maintain` does while they grow), so such a
    server needs `VACUUM ANALYZE` on a schedule.

    No plan cached while its tables were nearly empty stays on such a server either: the young
    tables' ANALYZE replaces those plans on every server, so statements keep their cached plans
    rather than being planned at each execution."""
    checked = False

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        nonlocal checked
        if checked:
            return
        checked = True  # before the read: connections opened meanwhile need not check again
        assert isinstance(dbapi_connection, AdaptedConnection)  # asyncpg, adapted
        # On asyncpg's own connection: through the adapted cursor the read would begin a
        # transaction that the pool then has to end.
        autovacuum = dbapi_connection.run_async(
            lambda driver: driver.fetchval("SELECT current_setting('autovacuum')")
        )
        if autovacuum != "on":
            log.warning(
                "PostgreSQL runs without autovacuum: nothing removes dead rows or refreshes "
                "statistics unless VACUUM ANALYZE is run on a schedule",
                extra={"autovacuum": autovacuum},
            )
