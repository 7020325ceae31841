"""Clients and server processes over TLS, for the tests of TLS and of secrets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import auth
import grpc
from certs import Authority, Issued
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import START_WAIT, ServerProcess


def tls_channel(
    port: int, trusted: Authority, client: Issued | None = None, *, tokens: bool = True
) -> grpc.aio.Channel:
    """A channel over TLS that trusts `trusted` alone and presents `client`'s certificate; its
    calls carry the test's tokens (see tests/auth.py) unless `tokens` is False."""
    credentials = grpc.ssl_channel_credentials(
        trusted.cert_pem,
        None if client is None else client.key_pem,
        None if client is None else client.cert_pem,
    )
    interceptors = auth.interceptors() if tokens else None
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, interceptors=interceptors)


class TlsServerProcess(ServerProcess):
    """`opscore serve` over TLS: SERVING is asked over a channel that trusts `trusted`."""

    def __init__(self, *args: Any, trusted: Authority, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trusted = trusted

    @classmethod
    def in_folder(
        cls, folder: Path, port: int, trusted: Authority, environment: dict[str, str]
    ) -> TlsServerProcess:
        """`opscore serve` on `port` and a SQLite file in `folder` (its log there too), with
        exactly `environment`."""
        return cls(
            ["--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{folder / 'opscore.db'}"],
            port=port,
            log=folder / "serve.log",
            cwd=folder,
            environment=environment,
            trusted=trusted,
        )

    async def wait_serving(self, timeout: float = START_WAIT) -> None:
        async with asyncio.timeout(timeout):
            while not await self._serving():
                assert self.returncode is None, f"opscore serve exited: {self.log_text()}"
                await asyncio.sleep(0.05)

    async def _serving(self) -> bool:
        async with tls_channel(self.port, self.trusted) as channel:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING
