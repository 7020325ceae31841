"""TLS on the server's port: its certificate chain and key, and for mutual TLS the authorities
whose client certificates it accepts, read from PEM files and read again while it serves.

gRPC takes them through `grpc.dynamic_ssl_server_credentials`: before each new connection's
handshake it asks `ServerTls` for a new configuration, which it then keeps using. So a reload
changes what new connections see, and connections already open (and the task streams on them)
go on as they were. A set of files that fails to load is refused whole, and the configuration
in use stays.

"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import grpc

from opscore.startup import StartupError

log = logging.getLogger("opscore.tls")

_Signature = tuple[tuple[int, int, int] | None, ...]
"""What tells that the files changed: inode, size and modification time of each (None for a
file that cannot be seen)."""


class _FileError(Exception):
    """A TLS file that cannot be used (`path`) and why (`cause`): never any of its content."""

    def __init__(self, path: str, cause: str) -> None:
        self.path = path
        self.cause = cause
        super().__init__(f"{path}: {cause}")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM files TLS is served from."""

    cert: str
    """The server's certificate, followed by the intermediates a client needs to trust it."""
    key: str
    """The certificate's private key, unencrypted."""
    client_ca: str = ""
    """The authorities whose client certificates are required (mutual TLS); "" for none."""

    @classmethod
    def chosen(cls, cert: str, key: str, client_ca: str) -> TlsFiles | None:
        """The files the settings name, or None when TLS is off (none named). A key or client
        CA without a certificate, or a certificate without a key, is a StartupError."""
        if not (cert or key or client_ca):
            return None
        for path, given, missing in (
            (cert, "OPSCORE_TLS_CERT (--tls-cert)", "OPSCORE_TLS_KEY (--tls-key)"),
            (key, "OPSCORE_TLS_KEY (--tls-key)", "OPSCORE_TLS_CERT (--tls-cert)"),
            (client_ca, "OPSCORE_TLS_CLIENT_CA (--tls-client-ca)", "OPSCORE_TLS_CERT (--tls-cert)"),
        ):
            if path and not (cert and key):
                raise StartupError(
                    f"cannot serve TLS with {path}", f"{given} is set, {missing} is not", file=path
                )
        return cls(cert, key, client_ca)

    @property
    def paths(self) -> tuple[str, ...]:
        """Every file named."""
        return tuple(path for path in (self.cert, self.key, self.client_ca) if path)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A set of files that loaded: gRPC's configuration of them, and what to log of it."""

    configuration: grpc.ServerCertificateConfiguration
    subject: str
    """The certificate's subject, e.g. `commonName=opscore.example.com`."""
    not_after: datetime
    """When the certificate expires."""

    def fields(self, files: TlsFiles) -> dict[str, str]:
        """The log fields of these files."""
        return {
            "cert": files.cert,
            "subject": self.subject,
            "not_after": self.not_after.isoformat(),
            "client_ca": files.client_ca,
        }


class ServerTls:
    """The server's TLS: `credentials` for its port, `reload` and `watch` to change them."""

    def __init__(self, files: TlsFiles) -> None:
        """Load the files; a StartupError names the one that cannot be used, and why."""
        self.files = files
        self._seen = _signature(files)
        try:
            loaded = _load(files)
        except _FileError as error:
            raise StartupError(
                f"cannot use the TLS file {error.path}", error.cause, file=error.path
            ) from error
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        """A configuration loaded since gRPC last asked, which it takes on the next connection."""
        self.credentials = grpc.dynamic_ssl_server_credentials(
            loaded.configuration,
            self._fetch,  # type: ignore[arg-type]  # None means "no change" (see _fetch)
            require_client_authentication=bool(files.client_ca),
        )
        log.info("tls certificates loaded", extra=loaded.fields(files))

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """What gRPC calls, on a thread of its own, before each new connection's handshake: a
        configuration it must change to, or None to keep its own (a new one each call would
        have it build its TLS context anew for each connection)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self, *, force: bool = False) -> None:
        """Read the files again if they changed since they were last read (or, with `force`,
        in any case). New connections get a set that loads; one that does not is logged as an
        ERROR naming the file, and the configuration in use stays. Files changing while they
        are read are left for the next reload, which reads them whole."""
        seen = _signature(self.files)
        if seen == self._seen and not force:
            return
        try:
            loaded: _Loaded | _FileError = _load(self.files)
        except _FileError as error:
            loaded = error
        if _signature(self.files) != seen:
            return
        self._seen = seen
        if isinstance(loaded, _FileError):
            log.error(
                "tls certificates not reloaded: the ones in use stay",
                extra={"file": loaded.path, "cause": loaded.cause},
            )
            return
        with self._lock:
            self._pending = loaded.configuration
        log.info("tls certificates reloaded", extra=loaded.fields(self.files))

    async def watch(self, interval: float) -> None:
        """Reload every `interval` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.reload()


