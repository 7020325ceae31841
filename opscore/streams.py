"""Open task streams: one outgoing queue per connected agent.

Plain asyncio, no gRPC: the servicer drains a stream's events onto the wire, the engine pushes
assignments and cancellations into it, and closing it (replaced by a newer stream, agent
deregistered, server draining) ends the servicer's loop with the reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from opscore.domain.errors import OpsCoreError
from opscore.domain.models import StreamEvent


class AgentStream:
    """One agent's open stream of task events."""

    def __init__(self, agent_id: str, generation: int) -> None:
        self.agent_id = agent_id
        self.generation = generation
        """How many streams the agent had opened before this one (on this server)."""
        self._queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
        self._end: OpsCoreError | None = None
        self.closed = False

    def push(self, event: StreamEvent) -> None:
        """Queue an event for the agent; dropped if the stream is closed (the database keeps the
        task held by the agent, and it is sent again when the agent reconnects).
        """
        if not self.closed:
            self._queue.put_nowait(event)

    def close(self, reason: OpsCoreError | None = None) -> None:
        """End the stream after the events already queued; `reason` ends it with that error,
        None ends it normally.
        """
        if not self.closed:
            self.closed = True
            self._end = reason
            self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[StreamEvent]:
        """The events, in order, until the stream is closed."""
        while (event := await self._queue.get()) is not None:
            yield event
        if self._end is not None:
            raise self._end


class Streams:
    """The open stream of each connected agent: at most one each."""

    def __init__(self) -> None:
        self._open: dict[str, AgentStream] = {}
        self._opened: dict[str, int] = {}

    def new_stream(self, agent_id: str) -> AgentStream:
        """A stream for the agent, numbered after every stream it opened before."""
        generation = self._opened.get(agent_id, 0) + 1
        self._opened[agent_id] = generation
        return AgentStream(agent_id, generation)

    def is_newest(self, stream: AgentStream) -> bool:
        """Whether no newer stream of the same agent has begun to open."""
        return self._opened.get(stream.agent_id) == stream.generation

    def forget(self, agent_id: str) -> None:
        """The agent is gone (deregistered): drop what is known of its streams."""
        self._opened.pop(agent_id, None)
        stream = self._open.pop(agent_id, None)
        if stream is not None:
            stream.close()

    def get(self, agent_id: str) -> AgentStream | None:
        """The agent's open stream, if any."""
        return self._open.get(agent_id)

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
        """End every stream (the server is draining)."""
        for stream in list(self._open.values()):
            stream.close(reason)
