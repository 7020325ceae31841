"""The channels of a worker or a client: one per server address, over TLS or not, the address
in use, and the token a call carries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from opscore.v1 import agent_lifecycle_pb2_grpc, workflow_service_pb2_grpc

KEEPALIVE = [
    # A ping every 30 s on a quiet connection finds a server that vanished (a partition, a
    # killed host) without waiting for TCP; the server allows one every 10 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnection is the worker's own (its backoff, over its addresses): a channel that
    # lost its server tries again soon, not after gRPC's default of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


@dataclass(frozen=True)
class Tls:
    """TLS to the servers: PEM files, as the server's own TLS settings take them.

    `root_certificates` is the bundle of authorities the server's certificate must chain to
    (None: the system's). `certificate` and `private_key` are the worker's client certificate
    and unencrypted key, for servers that require mutual TLS (`--tls-client-ca`); a certificate
    whose URI SAN is `opscore://agent/<agent_id>` identifies the agent without a token.
    """

    root_certificates: Path | str | None = None
    certificate: Path | str | None = None
    private_key: Path | str | None = None

    def __post_init__(self) -> None:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError(
                "a client certificate needs its private key, and a key its certificate"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials of these files, read now."""
        return grpc.ssl_channel_credentials(
            _read(self.root_certificates), _read(self.private_key), _read(self.certificate)
        )


def _read(path: Path | str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata of a call that carries `token` (none without one)."""
    return () if not token else (("authorization", f"Bearer {token}"),)


class Stubs:
    """Both services on one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)


class Channels:
    """A channel to each address, opened on first use, and the address the worker uses now;
    `advance` moves on to the next (round the list) when that one fails."""

    def __init__(self, addresses: Sequence[str], tls: Tls | None) -> None:
        if not addresses:
            raise ValueError("at least one server address is needed")
        self.addresses = list(addresses)
        self._credentials = None if tls is None else tls.credentials()
        self._index = 0
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, Stubs] = {}

    @property
    def address(self) -> str:
        """The address in use."""
        return self.addresses[self._index]

    def current(self) -> Stubs:
        """The stubs on the channel to the address in use."""
        if self._index not in self._stubs:
            address = self.addresses[self._index]
            channel = (
                grpc.aio.insecure_channel(address, options=KEEPALIVE)
                if self._credentials is None
                else grpc.aio.secure_channel(address, self._credentials, options=KEEPALIVE)
            )
            self._channels[self._index] = channel
            self._stubs[self._index] = Stubs(channel)
        return self._stubs[self._index]

    def advance(self) -> None:
        """Use the next address from now on."""
        self._index = (self._index + 1) % len(self.addresses)

    async def close(self) -> None:
        """Close every channel opened (calls still on them end CANCELLED)."""
        channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            await channel.close()
