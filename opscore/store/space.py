"""The free-space reserve: new work is refused while the database's disk has less free space than
the reserve, so that the work already accepted (results, assignments, heartbeats) can finish.

Without it a disk fills up with new runs until every write fails, completions included, and the
runs already under way can neither finish nor fail. With it, triggers and new definitions are
refused early (`StorageReserve`, before anything is written) while everything else still goes
through, into the space the reserve kept.

On SQLite the disk is the database file's, read with `statvfs` at most once per `LOOK_EVERY`, so
a trigger pays a clock read and a comparison. PostgreSQL's disk is the database server's, which
Ops-Core cannot see: no reserve is kept there (its disk filling up is `StorageFull`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from opscore.domain.errors import StorageReserve
from opscore.store.database import normalize_url, sqlite_file

log = logging.getLogger("opscore.store")

LOOK_EVERY = 1.0
"""Seconds a look at the free space holds before the next one."""

RESERVE_RETRY = timedelta(seconds=5)
"""When a client refused for the reserve may try again: space comes back when someone frees
it."""


class FreeSpaceReserve:
    """The domain's `ports.Admission` (see the module docstring). `directory` is where the database
    file lives (None: no reserve, as on PostgreSQL or in memory); `reserve` in bytes, 0 for
    none; `clock` in monotonic seconds."""

    def __init__(
        self,
        directory: Path | None,
        reserve: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._reserve = reserve if directory is not None else 0
        self._clock = clock
        self._next_look = float("-inf")
        self._free: int | None = None
        """Free bytes at the last look, None while at least the reserve is free."""

    def admit_new_work(self) -> None:
        """Raise `StorageReserve` while the free space is below the reserve."""
        if not self._reserve:
            return
        now = self._clock()
        if now >= self._next_look:
            self._next_look = now + LOOK_EVERY
            self._look()
        if self._free is not None:
            raise StorageReserve(self._free, self._reserve, RESERVE_RETRY)

    def _look(self) -> None:
        assert self._directory is not None  # a reserve is kept only with a directory
        try:
            stats = os.statvfs(self._directory)
        except OSError as error:
            # Nothing to judge by: the writes themselves will say what is wrong.
            log.warning("cannot read the free space", extra={"cause": str(error)})
            return
        free = stats.f_bavail * stats.f_frsize
        below = free < self._reserve
        if below and self._free is None:
            log.warning(
                "free space below the reserve: refusing new work",
                extra={"free_bytes": free, "reserve_bytes": self._reserve},
            )
        elif not below and self._free is not None:
            log.info(
                "free space above the reserve again: accepting new work",
                extra={"free_bytes": free, "reserve_bytes": self._reserve},
            )
        self._free = free if below else None


def reserve_for(url: str, reserve: int) -> FreeSpaceReserve:
    """The free-space reserve of the database of `url`: `reserve` bytes on an SQLite file's
    disk, none elsewhere."""
    path = sqlite_file(url) if normalize_url(url).startswith("sqlite") else None
    return FreeSpaceReserve(None if path is None else path.parent, reserve)
