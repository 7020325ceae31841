"""Whether another process listens on the address a server is about to bind.

gRPC binds every address a host name resolves to and starts if any of them is free: with
`localhost` (its loopback addresses of both families) a second server took the one the first did
not hold, and ran beside it. gRPC's port sharing is off (see `OpsCoreServer._options`), so a bind
of a taken address fails in gRPC too; checking each address first names the address and its
cause, where gRPC says only that binding failed.
"""

from __future__ import annotations

import errno
import socket

from opscore.startup import StartupError

MAX_PORT = 65535
"""The largest TCP port: `getaddrinfo` wraps a larger one around rather than refusing it, and the
probe would bind another port than the one asked for."""

LOOPBACK = ("127.0.0.1", "::1")
"""The addresses gRPC binds for `localhost`, whatever the resolver says."""


def refuse_taken(listen: str) -> None:
    """Raise StartupError if another process listens on one of the addresses of `listen`
    (`host:port`; a port 0, to be chosen, is never taken). Anything else that would keep the
    address from being bound is left for gRPC to judge: a host that does not resolve, an address
    of a family the host lacks, a port out of range."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) <= MAX_PORT:
        return
    host = host.strip("[]")
    hosts = LOOPBACK if host == "localhost" else (host or None,)
    for name in hosts:
        try:
            found = socket.getaddrinfo(
                name, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError:
            continue
        for family, kind, protocol, _, address in found:
            try:
                with socket.socket(family, kind, protocol) as probe:
                    # As gRPC binds: a port left in TIME_WAIT by a server that stopped is free.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"cannot listen on {listen}",
                        f"{address[0]} port {port} is in use by another process",
                        address=listen,
                    ) from None
