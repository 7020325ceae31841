"""Certificates made at test time: authorities, a server certificate for 127.0.0.1 and
localhost, client certificates with URI SANs, written as PEM files. EC P-256 keys, which take
well under a millisecond to make, where RSA would take tens.

    authority = Authority.create("test CA")
    server = authority.issue_server().write(tmp_path, "server")  # server.cert, server.key
    client = authority.issue_client("agent-1", ["opscore://agent/agent-1"])
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = timedelta(days=1)
"""How long a certificate is valid before and after now (clocks may differ a little)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class Files:
    """Where an issued certificate and its key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, folder: Path, stem: str) -> Files:
        """Write `<stem>.crt` and `<stem>.key` into `folder`, replacing any there."""
        files = Files(folder / f"{stem}.crt", folder / f"{stem}.key")
        files.cert.write_bytes(self.cert_pem)
        files.key.write_bytes(self.key_pem)
        return files


@dataclass(frozen=True)
class Authority(Issued):
    """A self-signed certificate authority that issues server and client certificates."""

    @classmethod
    def create(cls, common_name: str) -> Authority:
        """A new authority named `common_name`."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(common_name)
        builder = (
            _valid(x509.CertificateBuilder(), subject, key.public_key(), expired=False)
            .issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        )
        return cls(builder.sign(key, hashes.SHA256()), key)

    def issue_server(self, common_name: str = "localhost", *, expired: bool = False) -> Issued:
        """A server certificate for localhost and 127.0.0.1 (a new key and serial each call),
        valid now or (`expired`) until yesterday."""
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        return self._issue(common_name, names, ExtendedKeyUsageOID.SERVER_AUTH, expired)

    def issue_client(self, common_name: str, uris: Iterable[str] = ()) -> Issued:
        """A client certificate with the given URI SANs."""
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uris]
        return self._issue(common_name, names, ExtendedKeyUsageOID.CLIENT_AUTH, expired=False)

    def _issue(
        self,
        common_name: str,
        names: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        expired: bool,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _valid(x509.CertificateBuilder(), _name(common_name), key.public_key(), expired)
            .issuer_name(self.certificate.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key)

    def write_ca(self, folder: Path, stem: str) -> Path:
        """Write the authority's certificate alone (what clients and servers trust)."""
        path = folder / f"{stem}.crt"
        path.write_bytes(self.cert_pem)
        return path


def _valid(
    builder: x509.CertificateBuilder,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    expired: bool,
) -> x509.CertificateBuilder:
    """`builder` for `subject`'s key, valid from a day ago until a day from now, or (`expired`)
    over the same span two days earlier."""
    middle = datetime.now(UTC) - (2 * VALIDITY if expired else timedelta(0))
    return (
        builder.subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(middle - VALIDITY)
        .not_valid_after(middle + VALIDITY)
    )
