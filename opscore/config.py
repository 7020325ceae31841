"""The server's settings: one frozen dataclass, from flags over environment over defaults."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from opscore.authn import AuthConfig, TokenSources
from opscore.domain.engine import (
    AGENT_GRACE,
    DEFAULT_TASK_TIMEOUT,
    QUARANTINE_AFTER,
    EngineSettings,
)
from opscore.domain.health import FAILURES_TO_UNHEALTHY
from opscore.domain.machine import StateMachine
from opscore.domain.membership import REPLICA_LEASE, MembershipSettings
from opscore.domain.quotas import Rate
from opscore.domain.responses import DEFAULT_CLIENT_MESSAGE_BYTES, response_bytes
from opscore.domain.retry import ResolvedRetryPolicy
from opscore.domain.validation import Limits
from opscore.store.database import normalize_url
from opscore.streams import StreamLimits

DEFAULT_DB = "sqlite:///opscore.db"
TRIGGER_RATE = Rate(per_second=5000.0, burst=10_000)
REGISTER_RATE = Rate(per_second=1000.0, burst=10_000)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything an operator can set; `ENVIRONMENT` names the variable of each."""

    listen: str = "localhost:50051"
    """host:port the gRPC server binds (port 0 picks a free one)."""
    db_url: str = DEFAULT_DB
    """SQLAlchemy URL: sqlite:///path.db (default opscore.db here) or postgresql://..."""
    default_task_timeout: timedelta = DEFAULT_TASK_TIMEOUT
    """How long an agent may hold a task whose spec sets no timeout (its lease)."""
    agent_grace: timedelta = AGENT_GRACE
    """How long an agent whose stream closed keeps its tasks before they count as lost."""
    replica_lease: timedelta = REPLICA_LEASE
    """How long a replica on PostgreSQL stays alive unrenewed (it renews every third of it):
    a replica killed is declared dead, and its agents' grace periods start, this long after
    its last renewal."""
    retry: ResolvedRetryPolicy = field(default_factory=ResolvedRetryPolicy)
    """The retry policy of tasks that set none, and the defaults of fields they leave unset."""
    shutdown_grace: float = 10.0
    """Seconds in-flight calls get to finish on SIGTERM/SIGINT before they are cancelled."""
    keepalive_time: float = 30.0
    """Seconds between keepalive pings on a connection, which find dead agents' streams."""
    keepalive_timeout: float = 10.0
    """Seconds a keepalive ping may go unanswered before the connection is closed."""
    max_message_bytes: int = DEFAULT_CLIENT_MESSAGE_BYTES
    """Largest request or response message, in bytes (RESOURCE_EXHAUSTED beyond)."""
    log_format: str = "json"
    """`json` (one object per line, for machines) or `text` (for people)."""
    log_level: str = "INFO"
    """Python logging level name."""
    event_loop: str = "auto"
    """`auto` (uvloop when it is installed, else asyncio's own), `uvloop` or `asyncio`."""
    limits: Limits = field(default_factory=Limits)
    """Sizes the server accepts (tasks per definition, payload bytes, page sizes)."""
    storage_failure_threshold: int = FAILURES_TO_UNHEALTHY
    """Storage transactions failing in a row (reads and writes counted apart) that turn health
    NOT_SERVING; the first success of the failing kind turns it SERVING again."""
    sqlite_free_space_reserve: int = 64 * 1024 * 1024
    """Bytes kept free on an SQLite database's disk for finishing accepted work: below it, new
    runs and definitions are refused (RESOURCE_EXHAUSTED); 0 keeps no reserve."""
    streams: StreamLimits = field(default_factory=StreamLimits)
    """Each task stream's outgoing buffer: messages and bytes at which its agent gets no new
    work, and seconds it may take nothing while messages wait before it is closed."""
    quarantine_after: int = QUARANTINE_AFTER
    """Lease expiries in a row after which an agent is put in ERROR (quarantined)."""
    trigger_rate: Rate = TRIGGER_RATE
    """TriggerWorkflow calls each caller may make: a sustained rate a second and a burst
    (RESOURCE_EXHAUSTED with the wait in RetryInfo beyond); a rate of 0 is no limit. Set above
    what one server can run, so a single client driving it flat out is never slowed."""
    register_rate: Rate = REGISTER_RATE
    """RegisterAgent calls each caller may make, as `trigger_rate`; the burst lets a fleet of
    agents that restart together and share one registration token back in at once."""
    max_streams: int = 20_000
    """Server-streaming calls (agents' task streams) open at once, all callers together; 0 is
    no limit."""
    max_concurrent_calls: int = 1000
    """Unary calls in flight at once, all callers together; 0 is no limit."""
    max_streams_per_connection: int = 100
    """Calls one HTTP/2 connection may have open at once (its SETTINGS_MAX_CONCURRENT_STREAMS):
    a client's further calls wait in the client for one to end."""
    min_ping_interval: float = 10.0
    """Seconds a client must leave between HTTP/2 pings while the server sends it nothing; a
    ping sooner is a strike. Clients' keepalive times must be at least this."""
    max_ping_strikes: int = 2
    """Pings too soon a connection is forgiven: the next one closes it (GOAWAY
    ENHANCE_YOUR_CALM, "too_many_pings"; its calls end UNAVAILABLE). The count starts again
    whenever the server sends the client headers or data. 0 forgives any number."""
    auth: str = "auto"
    """`on` (every call but health and reflection needs credentials), `off`, or `auto`: on
    whenever a token or a client CA is configured."""
    operator_token: str = field(default="", repr=False)
    """A token that makes its bearer an operator (may do everything)."""
    operator_token_file: str = ""
    """A file of operator tokens, one a line (optionally `name token`), reread on SIGHUP."""
    registration_token: str = field(default="", repr=False)
    """A token that may only register agents (what a fleet's agents start with)."""
    registration_token_file: str = ""
    """A file of registration tokens, as `operator_token_file`."""
    insecure: bool = False
    """Serve with authentication off on an address other machines can reach (refused
    otherwise)."""
    tls_cert: str = ""
    """PEM file of the server's certificate (and the intermediates after it): serve TLS; ""
    serves plaintext. Needs `tls_key`."""
    tls_key: str = ""
    """PEM file of the certificate's private key, unencrypted."""
    tls_client_ca: str = ""
    """PEM file of the authorities whose client certificates are required (mutual TLS); ""
    requires none. Needs `tls_cert`."""
    tls_reload_interval: float = 10.0
    """Seconds between looks at the TLS files: new connections get the files as changed."""

    def rules(self) -> StateMachine:
        """The state machine, with the defaults for what a task's spec leaves unset."""
        return StateMachine(self.retry, self.default_task_timeout)

    def authentication(self) -> AuthConfig:
        """The authentication these settings configure."""
        return AuthConfig(
            mode=self.auth,
            operators=TokenSources(
                "operator", "OPSCORE_OPERATOR_TOKEN", self.operator_token, self.operator_token_file
            ),
            registrars=TokenSources(
                "registration",
                "OPSCORE_REGISTRATION_TOKEN",
                self.registration_token,
                self.registration_token_file,
            ),
            client_ca=bool(self.tls_client_ca),
            insecure=self.insecure,
        )

    def engine(self) -> EngineSettings:
        """The engine's share of these settings."""
        return EngineSettings(
            agent_grace=self.agent_grace,
            limits=self.limits,
            streams=self.streams,
            quarantine_after=self.quarantine_after,
            response_bytes=response_bytes(self.max_message_bytes),
            replicas=MembershipSettings(
                address=f"{self.listen} on {socket.gethostname()}",
                lease=self.replica_lease,
                shared=not normalize_url(self.db_url).startswith("sqlite"),
            ),
        )


