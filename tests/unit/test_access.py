"""Who may call what, as plain logic: identifying a caller from a token or a certificate, and
what each role may do."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opscore.api.access import bearer_token
from opscore.domain.access import Authority, Caller, Certificate, Need, Role, authorize
from opscore.domain.credentials import (
    AGENT_TOKEN_PREFIX,
    AgentTokens,
    NamedToken,
    TokenSet,
    digest,
    issue_agent_token,
)
from opscore.domain.errors import PermissionDenied, Unauthenticated

OPERATOR = "operator-secret-000000"
REGISTRAR = "registrar-secret-00000"


def authority(enabled: bool = True) -> Authority:
    agents = AgentTokens()
    agents.install("a", digest("token-of-a"))
    return Authority(
        enabled,
        TokenSet([NamedToken.of("ops", OPERATOR)]),
        TokenSet([NamedToken.of("", REGISTRAR)]),
        agents,
    )


def who(made: Authority, token: str | None, certificate: Certificate | None, peer: str) -> Caller:
    """The caller `made` identifies from a token, a certificate and an address."""
    return made.identify(token, lambda: certificate, lambda: peer)


def test_tokens_name_their_callers() -> None:
    made = authority()
    assert who(made, OPERATOR, None, "h") == Caller(Role.OPERATOR, "operator:ops")
    registrar = who(made, REGISTRAR, None, "h")
    assert registrar.role is Role.REGISTRAR
    assert registrar.name == f"registrar:token-{digest(REGISTRAR)[:8]}"
    agent = who(made, "token-of-a", None, "h")
    assert (agent.role, agent.agent_id, agent.token_digest) == (
        Role.AGENT,
        "a",
        digest("token-of-a"),
    )


@pytest.mark.parametrize("token", ["", "wrong", OPERATOR + "x", OPERATOR[:-1]])
def test_unknown_tokens_are_refused_without_being_repeated(token: str) -> None:
    with pytest.raises(Unauthenticated) as refused:
        who(authority(), token, None, "h")
    assert token not in str(refused.value) or not token


def test_no_credentials_are_refused_and_off_lets_everyone_operate() -> None:
    with pytest.raises(Unauthenticated):
        who(authority(), None, None, "h")
    assert who(authority(enabled=False), None, None, "10.0.0.1") == Caller(
        Role.OPERATOR, "anonymous@10.0.0.1"
    )


def test_certificates_name_agents_and_operators_by_uri() -> None:
    made = authority()
    agent = who(made, None, Certificate("CN=x", ("spiffe://x/y", "opscore://agent/a-1")), "h")
    assert (agent.role, agent.agent_id, agent.certified) == (Role.AGENT, "a-1", True)
    operator = who(made, None, Certificate("CN=y", ("opscore://operator/alice",)), "h")
    assert (operator.role, operator.name) == (Role.OPERATOR, "operator:alice")
    for uris in ((), ("opscore://agent/",), ("opscore://agent/a/b",), ("opscore://other/x",)):
        with pytest.raises(Unauthenticated, match="names no agent or operator"):
            who(made, None, Certificate("CN=z", uris), "h")


def test_a_token_decides_over_a_certificate() -> None:
    caller = who(authority(), REGISTRAR, Certificate("CN=a", ("opscore://agent/a",)), "h")
    assert caller.role is Role.REGISTRAR


def test_replaced_tokens_stop_working_at_once() -> None:
    made = authority()
    made.replace_tokens(TokenSet([NamedToken.of("new", "new-operator-secret-0")]), TokenSet())
    with pytest.raises(Unauthenticated):
        who(made, OPERATOR, None, "h")
    assert who(made, "new-operator-secret-0", None, "h").name == "operator:new"


OPERATOR_CALLER = Caller(Role.OPERATOR, "operator:ops")
REGISTRAR_CALLER = Caller(Role.REGISTRAR, "registrar:r")
AGENT_BY_TOKEN = Caller(Role.AGENT, "agent:a", agent_id="a", token_digest="d")
AGENT_BY_CERTIFICATE = Caller(Role.AGENT, "agent:a", agent_id="a", certified=True)

# (caller, need, acting as) -> allowed
CASES = [
    (OPERATOR_CALLER, Need.OPERATOR, "", True),
    (OPERATOR_CALLER, Need.AGENT, "anyone", True),
    (OPERATOR_CALLER, Need.REGISTRATION, "anyone", True),
    (REGISTRAR_CALLER, Need.REGISTRATION, "anyone", True),
    (REGISTRAR_CALLER, Need.AGENT, "a", False),
    (REGISTRAR_CALLER, Need.OPERATOR, "", False),
    (AGENT_BY_TOKEN, Need.AGENT, "a", True),
    (AGENT_BY_TOKEN, Need.AGENT, "b", False),
    (AGENT_BY_TOKEN, Need.OPERATOR, "", False),
    (AGENT_BY_TOKEN, Need.REGISTRATION, "a", False),
    (AGENT_BY_CERTIFICATE, Need.REGISTRATION, "a", True),
    (AGENT_BY_CERTIFICATE, Need.REGISTRATION, "b", False),
    (AGENT_BY_CERTIFICATE, Need.REGISTRATION, "", False),
    (AGENT_BY_CERTIFICATE, Need.AGENT, "a", True),
]


@pytest.mark.parametrize(("caller", "need", "acting_as", "allowed"), CASES)
def test_what_each_role_may_do(caller: Caller, need: Need, acting_as: str, allowed: bool) -> None:
    if allowed:
        authorize(caller, need, acting_as)
    else:
        with pytest.raises(PermissionDenied):
            authorize(caller, need, acting_as)


@given(
    role=st.sampled_from(Role),
    agent_id=st.text(min_size=1, max_size=8),
    acting_as=st.text(max_size=8),
)
def test_open_calls_need_nothing_and_agents_never_act_for_another(
    role: Role, agent_id: str, acting_as: str
) -> None:
    caller = Caller(role, "x", agent_id=agent_id if role is Role.AGENT else "")
    authorize(caller, Need.NOTHING, acting_as)
    if role is Role.AGENT and acting_as != agent_id:
        for need in Need:
            if need is not Need.NOTHING:
                with pytest.raises(PermissionDenied):
                    authorize(caller, need, acting_as)


def test_agent_tokens_rotate_and_revoke() -> None:
    tokens = AgentTokens()
    first, first_digest = issue_agent_token()
    assert first.startswith(AGENT_TOKEN_PREFIX)
    assert tokens.install("a", first_digest) is None
    _, second_digest = issue_agent_token()
    assert tokens.install("a", second_digest) == first_digest
    assert tokens.agent_of(first_digest) is None
    assert tokens.agent_of(second_digest) == "a"
    assert tokens.revoke("a") == second_digest
    assert tokens.agent_of(second_digest) is None
    assert len(tokens) == 0
    tokens.load([("b", first_digest)])
    assert tokens.agent_of(first_digest) == "b"


def test_every_configured_token_matches_by_its_name() -> None:
    tokens = TokenSet([NamedToken.of("one", "x" * 20), NamedToken.of("two", "y" * 20)])
    assert tokens.match(digest("y" * 20)) == "two"
    assert tokens.match(digest("z" * 20)) is None
    assert len(tokens) == 2


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((), None),
        ((("x-other", "v"),), None),
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
    ],
)
def test_the_bearer_token_of_a_call(
    metadata: tuple[tuple[str, str], ...], token: str | None
) -> None:
    assert bearer_token(metadata) == token


@pytest.mark.parametrize(
    "metadata",
    [
        (("authorization", "Basic abc"),),
        (("authorization", "Bearer"),),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer a"), ("authorization", "Bearer b")),
    ],
)
def test_malformed_authorization_is_unauthenticated(
    metadata: tuple[tuple[str, str], ...],
) -> None:
    with pytest.raises(Unauthenticated) as refused:
        bearer_token(metadata)
    assert "abc" not in str(refused.value)
