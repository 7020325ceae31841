"""The server's refusals as exceptions a `Client` raises: one class per status code, under
`OpsCoreError`, each carrying what the status details say (docs/errors.md): the `ErrorInfo`
reason and metadata, the `BadRequest` field violations, the `ResourceInfo`, the `RetryInfo`."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One field of a request the server refused, by its path (`definition.tasks[2].name`)."""

    field: str
    description: str


class OpsCoreError(Exception):
    """A call the server refused, or that no server answered. `code` is its gRPC status code,
    `message` the server's text; `reason` and `metadata` are its `google.rpc.ErrorInfo` (every
    error Ops-Core answers carries one; empty for a refusal from gRPC itself, such as no server
    listening); `violations` the fields a `BadRequest` names; `resource` the (type, name) of
    the `ResourceInfo` (what was not found, or what a `request_id` made); `retry_after` the
    seconds a `RetryInfo` advises waiting (None without one)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        violations: tuple[FieldViolation, ...] = (),
        resource: tuple[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = violations
        self.resource = resource
        self.retry_after = retry_after


class InvalidArgument(OpsCoreError):
    """The request is malformed: `violations` names each bad field."""


class NotFound(OpsCoreError):
    """The agent, definition, run or task named does not exist (`resource` says which)."""


class AlreadyExists(OpsCoreError):
    """A `request_id` made something else already (`REQUEST_ID_REUSED`)."""


class FailedPrecondition(OpsCoreError):
    """Well-formed but not allowed now: cancelling a finished run, a pinned agent unfit."""


class Aborted(OpsCoreError):
    """Lost to a concurrent operation."""


class ResourceExhausted(OpsCoreError):
    """A size limit, a rate or the server's capacity: `retry_after` says when to come back,
    when coming back may help."""


class Unauthenticated(OpsCoreError):
    """No credentials, or credentials the server does not know."""


class PermissionDenied(OpsCoreError):
    """The caller is known but may not make this call."""


class Unavailable(OpsCoreError):
    """No server answered (none listening, shutting down), or its storage cannot be used now."""


class DeadlineExceeded(OpsCoreError):
    """No answer within the call's timeout: whether it took effect is unknown."""


class Unimplemented(OpsCoreError):
    """The server does not offer the method."""


class Internal(OpsCoreError):
    """A fault of the server (its log has the traceback)."""


_BY_CODE: dict[grpc.StatusCode, type[OpsCoreError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
}


def refusal(error: grpc.aio.AioRpcError) -> OpsCoreError:
    """The exception of a failed call: the class of its code (`OpsCoreError` itself for the
    others, such as CANCELLED), with what its status details carry."""
    code = error.code()
    found = _Details()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an AioRpcError is a Call
    for detail in () if status is None else status.details:
        found.take(detail)
    return _BY_CODE.get(code, OpsCoreError)(
        code,
        error.details() or "",
        reason=found.info.reason,
        domain=found.info.domain,
        metadata=dict(found.info.metadata),
        violations=found.violations,
        resource=found.resource,
        retry_after=found.retry_after,
    )


class _Details:
    """The details of one `google.rpc.Status` that a refusal carries, unpacked."""

    def __init__(self) -> None:
        self.info = error_details_pb2.ErrorInfo()
        self.violations: tuple[FieldViolation, ...] = ()
        self.resource: tuple[str, str] | None = None
        self.retry_after: float | None = None

    def take(self, detail: any_pb2.Any) -> None:
        """Unpack `detail` if it is a kind a refusal reads."""
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(self.info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            self.violations += tuple(
                FieldViolation(v.field, v.description) for v in bad.field_violations
            )
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            self.resource = (info.resource_type, info.resource_name)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            self.retry_after = retry.retry_delay.ToTimedelta().total_seconds()
