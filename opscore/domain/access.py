"""Who may call what: the callers the server knows, how a call's credentials name one, and
whether that caller may make the call.

Three roles:
- an operator (an operator token, or a client certificate naming an operator) may make every
  call, and act for any agent;
- a registrar (a registration token) may only register agents;
- an agent (its own token, or a client certificate naming it) may act only as itself: stream
  its tasks, heartbeat, report its state, report on its attempts, read and deregister itself.
  An agent identified by its certificate may also register itself; a token cannot mint its own
  successor, so that a leaked agent token cannot lock the real agent out.

With authentication off every caller is an operator, known by its address.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from opscore.domain.credentials import AgentTokens, TokenSet, digest
from opscore.domain.errors import PermissionDenied, Unauthenticated

CERTIFICATE_URI_SCHEME = "opscore"
"""A client certificate names its holder in a URI subject alternative name of this scheme:
`opscore://agent/<agent id>` or `opscore://operator/<name>`."""


class Role(enum.Enum):
    """What a caller is."""

    OPERATOR = "operator"
    REGISTRAR = "registrar"
    AGENT = "agent"


class Need(enum.Enum):
    """What a call requires of its caller."""

    NOTHING = "nothing"
    """Open to anyone who can reach the port (health, reflection)."""
    OPERATOR = "operator"
    """An operator."""
    REGISTRATION = "registration"
    """An operator or a registrar, or the agent itself when a certificate identifies it."""
    AGENT = "agent"
    """The agent the request names, or an operator."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Whoever made a call, as far as the server could tell."""

    role: Role
    name: str
    """Who it is, for audit lines and per-caller limits: never a secret."""
    agent_id: str = ""
    """The agent it is, for an agent."""
    token_digest: str | None = None
    """The digest of the agent token it presented: a stream opened with a token ends when the
    token is revoked."""
    certified: bool = False
    """Identified by a client certificate (not a token)."""


@dataclass(frozen=True, slots=True)
class Certificate:
    """What a verified client certificate says of its holder."""

    subject: str
    """Its subject, e.g. `CN=agent-1,O=Example`."""
    uris: tuple[str, ...]
    """Its URI subject alternative names, e.g. `opscore://agent/agent-1`."""


def _from_certificate(certificate: Certificate) -> Caller | None:
    """The caller a certificate names (see `CERTIFICATE_URI_SCHEME`), if it names one."""
    prefix = f"{CERTIFICATE_URI_SCHEME}://"
    for uri in certificate.uris:
        if not uri.startswith(prefix):
            continue
        kind, _, name = uri.removeprefix(prefix).partition("/")
        if not name or "/" in name:
            continue
        if kind == Role.AGENT.value:
            return Caller(Role.AGENT, f"agent:{name}", agent_id=name, certified=True)
        if kind == Role.OPERATOR.value:
            return Caller(Role.OPERATOR, f"operator:{name}", certified=True)
    return None


class Authority:
    """Identifies callers and decides what they may do. The configured tokens can be replaced
    while the server runs (rotation); the agents' tokens follow registrations."""

    def __init__(
        self,
        enabled: bool,
        operators: TokenSet,
        registrars: TokenSet,
        agents: AgentTokens,
    ) -> None:
        self.enabled = enabled
        self._operators = operators
        self._registrars = registrars
        self.agents = agents

    def replace_tokens(self, operators: TokenSet, registrars: TokenSet) -> None:
        """Use these configured tokens from now on (the earlier ones stop working)."""
        self._operators = operators
        self._registrars = registrars

    def identify(
        self,
        token: str | None,
        certificate: Callable[[], Certificate | None],
        peer: Callable[[], str],
    ) -> Caller:
        """The caller of a call with this bearer token (None: no `authorization` metadata), the
        verified client certificate `certificate()` gives, from the address `peer()` gives
        (read only when needed: the common call carries a token). A token, when given, decides;
        a token that matches nothing is Unauthenticated, as is a call with neither."""
        if not self.enabled:
            return Caller(Role.OPERATOR, f"anonymous@{peer()}")
        if token is not None:
            hashed = digest(token)
            name = self._operators.match(hashed)
            if name is not None:
                return Caller(Role.OPERATOR, f"operator:{name}")
            name = self._registrars.match(hashed)
            if name is not None:
                return Caller(Role.REGISTRAR, f"registrar:{name}")
            agent_id = self.agents.agent_of(hashed)
            if agent_id is not None:
                return Caller(Role.AGENT, f"agent:{agent_id}", agent_id, token_digest=hashed)
            raise Unauthenticated("the bearer token is not valid (unknown, revoked or rotated)")
        presented = certificate()
        if presented is not None:
            caller = _from_certificate(presented)
            if caller is not None:
                return caller
            raise Unauthenticated(
                f"the client certificate ({presented.subject}) names no agent or operator "
                f"(a URI SAN {CERTIFICATE_URI_SCHEME}://agent/<id> or "
                f"{CERTIFICATE_URI_SCHEME}://operator/<name>), and no bearer token was sent"
            )
        raise Unauthenticated("this call needs credentials: authorization: Bearer <token>")


def authorize(caller: Caller, need: Need, acting_as: str = "") -> None:
    """Allow the call, or raise PermissionDenied saying what it needs. `acting_as` is the
    agent the request names, for calls an agent makes as itself."""
    if caller.role is Role.OPERATOR or need is Need.NOTHING:
        return
    if need is Need.OPERATOR:
        raise PermissionDenied(f"{caller.name} may not make this call: it needs an operator")
    if need is Need.REGISTRATION:
        if caller.role is Role.REGISTRAR:
            return
        if caller.certified and acting_as == caller.agent_id:
            return
        raise PermissionDenied(
            f"{caller.name} may not register agents: it needs an operator or registration "
            "token, or the agent's own certificate"
        )
    if caller.role is Role.AGENT and acting_as == caller.agent_id:
        return
    if caller.role is Role.AGENT:
        raise PermissionDenied(f"{caller.name} may not act as agent {acting_as!r}")
    raise PermissionDenied(f"{caller.name} may only register agents")
