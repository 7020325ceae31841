"""TLS and mutual TLS on the server's port, over real channels: who gets in, who is refused at
the handshake, what a call learns of its client's certificate, and certificates replaced while
the server runs (on `reload`, on the poll of the files, on SIGHUP) without dropping the task
streams already open. The certificates are made for each test (tests/certs.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import auth
import grpc
import pytest
from certs import Authority, Files, Issued
from conftest import ServerFactory
from cryptography.hazmat.primitives import serialization
from helpers import WAIT, Agent, Client, definition, refused, task
from opscore.v1 import agent_lifecycle_pb2, workflow_pb2
from processes import (
    OPSCORE,
    clean_environment,
    free_port,
    run_async,
)
from secure import TlsServerProcess, tls_channel

from opscore.api.peers import peer_certificate
from opscore.config import Settings
from opscore.domain.access import Certificate
from opscore.server import OpsCoreServer
from opscore.startup import StartupError
from opscore.tls import ServerTls, TlsFiles

GRPCURL = Path(sys.executable).parent / "grpcurl"

AGENT_URI = "opscore://agent/agent-1"
OPERATOR_URI = "opscore://operator/alice"


@dataclass(frozen=True)
class Pki:
    """Two unrelated authorities, the server's files (issued by the first), and where to write
    more."""

    authority: Authority
    other: Authority
    server: Files
    folder: Path

    def files(self, *, mutual: bool = False) -> TlsFiles:
        """The files that serve TLS (or, `mutual`, mutual TLS with clients of `authority`)."""
        client_ca = str(self.authority.write_ca(self.folder, "client-ca")) if mutual else ""
        return TlsFiles(str(self.server.cert), str(self.server.key), client_ca)

    def settings(self, *, mutual: bool = False) -> dict[str, Any]:
        """The Settings fields of `files`."""
        files = self.files(mutual=mutual)
        return {"tls_cert": files.cert, "tls_key": files.key, "tls_client_ca": files.client_ca}


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    authority = Authority.create("Ops-Core test CA")
    return Pki(
        authority,
        Authority.create("unrelated CA"),
        authority.issue_server().write(tmp_path, "server"),
        tmp_path,
    )


def list_agents(channel: grpc.aio.Channel) -> Any:
    """A ListAgents call on `channel` (to be awaited)."""
    return Client(channel).lifecycle.ListAgents(
        agent_lifecycle_pb2.ListAgentsRequest(), timeout=WAIT
    )


async def answers(channel: grpc.aio.Channel) -> None:
    """Assert that a call over `channel` succeeds."""
    await list_agents(channel)


async def refused_at_handshake(channel: grpc.aio.Channel) -> None:
    """Assert that `channel` cannot connect: its call fails with UNAVAILABLE, never reaching
    the server."""
    async with channel:
        error = await refused(list_agents(channel), grpc.StatusCode.UNAVAILABLE)
    assert "failed to connect" in (error.details() or ""), error.details()


async def test_tls_serves_clients_that_trust_its_authority(
    start_server: ServerFactory, migrated_url: str, pki: Pki
) -> None:
    async with start_server(migrated_url, **pki.settings()) as server:
        async with tls_channel(server.port, pki.authority) as channel:
            await answers(channel)
        await refused_at_handshake(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))
        await refused_at_handshake(tls_channel(server.port, pki.other))


async def test_mutual_tls_requires_a_client_certificate_of_its_authority(
    start_server: ServerFactory, migrated_url: str, pki: Pki
) -> None:
    agent = pki.authority.issue_client("agent-1", [AGENT_URI])
    stranger = pki.other.issue_client("agent-1", [AGENT_URI])
    async with start_server(migrated_url, **pki.settings(mutual=True)) as server:
        async with tls_channel(server.port, pki.authority, agent) as channel:
            await answers(channel)
        await refused_at_handshake(tls_channel(server.port, pki.authority))
        await refused_at_handshake(tls_channel(server.port, pki.authority, stranger))


async def test_client_certificates_identify_agents_and_operators_without_tokens(
    start_server: ServerFactory, sqlite_url: str, pki: Pki
) -> None:
    """A fleet with a PKI needs no tokens: the client CA alone turns authentication on, and
    each certificate's URI names an agent or an operator."""
    issue = pki.authority.issue_client
    agent, operator = issue("agent-1", [AGENT_URI]), issue("alice", [OPERATOR_URI])
    nobody = issue("nobody")
    settings = pki.settings(mutual=True)
    async with (
        start_server(sqlite_url, operator_token="", **settings) as server,
        tls_channel(server.port, pki.authority, agent, tokens=False) as as_agent,
        tls_channel(server.port, pki.authority, operator, tokens=False) as as_operator,
        tls_channel(server.port, pki.authority, nobody, tokens=False) as as_nobody,
    ):
        agents = Client(as_agent, server)
        await agents.agent("agent-1", capabilities=["work"], connect=False)
        worker = Agent(agents, "agent-1")
        await worker.connect()
        code = grpc.StatusCode
        for other in ("agent-2", ""):
            request = agent_lifecycle_pb2.RegisterAgentRequest(agent_id=other)
            await refused(agents.lifecycle.RegisterAgent(request), code.PERMISSION_DENIED)
        await refused(list_agents(as_agent), code.PERMISSION_DENIED, "an agent listing agents")
        await refused(list_agents(as_nobody), code.UNAUTHENTICATED, "a certificate naming nobody")

        operators = Client(as_operator, server)
        run = await operators.trigger(
            definition=definition("pki", task("t", capability="work")), agent_id="agent-1"
        )
        await worker.complete(await worker.next_assignment())
        await operators.wait_run(run.run_id, workflow_pb2.RUN_STATE_SUCCEEDED)
        await worker.disconnect()


