"""Bearer tokens: the operator and registration tokens an operator configures, and the agent
tokens the server issues.

A token is never kept, only its digest. Agent tokens are random (256 bits), so a plain SHA-256
digest is as hard to invert as the token is to guess, and a look-up by digest reveals nothing
of a token by its timing. Configured tokens are compared in constant time, each against every
configured digest, so neither which token matched nor how much of one did shows in the time a
refusal takes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

AGENT_TOKEN_PREFIX = "opscore_agent_"
"""Starts every agent token, so secret scanners and people can tell one at a glance."""

MIN_TOKEN_LENGTH = 16
"""Characters a configured token has at least: a shorter one could be guessed."""


def digest(token: str) -> str:
    """A token's SHA-256, in hex: what the server stores and compares."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue_agent_token() -> tuple[str, str]:
    """A new agent token, and its digest."""
    token = AGENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, digest(token)


@dataclass(frozen=True, slots=True)
class NamedToken:
    """A configured token under the name that audit lines and rate limits know it by."""

    name: str
    digest: str

    @classmethod
    def of(cls, name: str, token: str) -> NamedToken:
        """The token under `name`, or under its digest's first characters when `name` is empty
        (a prefix of the digest of a random token tells nothing of the token)."""
        hashed = digest(token)
        return cls(name or f"token-{hashed[:8]}", hashed)


class TokenSet:
    """The tokens configured for one role (operators, or registration)."""

    def __init__(self, tokens: Iterable[NamedToken] = ()) -> None:
        self._tokens = tuple(tokens)

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def match(self, token_digest: str) -> str | None:
        """The name of the configured token with this digest, if any; every one is compared,
        in constant time, whichever matches."""
        found = None
        given = token_digest.encode()
        for token in self._tokens:
            if hmac.compare_digest(token.digest.encode(), given):
                found = token.name
        return found


class AgentTokens:
    """The digest of each agent's current token: rebuilt from the database when the server
    starts, and changed only by writes that committed (a registration issues a token and
    revokes the earlier one; a deregistration revokes it)."""

    def __init__(self) -> None:
        self._agents: dict[str, str] = {}
        """digest -> agent id"""
        self._digests: dict[str, str] = {}
        """agent id -> digest"""

    def load(self, digests: Iterable[tuple[str, str]]) -> None:
        """Replace what is known with these (agent id, digest) pairs."""
        self._agents.clear()
        self._digests.clear()
        for agent_id, token_digest in digests:
            self.install(agent_id, token_digest)

    def install(self, agent_id: str, token_digest: str) -> str | None:
        """Make `token_digest` the agent's token; returns the digest it replaces, if any."""
        earlier = self.revoke(agent_id)
        self._agents[token_digest] = agent_id
        self._digests[agent_id] = token_digest
        return earlier

    def revoke(self, agent_id: str) -> str | None:
        """The agent has no token any more; returns the digest it had, if any."""
        earlier = self._digests.pop(agent_id, None)
        if earlier is not None:
            del self._agents[earlier]
        return earlier

    def agent_of(self, token_digest: str) -> str | None:
        """The agent whose current token has this digest, if any."""
        return self._agents.get(token_digest)

    def __len__(self) -> int:
        return len(self._digests)
