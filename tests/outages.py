"""Storage that fails on purpose, from outside the server: a small tmpfs to fill, an ext4 image
that turns read-only, a TCP proxy to cut between the server and PostgreSQL; and how a client
sees the outcome (the status details of a refusal, the health service's statuses).

Mounting needs root (the tests skip with the reason otherwise); every mount is undone on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import WAIT, status_of

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def _unmount(where: Path) -> None:
    """Unmount `where`; if something still has a file open there, detach it all the same (it
    goes once the file is closed), so that no mount outlives the test."""
    if _run("umount", str(where)).returncode != 0:
        _run("umount", "--lazy", str(where))


def _mount_or_skip(*arguments: str) -> None:
    mounted = _run("mount", *arguments)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(arguments)}): {mounted.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "8m") mounted at `where` (created) for the block."""
    where.mkdir()
    _mount_or_skip("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    try:
        yield where
    finally:
        _unmount(where)


@dataclass(frozen=True, slots=True)
class Ext4:
    """An ext4 file system on a loop device, which turns read-only on its first error (as
    `errors=remount-ro` makes it do when a disk fails under it)."""

    image: Path
    mountpoint: Path
    device: str

    def turn_read_only(self) -> None:
        """Have ext4 report an error of its own: it remounts itself read-only at once, with
        the server's files open (Linux refuses a `mount -o remount,ro` while files are open for
        writing, and does not let a file system that ext4 made read-only become writable again
        while it is mounted)."""
        name = Path(self.device).name
        Path(f"/sys/fs/ext4/{name}/trigger_fs_error").write_text("test\n")

    def mount_again(self) -> None:
        """Unmount (nothing may have a file open) and mount again, writable."""
        unmounted = _run("umount", str(self.mountpoint))
        assert unmounted.returncode == 0, unmounted.stderr
        _mount_or_skip(*_EXT4_OPTIONS, str(self.image), str(self.mountpoint))


@contextlib.contextmanager
def ext4_image(where: Path, size: str = "32M") -> Iterator[Ext4]:
    """An ext4 image file without a journal, mounted on a loop device at `where`."""
    image = where.with_suffix(".img")
    made = _run("truncate", "-s", size, str(image))
    formatted = _run("mkfs.ext4", "-q", "-O", "^has_journal", str(image))
    if made.returncode != 0 or formatted.returncode != 0:
        pytest.skip(f"cannot make an ext4 image: {made.stderr}{formatted.stderr}".strip())
    where.mkdir()
    _mount_or_skip(*_EXT4_OPTIONS, str(image), str(where))
    try:
        device = _run("findmnt", "-n", "-o", "SOURCE", str(where)).stdout.strip()
        if not Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").exists():
            pytest.skip("this kernel's ext4 has no trigger_fs_error")
        yield Ext4(image, where, device)
    finally:
        _unmount(where)


_EXT4_OPTIONS = ("-o", "loop,errors=remount-ro")


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a file into `directory` until its file system has at most `leave` bytes free (or
    none at all); the file, which frees the space again when deleted."""
    filler = directory / "filler"
    stats = os.statvfs(directory)
    to_write = max(0, stats.f_bavail * stats.f_frsize - leave)
    chunk = b"\0" * (1 << 16)
    with filler.open("wb") as sink:
        try:
            while to_write > 0:
                sink.write(chunk[: min(len(chunk), to_write)])
                sink.flush()
                to_write -= min(len(chunk), to_write)
            if leave == 0:
                while True:  # up to the last block
                    sink.write(chunk)
                    sink.flush()
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return filler


@dataclass(frozen=True, slots=True)
class Refusal:
    """What a client learns from a refused call: its status, and the reason and retry delay
    the details carry."""

    code: grpc.StatusCode
    reason: str
    retry_delay: float | None


def refusal(error: grpc.aio.AioRpcError) -> Refusal:
    """The refusal an error carries (no reason nor delay when it carries no details: a server
    that was not there to answer)."""
    status = status_of(error)
    reason = ""
    retry_delay: float | None = None
    for detail in () if status is None else status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
    return Refusal(error.code(), reason, retry_delay)


async def outcome(call: Any) -> Refusal | None:
    """None if the call succeeded, else its refusal."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return refusal(error)
    return None


class HealthWatch:
    """The statuses the health service's Watch sends for one service name, as they come."""

    def __init__(self, channel: grpc.aio.Channel, service: str = "") -> None:
        self._call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service)
        )
        self.seen: list[int] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for response in self._call:
                async with self._changed:
                    self.seen.append(response.status)
                    self._changed.notify_all()

    async def until(self, status: int, timeout: float = WAIT) -> None:
        """Wait (bounded) until the last status sent is `status`."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: bool(self.seen) and self.seen[-1] == status)

    async def close(self) -> None:
        """Stop watching."""
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def watching(channel: grpc.aio.Channel, service: str = "") -> AsyncIterator[HealthWatch]:
    """A HealthWatch for the block."""
    watch = HealthWatch(channel, service)
    try:
        await watch.until(SERVING)
        yield watch
    finally:
        await watch.close()


class Proxy:
    """A TCP proxy on loopback in front of `target` (host, port), which the test cuts (every
    connection through it closed, new ones refused) and restores on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (again), on the port of the first start."""
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and close every open one."""
        assert self._server is not None
        self._server.close()
        self._server = None
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()
        await asyncio.sleep(0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._connections.update((writer, upstream_writer))
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(1 << 16):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
        self._connections.discard(sink)

    async def close(self) -> None:
        """Cut, and stop every pump."""
        if self._server is not None:
            await self.cut()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


@contextlib.asynccontextmanager
async def proxy(target: tuple[str, int]) -> AsyncIterator[Proxy]:
    """A started Proxy for the block."""
    started = Proxy(target)
    await started.start()
    try:
        yield started
    finally:
        await started.close()