@pytest.fixture
async def echo_port(pki: Pki) -> AsyncIterator[dict[str, int]]:
    """A bare grpc.aio server whose one method answers what `peer_certificate` found, as JSON,
    on three ports: plaintext, TLS and mutual TLS; the ports by name."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        found = peer_certificate(context)
        return json.dumps(None if found is None else asdict(found)).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Peer", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
            )
        ]
    )
    tls = ServerTls(pki.files())
    mutual = ServerTls(pki.files(mutual=True))
    ports = {
        "plaintext": server.add_insecure_port("127.0.0.1:0"),
        "tls": server.add_secure_port("127.0.0.1:0", tls.credentials),
        "mutual": server.add_secure_port("127.0.0.1:0", mutual.credentials),
    }
    await server.start()
    try:
        yield ports
    finally:
        await server.stop(None)


async def peer_seen(channel: grpc.aio.Channel) -> Certificate | None:
    async with channel:
        answer = await channel.unary_unary("/test.Peer/Echo")(b"", timeout=WAIT)
    found = json.loads(answer)
    return None if found is None else Certificate(found["subject"], tuple(found["uris"]))


async def test_peer_certificate_names_the_client_and_its_uris(
    pki: Pki, echo_port: dict[str, int]
) -> None:
    client = pki.authority.issue_client("agent-1", [AGENT_URI, OPERATOR_URI])
    seen = await peer_seen(tls_channel(echo_port["mutual"], pki.authority, client))
    assert seen == Certificate("CN=agent-1", (AGENT_URI, OPERATOR_URI))

    no_uris = pki.authority.issue_client("bare")
    seen = await peer_seen(tls_channel(echo_port["mutual"], pki.authority, no_uris))
    assert seen == Certificate("CN=bare", ())

    assert await peer_seen(tls_channel(echo_port["tls"], pki.authority)) is None
    plaintext = grpc.aio.insecure_channel(f"127.0.0.1:{echo_port['plaintext']}")
    assert await peer_seen(plaintext) is None


def reloaded(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The `tls certificates reloaded` records so far, as their fields."""
    return [
        {"subject": record.__dict__["subject"], "cert": record.__dict__["cert"]}
        for record in caplog.records
        if record.getMessage() == "tls certificates reloaded"
    ]


