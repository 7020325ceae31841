"""No secret reaches the log: a real `opscore serve` over TLS, with authentication on and every
log level, is called with good, bad, malformed, rotated and revoked credentials, reloaded, and
stopped; then nothing it wrote may contain a token, an `authorization` value or a line of its
private key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import auth
import grpc
from certs import Authority
from helpers import WAIT, definition, refused, task
from opscore.v1 import agent_lifecycle_pb2 as lc
from opscore.v1 import agent_lifecycle_pb2_grpc, workflow_service_pb2_grpc
from opscore.v1 import workflow_service_pb2 as ws
from processes import clean_environment, free_port
from secure import TlsServerProcess, tls_channel

OPERATOR = "alice-operator-secret-0123456789"
REGISTRATION = "fleet-registration-secret-0123456789"
GUESSED = "opscore_agent_guessed-but-wrong-0123456789"


async def test_no_secret_reaches_the_log(tmp_path: Path) -> None:
    authority = Authority.create("secrets CA")
    server_files = authority.issue_server().write(tmp_path, "server")
    tokens = tmp_path / "operators"
    tokens.write_text(f"alice {OPERATOR}\n")
    port = free_port()
    environment = clean_environment(
        OPSCORE_LOG_LEVEL="DEBUG",
        OPSCORE_OPERATOR_TOKEN_FILE=str(tokens),
        OPSCORE_REGISTRATION_TOKEN=REGISTRATION,
        OPSCORE_TLS_CERT=str(server_files.cert),
        OPSCORE_TLS_KEY=str(server_files.key),
    )
    server = TlsServerProcess.in_folder(tmp_path, port, authority, environment)
    issued = []
    async with server, tls_channel(port, authority, tokens=False) as channel:
        lifecycle = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        operator, registrar = auth.bearer(OPERATOR), auth.bearer(REGISTRATION)

        registered = await lifecycle.RegisterAgent(
            lc.RegisterAgentRequest(agent_id="a", capabilities=["work"]), metadata=registrar
        )
        issued.append(registered.agent_token)
        agent = auth.bearer(registered.agent_token)
        stream = workflows.StreamTasks(ws.StreamTasksRequest(agent_id="a"), metadata=agent)
        await workflows.TriggerWorkflow(
            ws.TriggerWorkflowRequest(
                definition=definition("secret", task("t", capability="work")), agent_id="a"
            ),
            metadata=operator,
        )
        held = (await asyncio.wait_for(stream.read(), WAIT)).assignment

        code = grpc.StatusCode
        heartbeat = lc.HeartbeatRequest(agent_id="a")
        await refused(
            lifecycle.Heartbeat(heartbeat, metadata=auth.bearer(GUESSED)), code.UNAUTHENTICATED
        )
        malformed = (("authorization", f"Basic {OPERATOR}"),)
        await refused(lifecycle.Heartbeat(heartbeat, metadata=malformed), code.UNAUTHENTICATED)
        await refused(
            lifecycle.ListAgents(lc.ListAgentsRequest(), metadata=registrar), code.PERMISSION_DENIED
        )

        rotated = await lifecycle.RegisterAgent(
            lc.RegisterAgentRequest(agent_id="a", capabilities=["work"]), metadata=operator
        )
        issued.append(rotated.agent_token)
        extend = ws.ExtendTaskLeaseRequest(task_id=held.task_id, agent_id="a", attempt=held.attempt)
        await refused(workflows.ExtendTaskLease(extend, metadata=agent), code.UNAUTHENTICATED)
        stream.cancel()

        server.process.send_signal(1)  # SIGHUP: the token file and the certificates are reread
        await lifecycle.DeregisterAgent(
            lc.DeregisterAgentRequest(agent_id="a"), metadata=auth.bearer(rotated.agent_token)
        )
        server.terminate()
        assert await server.wait() == 0

    written = server.log_text()
    assert '"logger": "opscore.audit"' in written  # the log is the real one, at every level
    assert "tokens reloaded" in written
    key_lines = server_files.key.read_text().splitlines()[1:-1]
    for secret in (OPERATOR, REGISTRATION, GUESSED, *issued, *key_lines):
        assert secret not in written, "a secret reached the log"
    assert "Bearer " not in written
