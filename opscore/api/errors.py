"""Domain errors to gRPC statuses: the one place where that mapping lives.

Each error becomes a `google.rpc.Status` with typed details a client in any language can read:
`BadRequest` field violations for INVALID_ARGUMENT, `ResourceInfo` for NOT_FOUND, `RetryInfo`
for an error that says when to try again (storage faults), and an `ErrorInfo` naming the reason
on all of them. Anything else that escapes a handler is a fault of
the server: it is logged with its traceback and answered INTERNAL (with its `ErrorInfo` too),
never blamed on the client; a method the server does not offer is UNIMPLEMENTED, likewise.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from opscore.domain.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OpsCoreError,
    PermissionDenied,
    ResourceExhausted,
    StorageFull,
    StorageReserve,
    Throttled,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("opscore.api")

ERROR_DOMAIN = "opscore.v1"
"""The `ErrorInfo.domain` of every error Ops-Core raises."""

_CODES: dict[type[OpsCoreError], tuple[int, str]] = {
    InvalidArgument: (code_pb2.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    NotFound: (code_pb2.NOT_FOUND, "NOT_FOUND"),
    AlreadyExists: (code_pb2.ALREADY_EXISTS, "ALREADY_EXISTS"),
    FailedPrecondition: (code_pb2.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    Aborted: (code_pb2.ABORTED, "ABORTED"),
    Unavailable: (code_pb2.UNAVAILABLE, "UNAVAILABLE"),
    StorageFull: (code_pb2.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    StorageReserve: (code_pb2.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    ResourceExhausted: (code_pb2.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    Throttled: (code_pb2.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    Unauthenticated: (code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED"),
    PermissionDenied: (code_pb2.PERMISSION_DENIED, "PERMISSION_DENIED"),
}


def _pack(message: Message) -> AnyMessage:
    packed = AnyMessage()
    packed.Pack(message)
    return packed


def to_status(error: OpsCoreError) -> grpc.Status:
    """The gRPC status, with rich details, for a domain error."""
    code, reason = next(
        (mapped for kind, mapped in _CODES.items() if isinstance(error, kind)),
        (code_pb2.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    )
    details: list[Message] = []
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        delay = Duration()
        delay.FromTimedelta(retry_after)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(error, InvalidArgument):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
        details.append(error_details_pb2.BadRequest(field_violations=violations))
    elif isinstance(error, ResourceExhausted):
        quota = [
            error_details_pb2.QuotaFailure.Violation(subject=v.field, description=v.description)
            for v in error.violations
        ]
        details.append(error_details_pb2.QuotaFailure(violations=quota))
    if error.resource is not None:
        kind, name = error.resource
        details.append(
            error_details_pb2.ResourceInfo(resource_type=kind.type_name, resource_name=name)
        )
    return _status(code, getattr(error, "reason", reason), str(error), details)


def internal_status() -> grpc.Status:
    """The answer to a fault of the server: INTERNAL, with the `ErrorInfo` every error carries
    and nothing of the fault itself (that goes to the log)."""
    return _status(code_pb2.INTERNAL, "INTERNAL", "internal error; see the server's log", [])


def _status(code: int, reason: str, message: str, details: list[Message]) -> grpc.Status:
    """A status whose details are the `ErrorInfo` naming `reason`, then `details`."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    packed = [_pack(detail) for detail in (info, *details)]
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    if isinstance(error, OpsCoreError):
        status = to_status(error)
        await context.abort(status.code, status.details, status.trailing_metadata)
    log.error("unexpected error in a handler", exc_info=error)
    status = internal_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


Behavior = Callable[[Any, Any], Any]
"""A handler's behaviour: (request, context) to a response awaitable or an async iterator."""


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. nested deeper than protobuf's
    limit), so the guard answers INVALID_ARGUMENT instead of gRPC's UNKNOWN."""

    reason: str


def _guard_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def guarded(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except DecodeError as error:
            return _Undecodable(str(error))

    return guarded


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument.single("request", f"cannot be decoded: {request.reason}")
    return request


class _DetailedAborts:
    """A handler's context whose aborts carry the `ErrorInfo` every error carries: for the
    handlers of services not ours (health), which abort with a bare code."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        """Abort as asked, with an `ErrorInfo` whose reason is the code's name."""
        number, _ = code.value
        status = _status(number, code.name, details, [])
        metadata = (*trailing_metadata, *status.trailing_metadata)
        await self._context.abort(code, details, metadata)


def _foreign(behavior: Behavior) -> Behavior:
    """`behavior` with its context's aborts detailed (see `_DetailedAborts`)."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            async for response in behavior(request, _DetailedAborts(context)):
                yield response

        return streaming

    async def unary(request: Any, context: Any) -> Any:
        return await behavior(request, _DetailedAborts(context))

    return unary


def _guard_unary(behavior: Behavior) -> Behavior:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(_decoded(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped or logged, see the module docstring
            await _abort(context, error)

    return guarded


def _guard_stream(behavior: Behavior) -> Behavior:
    async def guarded(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(_decoded(request), context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - mapped or logged, see the module docstring
            await _abort(context, error)

    return guarded


_OURS = f"/{ERROR_DOMAIN}."
"""The prefix of the methods of Ops-Core's own services, whose errors are mapped above."""

_MAX_GUARDED = 1024
"""Guarded handlers kept (the server has a few dozen methods)."""


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary and server-streaming handler with the mapping above."""

    def __init__(self) -> None:
        # Handlers are found anew for every call but are the same few objects: each is guarded
        # once, not once per call.
        self._guarded: dict[int, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Return the method's handler with its behaviour guarded."""
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return _unimplemented(handler_call_details.method)
        known = self._guarded.get(id(handler))
        if known is not None and known[0] is handler:
            return known[1]
        guarded = _guard(handler, foreign=not handler_call_details.method.startswith(_OURS))
        if len(self._guarded) >= _MAX_GUARDED:  # handlers are not expected to be made per call
            self._guarded.clear()
        self._guarded[id(handler)] = (handler, guarded)
        return guarded


def _unimplemented(method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler for a method the server does not offer: gRPC's own answer (UNIMPLEMENTED)
    would carry no `ErrorInfo`. Rare enough to be made per call."""

    async def refuse(_request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        message = f"method {method!r} is not offered by this server"
        status = _status(code_pb2.UNIMPLEMENTED, "UNIMPLEMENTED", message, [])
        await context.abort(status.code, status.details, status.trailing_metadata)

    return grpc.unary_unary_rpc_method_handler(refuse)


def _guard(handler: Any, *, foreign: bool) -> grpc.RpcMethodHandler[Any, Any]:
    deserializer = _guard_deserializer(handler.request_deserializer)
    guarded: grpc.RpcMethodHandler[Any, Any] = handler
    if handler.unary_unary is not None:
        unary = _foreign(handler.unary_unary) if foreign else handler.unary_unary
        guarded = handler._replace(
            unary_unary=_guard_unary(unary), request_deserializer=deserializer
        )
    elif handler.unary_stream is not None:
        # A streaming behaviour is an async generator, or (health's Watch) a coroutine that
        # writes with context.write: each is guarded in its own shape.
        streaming = handler.unary_stream
        guard = _guard_stream if inspect.isasyncgenfunction(streaming) else _guard_unary
        behavior = _foreign(streaming) if foreign else streaming
        guarded = handler._replace(unary_stream=guard(behavior), request_deserializer=deserializer)
    return guarded