async def until_answers(port: int, trusted: Authority, client: Issued | None = None) -> None:
    """Connect anew (bounded) until a channel trusting `trusted` alone gets an answer."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                async with tls_channel(port, trusted, client) as channel:
                    await answers(channel)
                    return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("trigger", ["reload", "poll"])
async def test_new_certificates_reach_new_connections_and_streams_stay_open(
    start_server: ServerFactory,
    migrated_url: str,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    trigger: str,
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.tls")
    interval = 0.05 if trigger == "poll" else 3600.0
    settings = pki.settings(mutual=True)
    old_client = pki.authority.issue_client("agent-1", [AGENT_URI])
    async with (
        start_server(migrated_url, tls_reload_interval=interval, **settings) as server,
        tls_channel(server.port, pki.authority, old_client) as old_channel,
    ):
        old = Client(old_channel, server)
        agent = await old.agent("agent-1", capabilities=["echo"])

        # A new server certificate from a new authority, which also issues the clients now.
        new_client = pki.other.issue_client("agent-2", [AGENT_URI])
        pki.other.issue_server("renewed").write(pki.folder, "server")
        pki.other.write_ca(pki.folder, "client-ca")
        if trigger == "reload":
            server.reload()
        await until_answers(server.port, pki.other, new_client)

        await refused_at_handshake(tls_channel(server.port, pki.authority, old_client))
        await refused_at_handshake(tls_channel(server.port, pki.other, old_client))
        assert reloaded(caplog)[-1] == {
            "subject": "commonName=renewed",
            "cert": settings["tls_cert"],
        }

        async with tls_channel(server.port, pki.other, new_client) as new_channel:
            new = Client(new_channel, server)
            run = await new.trigger(definition=definition("after", task("t", capability="echo")))
        assignment = await agent.next_assignment()
        assert assignment.run_id == run.run_id
        await agent.complete(assignment)
        assert agent.stream_error is None
        assert not agent.stream_ended.is_set()
        await old.close()


async def test_files_that_fail_to_load_leave_the_certificates_in_use(
    start_server: ServerFactory,
    sqlite_url: str,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.tls")
    async with start_server(sqlite_url, **pki.settings()) as server:
        # A key that is not the certificate's: the cert is renewed, its key not yet written.
        pki.other.issue_server().write(pki.folder, "new").cert.replace(pki.server.cert)
        server.reload()
        async with tls_channel(server.port, pki.authority) as channel:
            await answers(channel)
        await refused_at_handshake(tls_channel(server.port, pki.other))

    [failure] = [r for r in caplog.records if (r.name, r.levelno) == ("opscore.tls", logging.ERROR)]
    assert failure.getMessage() == "tls certificates not reloaded: the ones in use stay"
    assert failure.__dict__["file"] == str(pki.server.key)
    assert failure.__dict__["cause"] == f"it is not the key of {pki.server.cert}"
    assert reloaded(caplog) == []


async def test_sighup_reloads_the_certificates_of_a_running_server(
    tmp_path: Path, pki: Pki
) -> None:
    port = free_port()
    environment = clean_environment(
        OPSCORE_TLS_CERT=str(pki.server.cert),
        OPSCORE_TLS_KEY=str(pki.server.key),
        OPSCORE_TLS_RELOAD_INTERVAL="3600",
    )
    server = TlsServerProcess.in_folder(tmp_path, port, pki.authority, environment)
    async with server:
        pki.other.issue_server("renewed").write(pki.folder, "server")
        server.process.send_signal(signal.SIGHUP)
        await until_answers(port, pki.other)
        server.terminate()
        assert await server.wait() == 0, server.log_text()

    # Not strict: gRPC's C core writes a plain line of its own for each failed handshake, as
    # those of the connections made before the reload took effect.
    events = [(r["event"], r.get("subject")) for r in server.log_records(strict=False)]
    assert ("tls certificates loaded", "commonName=localhost") in events
    assert ("tls certificates reloaded", "commonName=renewed") in events


def misconfigurations(pki: Pki) -> dict[str, tuple[dict[str, str], Path, str]]:
    """Each misconfiguration by name: its settings, the file its error names, and the cause it
    gives."""
    folder = pki.folder
    junk = folder / "junk.pem"
    junk.write_text("not a certificate\n")
    encrypted = folder / "encrypted.key"
    encrypted.write_bytes(encrypted_pem(pki.server.key))
    ca = pki.authority.write_ca(folder, "ca")
    other = pki.other.issue_server().write(folder, "other")
    expired = pki.authority.issue_server(expired=True).write(folder, "expired")
    cert, key = pki.server.cert, pki.server.key
    return {
        "key without cert": (
            {"tls_key": str(key)},
            key,
            "OPSCORE_TLS_KEY (--tls-key) is set, OPSCORE_TLS_CERT (--tls-cert) is not",
        ),
        "cert without key": (
            {"tls_cert": str(cert)},
            cert,
            "OPSCORE_TLS_CERT (--tls-cert) is set, OPSCORE_TLS_KEY (--tls-key) is not",
        ),
        "client CA without cert": (
            {"tls_client_ca": str(ca)},
            ca,
            "OPSCORE_TLS_CLIENT_CA (--tls-client-ca) is set, OPSCORE_TLS_CERT (--tls-cert) is not",
        ),
        "missing cert": (
            {"tls_cert": str(folder / "missing.crt"), "tls_key": str(key)},
            folder / "missing.crt",
            "No such file or directory",
        ),
        "not a certificate": (
            {"tls_cert": str(junk), "tls_key": str(key)},
            junk,
            "it holds no PEM certificate",
        ),
        "key of another certificate": (
            {"tls_cert": str(cert), "tls_key": str(other.key)},
            other.key,
            f"it is not the key of {cert}",
        ),
        "not a key": (
            {"tls_cert": str(cert), "tls_key": str(junk)},
            junk,
            "it holds no PEM private key",
        ),
        "encrypted key": (
            {"tls_cert": str(cert), "tls_key": str(encrypted)},
            encrypted,
            "it is encrypted: give the key unencrypted",
        ),
        "expired cert": (
            {"tls_cert": str(expired.cert), "tls_key": str(expired.key)},
            expired.cert,
            "a TLS handshake with it fails: certificate has expired",
        ),
        "client CA not a certificate": (
            {"tls_cert": str(cert), "tls_key": str(key), "tls_client_ca": str(junk)},
            junk,
            "it holds no PEM certificate",
        ),
    }


def encrypted_pem(path: Path) -> bytes:
    """The key of `path`, encrypted with a password."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


