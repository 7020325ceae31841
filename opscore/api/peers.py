"""What the transport says of a call's peer: its address, and its verified client
certificate under mutual TLS (read from gRPC's auth context)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from opscore.domain.access import Certificate


def peer_host(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The peer's address without its port (`ipv4:127.0.0.1:5123` gives `127.0.0.1`)."""
    peer = context.peer() or "unknown"
    kind, _, address = peer.partition(":")
    if kind == "ipv6":
        return address.rpartition(":")[0].strip("[]") or address
    if kind == "ipv4":
        return address.rpartition(":")[0] or address
    return peer


def peer_certificate(context: grpc.aio.ServicerContext[Any, Any]) -> Certificate | None:
    """The client certificate the TLS handshake verified, if there was one: its subject (or
    common name) and its URI subject alternative names (gRPC's `peer_uri` property)."""
    properties = context.auth_context()
    if not properties.get("x509_pem_cert") and not properties.get("x509_common_name"):
        return None
    subject = _first(properties.get("x509_subject")) or _first(properties.get("x509_common_name"))
    uris = tuple(value.decode() for value in properties.get("peer_uri", ()))
    return Certificate(subject or "(no subject)", uris)


def _first(values: Iterable[bytes] | None) -> str:
    return next((value.decode() for value in values or ()), "")
