"""Open task streams: one bounded outgoing buffer per connected agent.

Plain asyncio, no gRPC: the engine pushes assignments and cancellations into a stream, encoded
once for the wire (by the function the server gives), the servicer takes them onto the wire one
at a time, and closing it (replaced by a newer stream, agent deregistered, server draining,
stalled) ends the servicer's loop with the reason.

The buffer is what waits in the stream plus the message being written: gRPC's write waits while
the client's flow-control window is full, so an agent that does not read shows up here as
messages the servicer does not take. A stream at or over its bound in messages or bytes is
`backlogged`, and the dispatcher gives its agent no new work until it drains below; a stream
that has had messages waiting with none taken for the stall timeout is `stalled`, and is closed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from opscore.domain.errors import OpsCoreError
from opscore.domain.models import StreamEvent

Encode = Callable[[StreamEvent], tuple[Any, int]]
"""An event as the wire carries it, and its size in bytes."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """How much one stream may hold before its agent gets no new work, and how long it may
    hold it without taking any before it is closed."""

    max_messages: int = 64
    max_bytes: int = 8 * 1024 * 1024
    stall_timeout: float = 30.0
    """Seconds."""


@dataclass(frozen=True, slots=True)
class StreamWatch:
    """What a stream reports: its buffer crossing its bound (True: over), and a stall."""

    backlogged: Callable[[AgentStream, bool], None]
    stalled: Callable[[AgentStream], None]


def _unwatched_backlog(_stream: AgentStream, _over: bool) -> None:
    """No one to tell (a stream no engine watches)."""


def _unwatched_stall(_stream: AgentStream) -> None:
    """No one to tell (a stream no engine watches)."""


UNWATCHED = StreamWatch(_unwatched_backlog, _unwatched_stall)


class AgentStream:
    """One agent's open stream of task events, encoded, with its buffer's size."""

    def __init__(
        self,
        agent_id: str,
        encode: Encode,
        limits: StreamLimits = StreamLimits(),
        watch: StreamWatch = UNWATCHED,
        token_digest: str | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.generation: int | None = None
        """Its number among the streams the agent opened on any replica, as the database
        recorded its opening (None until that committed): what its closing names, so that it
        never closes a newer stream, opened here or on another replica."""
        self.token_digest = token_digest
        """The digest of the agent token that opened it, if one did: revoking the token ends
        the stream."""
        self._encode = encode
        self._limits = limits
        self._watch = watch
        self._waiting: deque[tuple[Any, int]] = deque()
        self._writing = 0
        """Bytes of the message being written (0: none)."""
        self.buffered_bytes = 0
        """Bytes waiting plus those of the message being written."""
        self.backlogged = False
        self.pushed = 0
        """Events queued over the stream's life: all reach the agent, in order, unless the
        stream is closed with a reason (which drops those still waiting)."""
        self._wake = asyncio.Event()
        self._end: OpsCoreError | None = None
        self.closed = False
        self._taken_at = 0.0
        """Loop time of the last progress: a message taken, or the buffer filling from empty."""
        self._stall_timer: asyncio.TimerHandle | None = None

    @property
    def buffered_messages(self) -> int:
        """Messages waiting plus the one being written."""
        return len(self._waiting) + (1 if self._writing else 0)

    def push(self, event: StreamEvent) -> None:
        """Queue an event for the agent; dropped if the stream is closed (the database keeps the
        task held by the agent, and it is sent again when the agent reconnects).
        """
        if self.closed:
            return
        message, size = self._encode(event)
        size = max(size, 1)  # an empty message is still a message on the wire
        self.pushed += 1
        if not self.buffered_messages:
            self._taken_at = asyncio.get_running_loop().time()
        self._waiting.append((message, size))
        self.buffered_bytes += size
        self._wake.set()
        self._check_bound()
        if self._stall_timer is None:
            self._arm_stall_timer()

    def close(self, reason: OpsCoreError | None = None) -> None:
        """End the stream: normally (None) after the messages already queued, or with `reason`
        at once, dropping them (their tasks stay held, and are sent again on reconnection).
        """
        if self.closed:
            return
        self.closed = True
        self._end = reason
        if reason is not None:
            self._waiting.clear()
            self.buffered_bytes = self._writing
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._wake.set()

    async def messages(self) -> AsyncIterator[Any]:
        """The encoded messages, in order, until the stream is closed. A message counts in the
        buffer until the next one is asked for, that is until the caller has written it."""
        while True:
            if self._writing:
                self.buffered_bytes -= self._writing
                self._writing = 0
                self._taken_at = asyncio.get_running_loop().time()
                self._check_bound()
            while not self._waiting and not self.closed:
                self._wake.clear()
                await self._wake.wait()
            if not self._waiting:
                break
            message, self._writing = self._waiting.popleft()
            yield message
        if self._end is not None:
            raise self._end

    def _check_bound(self) -> None:
        limits = self._limits
        over = (
            self.buffered_messages >= limits.max_messages or self.buffered_bytes >= limits.max_bytes
        )
        if over != self.backlogged:
            self.backlogged = over
            self._watch.backlogged(self, over)

    def _arm_stall_timer(self) -> None:
        loop = asyncio.get_running_loop()
        when = self._taken_at + self._limits.stall_timeout
        self._stall_timer = loop.call_at(when, self._check_stall)

    def _check_stall(self) -> None:
        """Close the stream if nothing was taken for the stall timeout while messages waited;
        else look again when that could next be true (one timer per stream, never per message).
        """
        self._stall_timer = None
        if self.closed or not self.buffered_messages:
            return
        now = asyncio.get_running_loop().time()
        if now - self._taken_at >= self._limits.stall_timeout:
            self._watch.stalled(self)
        else:
            self._arm_stall_timer()


class Streams:
    """The open stream of each connected agent: at most one each."""

    def __init__(
        self, encode: Encode, limits: StreamLimits = StreamLimits(), watch: StreamWatch = UNWATCHED
    ) -> None:
        self._encode = encode
        self._limits = limits
        self._watch = watch
        self._open: dict[str, AgentStream] = {}

    def new_stream(self, agent_id: str, token_digest: str | None = None) -> AgentStream:
        """A stream for the agent, opened with the agent token of this digest (None: no
        agent token)."""
        return AgentStream(agent_id, self._encode, self._limits, self._watch, token_digest)

    def forget(self, agent_id: str) -> None:
        """The agent is gone (deregistered): drop its stream."""
        stream = self._open.pop(agent_id, None)
        if stream is not None:
            stream.close()

    def agent_ids(self) -> list[str]:
        """The agents with an open stream."""
        return list(self._open)

    def get(self, agent_id: str) -> AgentStream | None:
        """The agent's open stream, if any."""
        return self._open.get(agent_id)

    def is_current(self, stream: AgentStream) -> bool:
        """Whether `stream` is its agent's open stream."""
        return self._open.get(stream.agent_id) is stream

    def install(self, stream: AgentStream, replaced: OpsCoreError) -> None:
        """Make `stream` the agent's stream, closing the one it replaces with `replaced`."""
        previous = self._open.get(stream.agent_id)
        if previous is not None and previous is not stream:
            previous.close(replaced)
        self._open[stream.agent_id] = stream

    def remove(self, stream: AgentStream) -> bool:
        """Forget `stream` if it is still its agent's current one; True if it was."""
        if self._open.get(stream.agent_id) is stream:
            del self._open[stream.agent_id]
            return True
        return False

    def close_all(self, reason: OpsCoreError) -> None:
        """End every stream (the server is draining, or may no longer hold streams)."""
        for stream in list(self._open.values()):
            stream.close(reason)
