"""The persistence of Ops-Core: one repository an aggregate, composed into `Store`.

Every statement is in this package, one module an aggregate (`agents`, `definitions`, `runs`,
`tasks`, `timers`, `replicas`; what they share in `base`), except two kinds kept in modules of
their own: writing assignments (`store/assignments.py`), and the row changes a decision of the state
machine makes, run set-based (`store/changes.py`). The repositories share one `Shared`: the
writer and the database, the state machine they ask for every outcome, and the caches of what
never changes.

Statements are plain synchronous SQLAlchemy Core over a `Connection`: each operation runs whole
inside one transaction that `Database` runs for it (see `transactions.py`, and `sqlite.py` and
`postgres.py` for how each backend runs it). Writes go through the group-commit `Writer`; reads
run in a transaction of their own (a consistent snapshot). The effects of a write that moves
tasks travel one way: to its batch (for the placement before the commit), then to its
`on_commit` callback inside the commit order, which is how the dispatcher's memory follows the
database without ever running ahead of it. Callers get the rest of the write's result.

Statements that run often are built once, at import: building a Core statement costs several
times as much as running it on SQLite. Their parameters are named `b_*` because SQLAlchemy
reserves column names for the values of an UPDATE.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from opscore.domain.ports import Assigned, Place, Rules
from opscore.store.queries.agents import Agents, NewRegistration, StreamOpened
from opscore.store.queries.base import Shared
from opscore.store.queries.definitions import Definitions
from opscore.store.queries.replicas import Replicas
from opscore.store.queries.runs import Runs
from opscore.store.queries.tasks import Tasks
from opscore.store.queries.timers import Timers
from opscore.store.transactions import Database
from opscore.store.writer import BeforeCommit, Writer

__all__ = ["NewRegistration", "Store", "StreamOpened"]


class Store:
    """The persistence of Ops-Core (see the package docstring): one repository an aggregate,
    sharing one writer, one database, the state machine and the caches of what never changes
    (`Shared`). It is the engine's `ports.Persistence`, structurally."""

    def __init__(
        self, database: Database, writer: Writer, rules: Rules, replica_id: str | None = None
    ) -> None:
        self.shared = Shared(database, writer, rules, replica_id)
        self.agents = Agents(self.shared)
        self.definitions = Definitions(self.shared)
        self.runs = Runs(self.shared)
        self.tasks = Tasks(self.shared)
        self.timers = Timers(self.shared)
        self.replicas = Replicas(self.shared)

    @property
    def database(self) -> Database:
        """The database every repository runs its transactions on."""
        return self.shared.database

    async def probe(self) -> None:
        """Whether storage answers and takes writes (see `Shared.probe`)."""
        await self.shared.probe()

    def placement(
        self, place: Place, on_commit: Assigned, now: Callable[[], datetime]
    ) -> BeforeCommit:
        """What every write batch does before it commits (see `Tasks.placement`)."""
        return self.tasks.placement(place, on_commit, now)
