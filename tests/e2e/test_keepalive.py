"""What the server enforces on each HTTP/2 connection: clients that ping too often are cut off
(GOAWAY ENHANCE_YOUR_CALM, "too_many_pings") without harm to anyone else's connection, pings at
the allowed pace never are; the calls a connection may have open at once are announced, a client
that keeps to that number queues the rest, and one that does not is refused them.

Real gRPC clients show what clients see. Other tests speak HTTP/2 frames on a bare socket, to
count each ping exactly (gRPC's own client never pings more than once a second, whatever it is
asked) and to open more calls than the server allows (gRPC's client never does).
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple

import auth
import grpc
from conftest import ServerFactory
from helpers import WAIT, Client, definition, task
from opscore.v1 import agent_lifecycle_pb2, agent_lifecycle_pb2_grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x1, 0x3, 0x4, 0x6, 0x7
ACK = 0x1
END_HEADERS = 0x4
MAX_CONCURRENT_STREAMS = 0x3
REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x7, 0xB

PINGING_TOO_OFTEN = [
    ("grpc.keepalive_time_ms", 50),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
"""A client that would ping every 50 ms, with or without calls, data or none."""
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
"""Keeps a channel off the connection another channel of this process has to the same server."""


class Frame(NamedTuple):
    """An HTTP/2 frame."""

    kind: int
    flags: int
    payload: bytes
    stream: int = 0


class Http2:
    """A bare HTTP/2 connection to the server, with no call on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.settings: dict[int, int] = {}
        """The server's settings, by identifier."""

    async def send(self, kind: int, payload: bytes = b"", flags: int = 0, stream: int = 0) -> None:
        header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
        self._writer.write(header + payload)
        await self._writer.drain()

    async def receive(self) -> Frame:
        header = await self._reader.readexactly(9)
        payload = await self._reader.readexactly(int.from_bytes(header[:3], "big"))
        return Frame(header[3], header[4], payload, int.from_bytes(header[5:], "big") & 0x7FFFFFFF)

    async def call(self, stream: int, path: str) -> None:
        """Open a call to the method at `path` on `stream`, sending no request yet (so it
        stays open)."""
        headers = {
            ":method": "POST",
            ":scheme": "http",
            ":path": path,
            ":authority": "localhost",
            "content-type": "application/grpc",
            "te": "trailers",
        }
        # Each a literal field, neither indexed nor Huffman-coded: the simplest HPACK there is.
        block = b"".join(
            bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
            for name, value in headers.items()
        )
        await self.send(HEADERS, block, END_HEADERS, stream)

    async def handshake(self) -> None:
        """Exchange settings. The server's first frames (its settings, and a window update that
        starts its count of early pings afresh) are sent before it acknowledges ours."""
        self._writer.write(PREFACE)
        await self.send(SETTINGS)
        acknowledged = False
        while not (acknowledged and self.settings):
            frame = await self.receive()
            if frame.kind == SETTINGS and frame.flags & ACK:
                acknowledged = True
            elif frame.kind == SETTINGS:
                entries = struct.iter_unpack(">HI", frame.payload)
                self.settings.update(dict(entries))
                await self.send(SETTINGS, flags=ACK)

    async def pinged(self, number: int) -> bool:
        """Send ping `number`, then settings, whose acknowledgement follows whatever the ping
        made the server send: whether the ping was acknowledged and the connection left open."""
        opaque = number.to_bytes(8, "big")
        await self.send(PING, opaque)
        await self.send(SETTINGS)
        frames = [await self.receive()]
        while not (frames[-1].kind == SETTINGS and frames[-1].flags & ACK):
            frames.append(await self.receive())
        return Frame(PING, ACK, opaque) in frames and all(f.kind != GOAWAY for f in frames)

    async def until_closed(self) -> list[Frame]:
        """The frames the server sends until it closes the connection."""
        frames = []
        while True:
            try:
                frames.append(await self.receive())
            except asyncio.IncompleteReadError:
                return frames


