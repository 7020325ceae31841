"""The pauses of a background loop: whether it waits for work now, and a way to wait for the
next time it does. Its owner combines them with what it knows (nothing queued, nothing due) into
an `idle` that a drain, or a test that must know the server is done with what it was given,
can wait for.
"""

from __future__ import annotations

import asyncio


class Pauses:
    """Marked by a loop as it stops to wait (`pause`) and as it goes on (`resume`): two
    attribute writes a pass, and a future only while someone waits for a pause."""

    def __init__(self) -> None:
        self.paused = False
        """Whether the loop waits now (for work, or for a time)."""
        self._next: asyncio.Future[None] | None = None

    def pause(self) -> None:
        """The loop stops to wait: whoever waits for its next pause goes on."""
        self.paused = True
        if self._next is not None:
            if not self._next.done():
                self._next.set_result(None)
            self._next = None

    def resume(self) -> None:
        """The loop goes on."""
        self.paused = False

    async def next_pause(self) -> None:
        """Return at the loop's next `pause` (not at the one it may be in now: whoever waits
        has found the loop busy, or about to be woken)."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        # Shared by every waiter: one of them cancelled must not cancel it for the others.
        await asyncio.shield(self._next)