def _signature(files: TlsFiles) -> _Signature:
    """The files' signature as they are now."""

    def of(path: str) -> tuple[int, int, int] | None:
        try:
            status = os.stat(path)
        except OSError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns

    return tuple(of(path) for path in files.paths)


def _load(files: TlsFiles) -> _Loaded:
    """Read and check the files; a _FileError names the first that cannot be used.

    The checks are the standard library's, with OpenSSL: that the certificate file holds
    certificates, that the key is a private key matching the first of them, that a client
    trusting those certificates completes a handshake with the pair (so the certificate is valid
    now, and meant for a server), and that the client CA file holds certificates.
    """
    chain = _read(files.cert)
    key = _read(files.key)
    client = _trusting(files.cert, chain)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        server.load_cert_chain(files.cert, files.key, password=_encrypted(files.key))
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise _FileError(files.key, f"it is not the key of {files.cert}") from None
        raise _FileError(files.key, "it holds no PEM private key") from None
    except OSError as error:  # gone since it was read
        raise _FileError(files.key, error.strerror or str(error)) from None
    peer = _handshake(server, client, files.cert)
    roots = None
    if files.client_ca:
        roots = _read(files.client_ca)
        _trusting(files.client_ca, roots)
    subject = ", ".join(f"{name}={value}" for rdn in peer["subject"] for name, value in rdn)
    return _Loaded(
        grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots),
        subject=subject,
        not_after=datetime.fromtimestamp(ssl.cert_time_to_seconds(peer["notAfter"]), UTC),
    )


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise _FileError(path, error.strerror or str(error)) from None


def _trusting(path: str, content: bytes) -> ssl.SSLContext:
    """A client context trusting the PEM certificates of `content` (read from `path`), which
    must hold at least one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=content.decode("ascii"))
    except (UnicodeDecodeError, ValueError, ssl.SSLError):  # ValueError: an empty file
        raise _FileError(path, "it holds no PEM certificate") from None
    return context


def _encrypted(path: str) -> Callable[[], NoReturn]:
    """OpenSSL's password callback for `path`: without one it would prompt on the terminal,
    and gRPC takes no password anyway."""

    def refuse() -> NoReturn:
        raise _FileError(path, "it is encrypted: give the key unencrypted")

    return refuse


_HANDSHAKE_ROUNDS = 8
"""Rounds the in-memory handshake may take, each a turn of each side then what it wrote
delivered: TLS 1.3 completes in four, TLS 1.2 (if OpenSSL is configured to stop there) in five."""


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, path: str) -> dict[str, Any]:
    """Complete a TLS handshake in memory between `server` and `client`, which trusts the
    certificates of `path` that `server` presents; the certificate as the client sees it."""
    client.check_hostname = False  # which names it serves is the operator's choice
    # The certificate itself is trusted, not the root it chains to.
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(client_in, client_out)
    pending = [client_side, server.wrap_bio(server_in, server_out, server_side=True)]
    for _ in range(_HANDSHAKE_ROUNDS):
        for side in list(pending):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLError as error:
                # A verification error says why the client refused the certificate.
                why = (
                    error.verify_message
                    if isinstance(error, ssl.SSLCertVerificationError)
                    else error.reason
                )
                raise _FileError(path, f"a TLS handshake with it fails: {why}") from None
            pending.remove(side)
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    assert not pending, "an in-memory handshake did not finish"
    peer = client_side.getpeercert()
    assert peer, "a verified handshake without the server's certificate"
    return peer
