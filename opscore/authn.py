"""The server's authentication, as configured: the operator and registration tokens (from the
environment and from files, reread on SIGHUP or when a file changes), whether authentication is
on, and the refusal to serve open on an address other machines can reach.

A token file holds one token a line, optionally after a name (`alice 3fd9...`), so that the
tokens of several people or systems can be told apart in audit lines, and a new token can be
added before the old one is removed. Blank lines and lines starting with `#` are skipped.
Nothing here ever logs or reports a token: a malformed file is named by its path and line.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from opscore.domain.access import Authority
from opscore.domain.credentials import MIN_TOKEN_LENGTH, AgentTokens, NamedToken, TokenSet
from opscore.startup import StartupError

log = logging.getLogger("opscore.server")

LOOPBACK_NAMES = ("localhost",)
"""Host names that resolve to the loopback interface only."""


@dataclass(frozen=True, slots=True)
class TokenSources:
    """Where one role's tokens come from: a variable's value, and a file."""

    role: str
    """"operator" or "registration", for messages."""
    variable: str
    """The environment variable `value` was read from."""
    value: str
    path: str

    def load(self) -> TokenSet:
        """The tokens, or a StartupError naming the variable or the file's path and line."""
        tokens: list[NamedToken] = []
        if self.value:
            tokens.append(NamedToken.of(self.variable.lower(), self._checked(self.value, "")))
        if self.path:
            tokens.extend(self._from_file(Path(self.path)))
        return TokenSet(tokens)

    def _from_file(self, path: Path) -> list[NamedToken]:
        try:
            text = path.read_text()
        except OSError as error:
            raise StartupError(
                f"cannot read the {self.role} token file {path}", error.strerror or str(error)
            ) from None
        tokens = []
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2:
                raise StartupError(
                    f"the {self.role} token file {path} is malformed",
                    f"line {number} has more than a name and a token",
                )
            name = fields[0] if len(fields) == 2 else ""
            tokens.append(NamedToken.of(name, self._checked(fields[-1], f"{path}:{number}")))
        return tokens

    def _checked(self, token: str, where: str) -> str:
        if len(token) < MIN_TOKEN_LENGTH:
            place = where or self.variable
            raise StartupError(
                f"the {self.role} token in {place} is too short",
                f"tokens have at least {MIN_TOKEN_LENGTH} characters",
            )
        return token


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """The authentication settings of a server."""

    mode: str
    """"on", "off" or "auto" (on when any token or a client CA is configured)."""
    operators: TokenSources
    registrars: TokenSources
    client_ca: bool
    """Whether clients present certificates (mutual TLS), which can identify them."""
    insecure: bool
    """Serve with authentication off on an address other machines can reach."""

    def enabled(self, operators: TokenSet, registrars: TokenSet) -> bool:
        """Whether calls need credentials, given the tokens loaded."""
        if self.mode == "auto":
            return bool(operators or registrars or self.client_ca)
        return self.mode == "on"

    def authority(self, listen: str, agents: AgentTokens) -> Authority:
        """The authority these settings make, or a StartupError for a configuration that would
        lock every operator out, or leave a reachable server open without `insecure`."""
        operators, registrars = self.operators.load(), self.registrars.load()
        enabled = self.enabled(operators, registrars)
        if enabled and not operators and not self.client_ca:
            raise StartupError(
                "authentication is on, but nobody could operate the server",
                "configure an operator token (OPSCORE_OPERATOR_TOKEN or --operator-token-file) "
                "or client certificates (--tls-client-ca)",
            )
        if not enabled:
            if not self.insecure and not is_loopback(listen):
                raise StartupError(
                    f"refusing to serve {listen} with authentication off",
                    "other machines can reach it: configure an operator token "
                    "(OPSCORE_OPERATOR_TOKEN or --operator-token-file), or pass --insecure",
                    address=listen,
                )
            log.warning(
                "authentication is off: every call is open to anyone who can reach the address",
                extra={"listen": listen},
            )
        return Authority(enabled, operators, registrars, agents)

    def reload(self, authority: Authority) -> None:
        """Read the token files again; a file that no longer loads leaves the tokens as they
        were (logged, naming the file)."""
        try:
            operators, registrars = self.operators.load(), self.registrars.load()
        except StartupError as error:
            log.error("tokens not reloaded", extra={"reason": str(error)})
            return
        authority.replace_tokens(operators, registrars)
        log.info(
            "tokens reloaded",
            extra={"operator_tokens": len(operators), "registration_tokens": len(registrars)},
        )


def is_loopback(listen: str) -> bool:
    """Whether `host:port` binds the loopback interface only."""
    host = listen.rpartition(":")[0].strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
