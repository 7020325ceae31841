"""What the transport says of a call's peer: its address, and its verified client
certificate under mutual TLS (read from gRPC's auth context)."""

from __future__ import annotations

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
    """The client certificate the TLS handshake verified, or None if the call came with none
    (plaintext, or TLS without a client certificate).

    gRPC's auth context of a call over TLS holds `transport_security_type` (`ssl`),
    `security_level`, `ssl_session_reused`, `ssl_requested_server_name`, `ssl_tls_version` and
    `ssl_negotiated_key_exchange_group`, and, with a client certificate, `x509_subject` (one
    value), `x509_common_name`, `x509_pem_cert`, `x509_subject_alternative_name` (every SAN,
    DNS names and URIs alike, with no kind) and `peer_uri` (the URI SANs alone), in the
    certificate's order. It holds nothing on a plaintext call.
    """
    properties = context.auth_context()
    subject = list(properties.get("x509_subject", ()))
    if not subject:
        return None
    uris = tuple(uri.decode() for uri in properties.get("peer_uri", ()))
    return Certificate(subject[0].decode(), uris)
