"""Why a server, or `opscore db upgrade`, could not start when its code is not at fault: the
address is taken, the database is owned by another server, cannot be reached or written, or its
migration is refused. The command reports such a failure as one CRITICAL log line and exits 1;
any other exception is a bug, and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy.exc import DBAPIError

from opscore.domain.errors import StorageFault
from opscore.store.migrate import MigrationRefused
from opscore.store.ownership import DatabaseOwned

EXPECTED = (DatabaseOwned, DBAPIError, OSError, MigrationRefused, StorageFault)
"""What the world, not the code, makes a database step fail with: another owner, the driver's
refusal (as such, or as the storage fault it means), the file system or the network, or Alembic
not knowing the database's revision."""


class StartupError(Exception):
    """What failed (`failed`, e.g. "cannot listen on localhost:50051"), why (`cause`), and the
    names of what failed as log fields (`subject`, e.g. `address=...`)."""

    def __init__(self, failed: str, cause: str, **subject: str) -> None:
        self.failed = failed
        self.cause = cause
        self.subject = subject
        super().__init__(f"{failed}: {cause}")


def _cause_of(error: BaseException) -> str:
    """The cause an operator needs: the driver's own message, without SQLAlchemy's statement
    and links."""
    if isinstance(error, StorageFault) and error.__cause__ is not None:
        return _cause_of(error.__cause__)
    if isinstance(error, DBAPIError) and error.orig is not None:
        return str(error.orig)
    return str(error)


@contextlib.contextmanager
def failing_as(failed: str, **subject: str) -> Iterator[None]:
    """Turn the EXPECTED failures of the steps inside into a StartupError."""
    try:
        yield
    except EXPECTED as error:
        raise StartupError(failed, _cause_of(error), **subject) from error