@asynccontextmanager
async def http2(port: int) -> AsyncIterator[Http2]:
    """A bare HTTP/2 connection to the server on `port`, settings exchanged."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        connection = Http2(reader, writer)
        async with asyncio.timeout(WAIT):
            await connection.handshake()
        yield connection
    finally:
        writer.close()


def too_many_pings(frame: Frame) -> bool:
    """Whether `frame` is the GOAWAY gRPC sends a client that pinged too often."""
    return (
        frame.kind == GOAWAY
        and int.from_bytes(frame.payload[4:8], "big") == ENHANCE_YOUR_CALM
        and frame.payload[8:] == b"too_many_pings"
    )


async def test_a_client_pinging_too_often_is_cut_off_and_other_clients_keep_working(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, min_ping_interval=60.0, max_ping_strikes=1) as server,
        auth.channel(
            f"127.0.0.1:{server.port}", options=[*PINGING_TOO_OFTEN, OWN_CONNECTION]
        ) as pinging,
        auth.channel(f"127.0.0.1:{server.port}", options=[OWN_CONNECTION]) as calm,
    ):
        noisy_client, calm_client = Client(pinging, server), Client(calm, server)
        noisy = await noisy_client.agent("noisy")
        steady = await calm_client.agent("steady", capabilities=["work"])
        # Its stream is quiet, so nothing resets its strikes: the third ping (about two seconds
        # in, at the client's own limit of a ping a second) closes the connection.
        assert await noisy.wait_stream_ended(timeout=8.0) == grpc.StatusCode.UNAVAILABLE
        assert noisy.stream_error is not None
        assert re.search("too.many.pings", noisy.stream_error.details() or "", re.IGNORECASE)
        assert not steady.stream_ended.is_set()
        created = await calm_client.create(definition("after", task("t", capability="work")))
        run = await calm_client.trigger(definition_id=created.definition_id)
        assert (await steady.next_assignment()).run_id == run.run_id
        await noisy_client.close()
        await calm_client.close()


async def test_a_connection_is_forgiven_max_ping_strikes_early_pings_and_no_more(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, min_ping_interval=60.0, max_ping_strikes=3) as server,
        http2(server.port) as connection,
    ):
        async with asyncio.timeout(WAIT):
            # The first ping is on time; the next three are strikes, forgiven.
            for number in range(1, 5):
                assert await connection.pinged(number)
            # The fourth strike closes the connection (whether its ping is acknowledged first
            # is gRPC's affair). Nothing more is sent: a write after the close would be reset.
            await connection.send(PING, bytes(8))
            assert any(too_many_pings(frame) for frame in await connection.until_closed())


async def test_pings_the_allowed_interval_apart_are_never_strikes(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, min_ping_interval=0.01, max_ping_strikes=1) as server,
        http2(server.port) as connection,
    ):
        async with asyncio.timeout(WAIT):
            for number in range(1, 6):
                # Sent after the previous one was answered and a pause five times the interval:
                # the server cannot see two of them closer than that.
                await asyncio.sleep(0.05)
                assert await connection.pinged(number)


async def test_a_client_queues_the_calls_a_connection_may_not_have_open_yet(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, max_streams_per_connection=2) as server,
        auth.channel(f"127.0.0.1:{server.port}") as channel,
    ):
        lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        # Each call ends as the next may start: none is refused for one not yet freed.
        answers = await asyncio.gather(
            *(lifecycle.ListAgents(agent_lifecycle_pb2.ListAgentsRequest()) for _ in range(60))
        )
        assert len(answers) == 60


async def test_a_client_opening_more_calls_than_announced_is_refused_them(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with (
        start_server(sqlite_url, max_streams_per_connection=2) as server,
        http2(server.port) as connection,
    ):
        assert connection.settings[MAX_CONCURRENT_STREAMS] == 2
        async with asyncio.timeout(WAIT):
            for stream in (1, 3, 5):
                await connection.call(stream, "/opscore.v1.AgentLifecycle/ListAgents")
            frame = await connection.receive()
            while frame.kind != RST_STREAM:
                frame = await connection.receive()
        assert frame.stream == 5
        assert int.from_bytes(frame.payload, "big") == REFUSED_STREAM
