"""When a SQLite database's WAL is copied into its file, and when the WAL starts over.

SQLite by default copies the WAL into the database file (a checkpoint) inside a commit, which
stalls that batch and every request queued behind it. Here no commit checkpoints on its own
(`wal_autocheckpoint=0`, see `sqlite.py`): a checkpointer of its own copies the WAL beside the
writes, on a thread and connection of its own (see CHECKPOINT_EVERY), and the writer then starts
the WAL over between two of its transactions (see `WalCheckpoints.restart_due`).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection

from opscore.store.faults import classify

CHECKPOINT_EVERY = 200
"""Write transactions between two checkpoints (the WAL copied into the database file). A
checkpoint copies pages and syncs the file: 5-20 ms measured here, every couple of hundred
commits. Run inside a commit, as SQLite does by default, it stalls that batch and every request
queued behind it; here it runs PASSIVE (it blocks neither the writer nor readers) on a thread and
connection of its own, while writes go on."""

CHECKPOINT_ROWS = 10_000
"""Rows changed since the last checkpoint that call for the next one sooner than CHECKPOINT_EVERY
commits: a few triggers of runs of a thousand tasks write as much as hundreds of ordinary
commits, and the WAL they leave (appended to, never started over) made every commit after them
slower until the next checkpoint."""

CATCH_UP_FRAMES = 256
"""Most WAL frames (pages) the checkpointer leaves for the writer to copy before it starts the
WAL over (see `WalCheckpoints.restart_due`): it goes on copying until no more than this many
are left, at most CHECKPOINT_ROUNDS times."""

CHECKPOINT_ROUNDS = 8
"""Most PASSIVE checkpoints in a row one background checkpoint runs (see CATCH_UP_FRAMES)."""

HEAVY_FRAMES = 8192
"""WAL frames (32 MiB of pages) written since the previous checkpoint beyond which the writer does
not copy the rest itself at once (see `WalCheckpoints.restart_due`): right after 100,000 tasks
were inserted in bulk, copying the last few dozen pages held its next batch for 23-33 ms (the
database file's sync). Another checkpoint in the background goes first."""

log = logging.getLogger("opscore.store")


class WalCheckpoints:
    """The checkpoints of one SQLite database's WAL. The writer asks `restart_due` before each
    write transaction and tells `committed` after each one that committed; the checkpoints run
    on a thread of their own."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="opscore-sqlite-checkpoint")
        self._checkpoint: Future[int | None] | None = None
        """The background checkpoint under way or last run (see `_run`)."""
        self._commits_since_checkpoint = 0
        self._changes_at_checkpoint = 0
        """The writer connection's rows changed in all, when the last checkpoint began."""
        self._restart_pending = False
        self._frames_at_checkpoint = 0
        """The WAL's frames when the last background checkpoint ended; zero once the writer
        starts the WAL over (written by one side at a time: a checkpoint runs, or the writer
        looks at its result)."""

    def committed(self, changes: int) -> None:
        """Count a write transaction that committed (`changes`: the writer connection's rows
        changed in all), and start a checkpoint once one is due and none is under way."""
        self._commits_since_checkpoint += 1
        if (
            self._commits_since_checkpoint >= CHECKPOINT_EVERY
            or changes - self._changes_at_checkpoint >= CHECKPOINT_ROWS
        ) and (self._checkpoint is None or self._checkpoint.done()):
            self._commits_since_checkpoint = 0
            self._changes_at_checkpoint = changes
            self.start()

    def start(self) -> None:
        """Start a checkpoint in the background, after which the WAL is to start over."""
        self._checkpoint = self._executor.submit(self._run)
        self._restart_pending = True

    def restart_due(self) -> bool:
        """Whether the WAL is to be started over before the next write: once a checkpoint in the
        background has copied it. SQLite starts the WAL over, writing it again from its first
        byte, only when a write transaction begins after every frame in it was copied; while
        writes go on, a checkpoint beside them never catches up with the last commit, and the
        WAL grows without end (every commit appends to the file, so every fsync also writes its
        new size, which costs more than an fsync of pages written over). So the writer copies
        what was committed since that checkpoint began itself, on its thread, between two of its
        transactions:
        a few commits' pages (CATCH_UP_FRAMES), usually in under a millisecond. When the
        checkpointer left more (writes heavier than it could follow), or after a burst of writes
        (HEAVY_FRAMES), another checkpoint goes first."""
        checkpoint = self._checkpoint
        if not (self._restart_pending and checkpoint is not None and checkpoint.done()):
            return False
        written = checkpoint.result()
        if written is not None and written > HEAVY_FRAMES:
            # One more checkpoint first: it finds little to copy, and it waits out on its own
            # thread the sync that the database file takes after a burst.
            self._checkpoint = self._executor.submit(self._run)
            return False
        self._restart_pending = False
        if written is None:
            return False
        self._frames_at_checkpoint = 0  # the WAL starts over
        return True

    async def checkpointed(self) -> None:
        """Return once the checkpoint under way, if any, is done."""
        if self._checkpoint is not None:
            await asyncio.wrap_future(self._checkpoint)

    def _run(self) -> int | None:
        """Copy what the WAL holds into the database file, without waiting for anyone, again
        while writes add more than CATCH_UP_FRAMES meanwhile. Once few are left, the frames
        written since the previous checkpoint; None if more are left, or nothing could be done."""
        try:
            with self._engine.connect() as conn:
                dbapi_connection = conn.connection.dbapi_connection
                assert dbapi_connection is not None  # just checked out
                for _ in range(CHECKPOINT_ROUNDS):
                    busy, frames, copied = dbapi_connection.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchone()
                    if busy or frames - copied <= CATCH_UP_FRAMES:
                        # Frames count from the WAL's last start: what came since the
                        # previous checkpoint, unless the WAL started over since.
                        since = self._frames_at_checkpoint
                        written = frames - since if frames >= since else frames
                        self._frames_at_checkpoint = frames
                        return None if busy else written
        except Exception as error:  # noqa: BLE001 - the next one copies what this one did not
            _log_failure("checkpoint failed", error)
        return None

    def shutdown(self) -> None:
        """Stop the checkpointer's thread, once the checkpoint under way is done."""
        self._executor.shutdown()


def catch_up(dbapi_connection: DBAPIConnection) -> None:
    """On the writer's connection, between two transactions: copy the rest of the WAL into the
    database file, so that the next transaction writes the WAL again from its start."""
    try:
        dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except Exception as error:  # noqa: BLE001 - the WAL goes on growing until the next one
        _log_failure("checkpoint before restarting the WAL failed", error)


def _log_failure(event: str, error: Exception) -> None:
    """Log a failure beside the writes: a storage fault in one line (the outage itself is told
    by `StorageHealth`), anything else with its traceback."""
    fault = classify(error)
    if fault is None:
        log.warning(event, exc_info=error)
    else:
        log.warning(event, extra={"reason": fault.reason, "cause": fault.cause})
