"""The standard health service: Check and Watch, serving and draining."""

from __future__ import annotations

import asyncio

import grpc
from conftest import ServerFactory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import connect, reason_of, refused

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_watch_reports_serving_then_not_serving_on_drain(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    async with start_server(sqlite_url, shutdown_grace=1.0) as server:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            health = health_pb2_grpc.HealthStub(channel)
            checked = await health.Check(
                health_pb2.HealthCheckRequest(service="opscore.v1.WorkflowService")
            )
            assert checked.status == SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(watch.read(), 5)
            assert first.status == SERVING
            stopping = asyncio.create_task(server.stop())
            seen = await asyncio.wait_for(watch.read(), 5)
            assert seen.status == NOT_SERVING
            await stopping
        finally:
            await channel.close()


async def test_check_of_an_unknown_service_is_not_found_with_error_info(
    start_server: ServerFactory, sqlite_url: str
) -> None:
    """The health service's own refusals carry the ErrorInfo every error carries."""
    async with start_server(sqlite_url) as server, connect(server.port) as client:
        health = health_pb2_grpc.HealthStub(client.channel)
        call = health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        error = await refused(call, grpc.StatusCode.NOT_FOUND)
        assert reason_of(error) == "NOT_FOUND"