CASES = [
    "key without cert",
    "cert without key",
    "client CA without cert",
    "missing cert",
    "not a certificate",
    "key of another certificate",
    "not a key",
    "encrypted key",
    "expired cert",
    "client CA not a certificate",
]


@pytest.mark.parametrize("case", CASES)
async def test_misconfigured_tls_refuses_to_start_before_the_database(
    tmp_path: Path, pki: Pki, case: str
) -> None:
    table = misconfigurations(pki)
    assert sorted(table) == sorted(CASES)
    files, named, cause = table[case]
    database = tmp_path / "never.db"
    settings = Settings(listen="127.0.0.1:0", db_url=f"sqlite:///{database}", **files)
    with pytest.raises(StartupError) as raised:
        await OpsCoreServer(settings).start()
    assert raised.value.subject == {"file": str(named)}
    assert str(named) in raised.value.failed
    assert raised.value.cause == cause
    assert not database.exists()


def secret_lines(key: Path) -> list[str]:
    """The lines of a PEM key between its BEGIN and END lines."""
    return key.read_text().splitlines()[1:-1]


async def test_the_command_reports_a_bad_key_without_its_content(tmp_path: Path, pki: Pki) -> None:
    files, key, cause = misconfigurations(pki)["key of another certificate"]
    code, err = await run_async(
        [
            *(str(OPSCORE), "serve", "--listen", "127.0.0.1:0"),
            *("--db", f"sqlite:///{tmp_path / 'x.db'}"),
            *("--tls-cert", files["tls_cert"], "--tls-key", files["tls_key"]),
        ],
        clean_environment(**auth.ENVIRONMENT),
        tmp_path,
    )
    assert code == 1, err
    [record] = [json.loads(line) for line in err.splitlines()]
    assert record["level"] == "CRITICAL"
    assert record["event"] == f"cannot use the TLS file {key}: {cause}"
    assert record["file"] == str(key)
    assert "PRIVATE KEY" not in err
    assert all(line not in err for line in secret_lines(key))


async def grpcurl_list(port: int, *flags: str) -> tuple[int, str, str]:
    """`grpcurl <flags> 127.0.0.1:<port> list`: exit status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        "-max-time",
        str(int(WAIT)),
        *flags,
        f"127.0.0.1:{port}",
        "list",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), WAIT + 5)  # after its -max-time
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual"])
async def test_grpcurl_lists_the_services_over_tls(
    start_server: ServerFactory, sqlite_url: str, pki: Pki, mutual: bool
) -> None:
    ca = pki.authority.write_ca(pki.folder, "ca")
    client = pki.authority.issue_client("operator", [OPERATOR_URI]).write(pki.folder, "client")
    certificate = ["-cert", str(client.cert), "-key", str(client.key)] if mutual else []
    async with start_server(sqlite_url, **pki.settings(mutual=mutual)) as server:
        code, out, err = await grpcurl_list(server.port, "-cacert", str(ca), *certificate)
        assert code == 0, err
        assert "opscore.v1.WorkflowService" in out.split()
