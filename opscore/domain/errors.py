"""Every error the domain raises on purpose. The API maps each class to one gRPC status code
(opscore/api/errors.py); anything else that escapes is a fault of the server, not of the client.
"""

from __future__ import annotations

from dataclasses import dataclass


class OpsCoreError(Exception):
    """Base of the errors a client can cause and act on."""


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
    """The request names something that does not exist."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        super().__init__(f"{kind} {key!r} not found")


class FailedPrecondition(OpsCoreError):
    """The request is well-formed but the system is not in a state that allows it."""


class Unavailable(OpsCoreError):
    """The server cannot serve this now (it is shutting down); try elsewhere or later."""


class Aborted(OpsCoreError):
    """The operation lost to a concurrent one (a newer task stream replaced this one)."""


class ResourceExhausted(OpsCoreError):
    """The request is larger than a configured limit allows; the fields over it are named."""

    def __init__(self, violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(str(v) for v in self.violations))
