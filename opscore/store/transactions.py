"""How a store operation runs: whole inside one transaction, the same way on every backend.

Every store operation is plain synchronous SQLAlchemy over a `Connection`, run whole inside one
transaction by `Database.run`. How that transaction reaches its database is the only thing that
differs between the backends: `sqlite.py` and `postgres.py` each implement `Database` for theirs,
and `database.py` opens the one a URL names.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Connection

from opscore.domain.health import StorageHealth
from opscore.store.faults import classify

T = TypeVar("T")

Work = Callable[[Connection], T]
"""A store operation: statements over a connection, run whole inside one transaction."""
Committed = Callable[[T], None] | None
"""What to tell once a write has committed (see `Database.run`)."""


class Database(abc.ABC):
    """Runs store operations, each in one transaction (see the module docstring)."""

    dialect: str
    """`sqlite` or `postgresql`."""
    health: StorageHealth
    """Told how every transaction went (see `run`)."""

    async def run(
        self,
        work: Callable[[Connection], T],
        *,
        write: bool,
        alone: bool = False,
        committed: Callable[[T], None] | None = None,
    ) -> T:
        """Run `work` in one transaction, committed if it returns, rolled back if it raises.
        Writes must come from one caller at a time (the `Writer`). `alone`: a write that the
        server has nothing else to do beside (see `Writer.run`). `committed` (it must not raise)
        is given a write's value once it has committed, before the caller resumes: on SQLite in
        the loop's turn that learns of the commit from the writer thread, a turn sooner.

        An error that means storage cannot be used now is raised as the `StorageFault` it
        means (see `faults.py`), and `health` is told of every transaction's outcome; any other
        error is raised as it is."""
        try:
            value = await self._run(work, write, alone, committed)
        except Exception as error:
            fault = classify(error)
            if fault is None:
                raise
            self.health.failed(fault, write)
            raise fault from error
        self.health.succeeded(write)
        return value

    @abc.abstractmethod
    async def _run(self, work: Work[T], write: bool, alone: bool, committed: Committed[T]) -> T:
        """`run` on this backend, its errors as the driver raised them."""

    @abc.abstractmethod
    async def dispose(self) -> None:
        """Close every connection."""

    @abc.abstractmethod
    async def maintain(self) -> None:
        """Upkeep the database needs while the server runs, until cancelled (it may return at
        once when there is none)."""