def _seconds(raw: str) -> timedelta:
    return timedelta(seconds=_non_negative_float(raw))


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError(raw)
    return value


def _positive_seconds(raw: str) -> timedelta:
    return timedelta(seconds=_positive_float(raw))


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(raw)
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("1", "true", "yes", "0", "false", "no", ""):
        raise ValueError(raw)
    return value in ("1", "true", "yes")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError(raw)
        return raw

    return parse


ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "OPSCORE_LISTEN": ("listen", str),
    "OPSCORE_DB": ("db_url", str),
    "OPSCORE_DEFAULT_TASK_TIMEOUT": ("default_task_timeout", _seconds),
    "OPSCORE_AGENT_GRACE": ("agent_grace", _seconds),
    "OPSCORE_REPLICA_LEASE": ("replica_lease", _positive_seconds),
    "OPSCORE_RETRY_MAX_ATTEMPTS": ("retry.max_attempts", _positive_int),
    "OPSCORE_RETRY_INITIAL_BACKOFF": ("retry.initial_backoff", _seconds),
    "OPSCORE_RETRY_BACKOFF_MULTIPLIER": ("retry.backoff_multiplier", _positive_float),
    "OPSCORE_RETRY_MAX_BACKOFF": ("retry.max_backoff", _seconds),
    "OPSCORE_SHUTDOWN_GRACE": ("shutdown_grace", _positive_float),
    "OPSCORE_KEEPALIVE_TIME": ("keepalive_time", _positive_float),
    "OPSCORE_KEEPALIVE_TIMEOUT": ("keepalive_timeout", _positive_float),
    "OPSCORE_MAX_MESSAGE_BYTES": ("max_message_bytes", _positive_int),
    "OPSCORE_MAX_TASKS_PER_DEFINITION": ("limits.max_tasks_per_definition", _positive_int),
    "OPSCORE_MAX_PAYLOAD_BYTES": ("limits.max_payload_bytes", _positive_int),
    "OPSCORE_LOG_FORMAT": ("log_format", _choice("json", "text")),
    "OPSCORE_LOG_LEVEL": ("log_level", _choice("DEBUG", "INFO", "WARNING", "ERROR")),
    "OPSCORE_EVENT_LOOP": ("event_loop", _choice("auto", "uvloop", "asyncio")),
    "OPSCORE_STORAGE_FAILURE_THRESHOLD": ("storage_failure_threshold", _positive_int),
    "OPSCORE_SQLITE_FREE_SPACE_RESERVE": ("sqlite_free_space_reserve", _non_negative_int),
    "OPSCORE_STREAM_BUFFER_MESSAGES": ("streams.max_messages", _positive_int),
    "OPSCORE_STREAM_BUFFER_BYTES": ("streams.max_bytes", _positive_int),
    "OPSCORE_STREAM_STALL_TIMEOUT": ("streams.stall_timeout", _positive_float),
    "OPSCORE_QUARANTINE_LEASE_EXPIRIES": ("quarantine_after", _positive_int),
    "OPSCORE_TRIGGER_RATE": ("trigger_rate.per_second", _non_negative_float),
    "OPSCORE_TRIGGER_BURST": ("trigger_rate.burst", _positive_int),
    "OPSCORE_REGISTER_RATE": ("register_rate.per_second", _non_negative_float),
    "OPSCORE_REGISTER_BURST": ("register_rate.burst", _positive_int),
    "OPSCORE_MAX_STREAMS": ("max_streams", _non_negative_int),
    "OPSCORE_MAX_CONCURRENT_CALLS": ("max_concurrent_calls", _non_negative_int),
    "OPSCORE_MAX_STREAMS_PER_CONNECTION": ("max_streams_per_connection", _positive_int),
    "OPSCORE_MIN_PING_INTERVAL": ("min_ping_interval", _positive_float),
    "OPSCORE_MAX_PING_STRIKES": ("max_ping_strikes", _non_negative_int),
    "OPSCORE_AUTH": ("auth", _choice("on", "off", "auto")),
    "OPSCORE_OPERATOR_TOKEN": ("operator_token", str),
    "OPSCORE_OPERATOR_TOKEN_FILE": ("operator_token_file", str),
    "OPSCORE_REGISTRATION_TOKEN": ("registration_token", str),
    "OPSCORE_REGISTRATION_TOKEN_FILE": ("registration_token_file", str),
    "OPSCORE_INSECURE": ("insecure", _flag),
    "OPSCORE_TLS_CERT": ("tls_cert", str),
    "OPSCORE_TLS_KEY": ("tls_key", str),
    "OPSCORE_TLS_CLIENT_CA": ("tls_client_ca", str),
    "OPSCORE_TLS_RELOAD_INTERVAL": ("tls_reload_interval", _positive_float),
}
"""Each environment variable: the setting it sets (`group.field` for nested ones) and its
parser. Durations are given in seconds."""


def load(environ: Mapping[str, str] = os.environ, **overrides: Any) -> Settings:
    """Settings from the environment, then `overrides` (the command line's flags, None skipped).

    A malformed value raises ValueError naming the variable."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for variable, (path, parse) in ENVIRONMENT.items():
        if variable not in environ:
            continue
        try:
            value = parse(environ[variable])
        except ValueError:
            raise ValueError(f"{variable}={environ[variable]!r} is not valid") from None
        group, _, name = path.rpartition(".")
        if group:
            nested.setdefault(group, {})[name] = value
        else:
            top[path] = value
    top.update({name: value for name, value in overrides.items() if value is not None})
    defaults = Settings()
    for group, values in nested.items():
        top[group] = replace(getattr(defaults, group), **values)
    return replace(defaults, **top)
