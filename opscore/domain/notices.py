"""What replicas sharing one database tell each other once a write has committed: work that
became ready and that none of the writer's agents took, slots and attempts of agents that stream
from another replica, and agents whose rows changed (registered, reported a state, moved their
stream, were removed).

Notices are advice: the database is the truth, and a replica that may have missed some (its
listening connection was lost) rereads what they would have told it (`Noticeboard.run`'s
`missed`), as its periodic sweep does anyway. So they are sent after the commit, not inside it,
and a notice lost to a crash costs a few seconds of latency, never a task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from opscore.domain.models import Cancellation

REREAD_EVERY = timedelta(seconds=30)
"""How often a replica with peers rereads the agents streaming from it (their holds, tokens and
streams), notices or not."""


@dataclass(slots=True)
class Notice:
    """What one replica tells the others (several writes' worth, merged)."""

    sender: str
    """The replica id of the writer: a replica ignores its own notices."""
    ready: set[str] = field(default_factory=set)
    """Capabilities ("" for tasks that need none) that gained queued work no agent of the
    sender took."""
    released: list[tuple[str, str]] = field(default_factory=list)
    """(agent id, task id): holds that ended, of agents streaming from another replica."""
    cancelled: list[Cancellation] = field(default_factory=list)
    """Attempts to stop, of agents streaming from another replica."""
    agents: set[str] = field(default_factory=set)
    """Agents whose rows changed: their holders reread them."""
    joined: bool = False
    """The sender has just joined: the others have a peer to tell from now on, without
    waiting for their next renewal to count it."""
    watching: set[str] = field(default_factory=set)
    """Unfinished runs the sender's watchers watch (WatchWorkflowRun): the others tell it when
    they change one (see `domain.watch`)."""
    changed_runs: set[str] = field(default_factory=set)
    """Runs some other replica watches that the sender's commits changed."""

    def __bool__(self) -> bool:
        return bool(
            self.ready
            or self.released
            or self.cancelled
            or self.agents
            or self.joined
            or self.watching
            or self.changed_runs
        )


class Noticeboard(Protocol):
    """Where replicas post and read notices (PostgreSQL's LISTEN/NOTIFY)."""

    def post(self, notice: Notice) -> None:
        """Send `notice` soon: notices posted while one is being sent go out together, after
        it."""

    async def run(self, received: Callable[[Notice], None], missed: Callable[[], None]) -> None:
        """Listen until cancelled: every notice of another replica goes to `received`; when
        notices may have been missed (the connection was lost, and is back), `missed` is
        called."""
