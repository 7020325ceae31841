"""The persistence of Ops-Core, behind intention-named methods of `Store`.

Every statement is in this package, one module an aggregate (`agents`, `definitions`, `runs`,
`tasks`; what they share in `base`), except two kinds kept in modules of their own: writing
assignments and composing their messages (`store/assignments.py`), and the row changes of a
graph's transitions, run set-based (`store/changes.py`).

Statements are plain synchronous SQLAlchemy Core over a `Connection`: each operation runs whole
inside one transaction that `Database` runs for it (see `transactions.py`, and `sqlite.py` and
`postgres.py` for how each backend runs it). Writes go through the group-commit `Writer`; reads
run in a transaction of their own (a consistent snapshot). Methods that move tasks return
`Effects` and hand them to an `on_commit` callback inside the commit order, which is how the
dispatcher's memory follows the database without ever running ahead of it.

Statements that run often are built once, at import: building a Core statement costs several
times as much as running it on SQLite. Their
parameters are named `b_*` because SQLAlchemy reserves column names for the values of an UPDATE.
"""

from __future__ import annotations

from opscore.store.queries.agents import AgentQueries, NewRegistration, StreamOpened
from opscore.store.queries.definitions import DefinitionQueries
from opscore.store.queries.runs import RunQueries
from opscore.store.queries.tasks import TaskQueries

__all__ = ["NewRegistration", "Store", "StreamOpened"]


class Store(AgentQueries, DefinitionQueries, RunQueries, TaskQueries):
    """The persistence of Ops-Core (see the package docstring): one object with the methods of
    every aggregate, sharing the writer, the database and the caches of `StoreBase`. It is the
    engine's `ports.Persistence`, structurally."""
