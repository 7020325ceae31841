"""Every error the domain raises on purpose. The API maps each class to one gRPC status code
(opscore/api/errors.py); anything else that escapes is a fault of the server, not of the client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar


class Resource(enum.Enum):
    """A kind of thing a request may name: its fully-qualified message type (what
    `ResourceInfo.resource_type` carries) and what people call it (what messages say)."""

    AGENT = ("opscore.v1.Agent", "agent")
    DEFINITION = ("opscore.v1.WorkflowDefinition", "workflow definition")
    RUN = ("opscore.v1.WorkflowRun", "workflow run")
    TASK = ("opscore.v1.TaskRun", "task")

    def __init__(self, type_name: str, noun: str) -> None:
        self.type_name = type_name
        self.noun = noun


class OpsCoreError(Exception):
    """Base of the errors a client can cause and act on."""

    resource: tuple[Resource, str] | None = None
    """The thing the error is about, when it names one: its kind and its id (or name)."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One rule a request broke: the field's path (e.g. `tasks[2].depends_on[0]`) and why."""

    field: str
    description: str
    over_limit: bool = False
    """True for a size limit (RESOURCE_EXHAUSTED); False for a malformed value."""

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class InvalidArgument(OpsCoreError):
    """The request is malformed; every offending field is named, so a client fixes all at once."""

    def __init__(self, violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(str(v) for v in self.violations))

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        """The common case of one bad field."""
        return cls([FieldViolation(field, description)])


class NotFound(OpsCoreError):
    """The request names something that does not exist; `key` is the id (or the name, as
    `named` says) the request gave."""

    def __init__(self, kind: Resource, key: str, *, named: bool = False) -> None:
        self.resource = (kind, key)
        super().__init__(f"{kind.noun} {'named ' if named else ''}{key!r} not found")


class FailedPrecondition(OpsCoreError):
    """The request is well-formed but the system is not in a state that allows it."""


class AlreadyExists(OpsCoreError):
    """What the request would create exists already."""


class RequestIdReused(AlreadyExists):
    """A request_id already served a different request (a trigger with another definition,
    input or pin; another definition): the client reused an id it should not have."""

    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: str, kind: Resource, key: str) -> None:
        self.resource = (kind, key)
        super().__init__(
            f"request_id {request_id!r} was used by a different request, which made "
            f"{kind.noun} {key!r}; use a new request_id for a new request"
        )


class ResultConflict(FailedPrecondition):
    """A result repeated for an attempt whose result was recorded, but not the same one: the
    first result stands."""

    reason = "RESULT_CONFLICT"

    def __init__(self, task_id: str, recorded: str) -> None:
        self.resource = (Resource.TASK, task_id)
        super().__init__(
            f"the result of this attempt of task {task_id!r} was recorded already "
            f"({recorded}); it stands"
        )


class PinnedAgentUnfit(FailedPrecondition):
    """A trigger pins its run to an agent that lacks what some of its tasks need (a capability,
    labels): the run would wait forever."""

    reason = "PINNED_AGENT_UNFIT"

    def __init__(self, agent_id: str, lacking: list[tuple[str, list[str]]]) -> None:
        self.resource = (Resource.AGENT, agent_id)
        self.lacking = lacking
        """Each task the agent cannot run, with what it lacks for it."""
        tasks = "; ".join(f"task {name!r} needs {' and '.join(needs)}" for name, needs in lacking)
        super().__init__(f"pinned agent {agent_id!r} cannot run every task of the run: {tasks}")


class Unavailable(OpsCoreError):
    """The server cannot serve this now (it is shutting down); try elsewhere or later."""


class StreamStalled(Unavailable):
    """The agent's task stream took no message for the stall timeout while messages waited: the
    server closed it (the agent's tasks follow the agent-loss rules); reconnect and read."""

    reason = "STREAM_STALLED"


class Aborted(OpsCoreError):
    """The operation lost to a concurrent one (a newer task stream replaced this one)."""


class Unauthenticated(OpsCoreError):
    """The call carries no credentials, or credentials the server does not accept. The message
    says which, and never repeats what was sent."""


class TokenRotated(Unauthenticated):
    """The agent registered again, so the token its stream was opened with no longer works.
    Most often another process runs with the same agent id: registering back would rotate that
    process's token in turn, so an agent told this should stop rather than fight."""

    reason = "AGENT_TOKEN_ROTATED"


class PermissionDenied(OpsCoreError):
    """The caller is known, but may not make this call, or not on behalf of this agent."""


class Throttled(OpsCoreError):
    """A limit on calls refused this one (RESOURCE_EXHAUSTED); it may be tried again after
    `retry_after`."""

    reason: ClassVar[str] = "THROTTLED"

    def __init__(self, message: str, retry_after: timedelta) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class RateLimited(Throttled):
    """The caller made this kind of call faster than its rate allows."""

    reason = "RATE_LIMITED"


class Overloaded(Throttled):
    """The server already runs as many calls (or streams) as it is configured to."""

    reason = "OVERLOADED"


class ResourceExhausted(OpsCoreError):
    """The request is larger than a configured limit allows; the fields over it are named."""

    def __init__(self, violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(str(v) for v in self.violations))


class StorageFault(OpsCoreError):
    """The database could not be used for this request, which wrote nothing: it cannot be
    reached, refuses writes or is full. Not the client's doing, nor a fault of the server's
    code; the client may try again after `retry_after`."""

    reason: ClassVar[str]
    """Names the condition for clients (the `ErrorInfo` reason)."""
    summary: ClassVar[str]
    """What a client is told."""
    lost: ClassVar[bool] = False
    """Whether the condition persists whatever the server does (see `StorageLost`)."""

    def __init__(self, cause: str, retry_after: timedelta) -> None:
        self.cause = cause
        """The driver's words, for the server's log."""
        self.retry_after = retry_after
        super().__init__(self.summary)

    def again(self) -> StorageFault:
        """The same fault, for another caller: each raise of one exception object adds to its
        traceback."""
        return type(self)(self.cause, self.retry_after)


class StorageUnavailable(StorageFault, Unavailable):
    """The database cannot be reached now, closed the connection, is shutting down, refuses
    writes (read-only, a disk error) or stayed locked past the wait."""

    reason = "STORAGE_UNAVAILABLE"
    summary = "the database is unavailable; try again later"


class StorageLost(StorageUnavailable):
    """The database is gone for good as far as this server can tell (corrupt, dropped, or it
    refuses the server's credentials): retrying cannot help, so the server stops."""

    reason = "STORAGE_LOST"
    summary = "the database is lost; the server is stopping"
    lost = True


class StorageFull(StorageFault):
    """The database's disk (or PostgreSQL's) is full: nothing more can be written until space
    is freed."""

    reason = "STORAGE_FULL"
    summary = "the database's disk is full; try again once space is freed"


class StorageReserve(OpsCoreError):
    """Free space on the database's disk is below the reserve kept for finishing work: new work
    (triggers, definitions) is refused while results still go through."""

    reason = "STORAGE_RESERVE"

    def __init__(self, free: int, reserve: int, retry_after: timedelta) -> None:
        self.free = free
        self.reserve = reserve
        self.retry_after = retry_after
        super().__init__(
            f"the database's disk has {free} bytes free, below the reserve of {reserve} "
            "kept for finishing work: no new work is accepted until space is freed"
        )
