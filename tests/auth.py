"""Credentials for test clients: servers under test require them (authentication on), and the
channels tests open carry them as real clients do. Each agent call carries the agent's own
token, learnt from its registration on the same channel; every other call carries the operator
token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from opscore.v1 import agent_lifecycle_pb2

from opscore.api.access import RULES
from opscore.domain.access import Need

OPERATOR_TOKEN = "test-operator-token-00000000000000"
"""The operator token of every server the tests start (see conftest's `start_server`)."""

REGISTRATION_TOKEN = "test-registration-token-0000000000"
"""A registration token, for the servers of tests that give one."""

SETTINGS: dict[str, Any] = {"operator_token": OPERATOR_TOKEN}
"""The settings that turn authentication on with `OPERATOR_TOKEN`."""

ENVIRONMENT = {"OPSCORE_OPERATOR_TOKEN": OPERATOR_TOKEN}
"""The same, for servers started as processes."""

_AGENT_CALLS = {method for method, rule in RULES.items() if rule.need is Need.AGENT}
_REGISTER = "/opscore.v1.AgentLifecycle/RegisterAgent"
_DEREGISTER = "/opscore.v1.AgentLifecycle/DeregisterAgent"


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)


class Wallet:
    """The tokens one channel's calls carry: the operator token, and each agent's own token
    from its latest registration on the channel."""

    def __init__(self, operator_token: str = OPERATOR_TOKEN) -> None:
        self.operator_token = operator_token
        self.agents: dict[str, str] = {}

    def token_for(self, method: str, request: Any) -> str:
        """The token a call of `method` with `request` carries."""
        if method in _AGENT_CALLS:
            return self.agents.get(getattr(request, "agent_id", ""), self.operator_token)
        return self.operator_token

    def learn(self, method: str, request: Any, response: Any) -> None:
        """Keep the token a registration issued; drop the one a deregistration revoked."""
        if method == _REGISTER and isinstance(response, agent_lifecycle_pb2.RegisterAgentResponse):
            self.agents[response.agent.agent_id] = response.agent_token
        elif method == _DEREGISTER:
            self.agents.pop(request.agent_id, None)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = list(details.metadata or ())
    if any(key == "authorization" for key, _ in metadata):
        return details  # the test sends credentials of its own
    return details._replace(metadata=grpc.aio.Metadata(*metadata, *bearer(token)))


def _method(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class _Unary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, wallet: Wallet) -> None:
        self._wallet = wallet

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        method = _method(details)
        call = await continuation(
            _with_token(details, self._wallet.token_for(method, request)), request
        )
        if method in (_REGISTER, _DEREGISTER):
            try:
                response = await call
            except grpc.aio.AioRpcError:
                return call
            self._wallet.learn(method, request, response)
        return call


class _Streaming(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, wallet: Wallet) -> None:
        self._wallet = wallet

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> AsyncIterator[Any] | Any:
        token = self._wallet.token_for(_method(details), request)
        return await continuation(_with_token(details, token), request)


def interceptors(wallet: Wallet | None = None) -> Sequence[grpc.aio.ClientInterceptor]:
    """Client interceptors that give a channel's calls the tokens of `wallet` (a new one by
    default)."""
    held = wallet or Wallet()
    return [_Unary(held), _Streaming(held)]


def channel(target: str, **options: Any) -> grpc.aio.Channel:
    """An insecure channel to `target` whose calls carry a new wallet's tokens."""
    return grpc.aio.insecure_channel(target, interceptors=interceptors(), **options)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, details: grpc.ClientCallDetails, token: str) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = [*(details.metadata or ()), *bearer(token)]
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class _SyncOperator(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Gives every call of a synchronous channel the operator token."""

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_Details(details, OPERATOR_TOKEN), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(_Details(details, OPERATOR_TOKEN), request)


def sync_channel(target: str, **options: Any) -> grpc.Channel:
    """A synchronous insecure channel to `target` whose calls carry the operator token."""
    return grpc.intercept_channel(grpc.insecure_channel(target, **options), _SyncOperator())
