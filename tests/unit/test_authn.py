"""The authentication a server is configured with: token files, the modes, and the refusal to
serve open where other machines can reach it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from opscore.authn import is_loopback
from opscore.config import Settings
from opscore.domain.access import Authority, Caller, Role
from opscore.domain.credentials import AgentTokens
from opscore.startup import StartupError

TOKEN = "a-token-long-enough-0001"
OTHER = "a-token-long-enough-0002"


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("localhost:50051", True),
        ("127.0.0.1:1", True),
        ("127.8.9.10:1", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.5:50051", False),
        ("example.com:50051", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_open_on_loopback_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        made = Settings().authentication().authority("localhost:50051", AgentTokens())
    assert not made.enabled
    assert "authentication is off" in caplog.text


def test_open_where_others_reach_is_refused_unless_insecure() -> None:
    with pytest.raises(StartupError, match=r"refusing to serve 0\.0\.0\.0:50051"):
        Settings().authentication().authority("0.0.0.0:50051", AgentTokens())
    made = replace(Settings(), insecure=True).authentication().authority("0.0.0.0:1", AgentTokens())
    assert not made.enabled


def test_a_token_turns_authentication_on_and_off_turns_it_off() -> None:
    settings = replace(Settings(), operator_token=TOKEN)
    assert settings.authentication().authority("0.0.0.0:1", AgentTokens()).enabled
    off = replace(settings, auth="off", insecure=True)
    assert not off.authentication().authority("0.0.0.0:1", AgentTokens()).enabled


def test_on_without_any_operator_is_refused() -> None:
    with pytest.raises(StartupError, match="nobody could operate"):
        replace(Settings(), auth="on").authentication().authority("localhost:1", AgentTokens())
    registration_only = replace(Settings(), registration_token=TOKEN)
    with pytest.raises(StartupError, match="nobody could operate"):
        registration_only.authentication().authority("localhost:1", AgentTokens())


def who(made: Authority, token: str, certificate: None, peer: str) -> Caller:
    """The caller `made` identifies from a token alone."""
    return made.identify(token, lambda: certificate, lambda: peer)


def test_token_files_name_their_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# operators\n\nalice {TOKEN}\n  {OTHER}  \n")
    settings = replace(Settings(), operator_token_file=str(path))
    made = settings.authentication().authority("localhost:1", AgentTokens())
    alice = who(made, TOKEN, None, "host")
    assert (alice.role, alice.name) == (Role.OPERATOR, "operator:alice")
    assert who(made, OTHER, None, "host").name.startswith("operator:token-")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("short\n", "too short"),
        (f"a b {TOKEN}\n", "more than a name and a token"),
    ],
)
def test_malformed_token_files_are_named_never_quoted(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    settings = replace(Settings(), registration_token_file=str(path), operator_token=TOKEN)
    with pytest.raises(StartupError, match=message) as refused:
        settings.authentication().authority("localhost:1", AgentTokens())
    assert str(path) in str(refused.value)
    assert TOKEN not in str(refused.value)
    assert "short" not in refused.value.cause


def test_a_missing_token_file_is_named(tmp_path: Path) -> None:
    settings = replace(Settings(), operator_token_file=str(tmp_path / "absent"))
    with pytest.raises(StartupError, match="cannot read the operator token file"):
        settings.authentication().authority("localhost:1", AgentTokens())


def test_a_short_token_in_the_environment_is_refused() -> None:
    with pytest.raises(StartupError, match="in OPSCORE_OPERATOR_TOKEN is too short"):
        replace(Settings(), operator_token="short").authentication().authority(
            "localhost:1", AgentTokens()
        )
