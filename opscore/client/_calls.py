"""The worker's calls to the server, each with the right credentials, and what their failures
mean: worth another try (`Unreachable`), the attempt gone (`AttemptLost`), the output refused
(`OutputRefused`), or a refusal no retry cures (the `OpsCoreError` of its code)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from opscore.client._attempts import AttemptKey
from opscore.client._backoff import Backoff
from opscore.client._channels import Channels, Stubs, bearer
from opscore.client._context import Assignment, JsonObject
from opscore.client._errors import AttemptLost, OutputRefused, Unreachable
from opscore.client._refusals import OpsCoreError, refusal
from opscore.client._structs import NOT_A_STRUCT, to_dict, to_struct
from opscore.domain.clock import Clock
from opscore.v1 import agent_lifecycle_pb2, agent_pb2, workflow_pb2, workflow_service_pb2

log = logging.getLogger("opscore.client")

T = TypeVar("T")

CALL_TIMEOUT = 10.0
"""Seconds each unary call may take before it counts as unanswered."""

TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,  # the server is down, draining, or its storage is
    grpc.StatusCode.DEADLINE_EXCEEDED,  # no answer in time: the outcome is unknown
    grpc.StatusCode.CANCELLED,  # the connection went as the call was under way
    grpc.StatusCode.ABORTED,
}
"""Codes after which the same call may succeed later, or on another address."""

GONE = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
"""Codes of a result or extension for an attempt that is no longer the worker's."""

REFUSED_OUTPUT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
"""Codes of an output the server will never take (malformed, too large)."""


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    """The wait a refusal's `google.rpc.RetryInfo` advises, in seconds; None without one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an AioRpcError is a Call
    for detail in () if status is None else status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def unreachable(error: grpc.aio.AioRpcError) -> Unreachable | None:
    """The error as `Unreachable` if the call is worth another try: a transient code, or an
    overload or outage that says when to come back (RetryInfo); None otherwise."""
    advice = retry_after(error)
    if error.code() in TRANSIENT or advice is not None:
        return Unreachable(f"{error.code().name}: {error.details()}", advice or 0.0)
    return None


def assignment_in(message: workflow_pb2.TaskAssignment) -> Assignment:
    """An assignment from the wire, in Python types."""
    return Assignment(
        task_id=message.task_id,
        run_id=message.run_id,
        task_name=message.task_name,
        attempt=message.attempt,
        capability=message.capability,
        input=to_dict(message.input),
        deadline=message.deadline.ToDatetime(tzinfo=UTC),
        redelivered=message.redelivered,
        # Sorted: a protobuf map has no order, and a handler that joins them should not vary.
        dependency_outputs={
            name: to_dict(message.dependency_outputs[name])
            for name in sorted(message.dependency_outputs)
        },
        omitted_dependency_outputs=tuple(message.omitted_dependency_outputs),
        fallback_for=message.fallback_for,
        fallback_error=message.fallback_error,
    )


class Calls:
    """The calls of one agent. Registration carries `token` (a registration or operator
    token; none under mutual TLS or with authentication off); every other call carries the
    agent's own token once registration issued it."""

    def __init__(
        self,
        channels: Channels,
        agent_id: str,
        token: str | None,
        backoff: Backoff,
        clock: Clock,
    ) -> None:
        self._channels = channels
        self.agent_id = agent_id
        self._token = token
        self.agent_token: str | None = None
        """The agent's own token, from its latest registration."""
        self._backoff = backoff
        self._clock = clock

    def agent_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of a call the agent makes as itself."""
        return bearer(self.agent_token or self._token)

    # Calls tried until answered ------------------------------------------------------------

    async def until_answered(self, call: Callable[[Stubs], Awaitable[T]]) -> T:
        """`call` on the address in use, and on the next ones after a backoff for as long as
        it is unanswered (`Unreachable`); any other failure is raised. Unbounded: the caller
        bounds it (by cancelling it)."""
        failures = 0
        while True:
            try:
                return await self.once(call)
            except Unreachable as error:
                failures += 1
                log.info(
                    "call unanswered; trying again",
                    extra={"address": self._channels.address, "error": str(error)},
                )
                self._channels.advance()
                await self._clock.sleep(max(self._backoff.delay(failures), error.retry_after))

    async def once(self, call: Callable[[Stubs], Awaitable[T]]) -> T:
        """`call` on the address in use, its `AioRpcError` raised as `Unreachable` when
        another try may succeed."""
        try:
            return await call(self._channels.current())
        except grpc.aio.AioRpcError as error:
            transient = unreachable(error)
            if transient is not None:
                raise transient from error
            raise

    # The agent's lifecycle -----------------------------------------------------------------

    async def register(
        self,
        capabilities: Sequence[str],
        labels: Mapping[str, str],
        max_concurrent_tasks: int,
        name: str,
        version: str,
    ) -> None:
        """Register (again), keeping the agent token it issues; tried until answered."""
        request = agent_lifecycle_pb2.RegisterAgentRequest(
            agent_id=self.agent_id,
            name=name,
            version=version,
            capabilities=list(capabilities),
            labels=dict(labels),
            max_concurrent_tasks=max_concurrent_tasks,
        )
        response = await self.until_answered(
            lambda stubs: stubs.lifecycle.RegisterAgent(
                request, metadata=bearer(self._token), timeout=CALL_TIMEOUT
            )
        )
        self.agent_token = response.agent_token or None

    async def heartbeat(self, timeout: float = CALL_TIMEOUT) -> datetime:
        """One heartbeat, unanswered after `timeout` seconds; the server's time in it."""
        response = await self.once(
            lambda stubs: stubs.lifecycle.Heartbeat(
                agent_lifecycle_pb2.HeartbeatRequest(agent_id=self.agent_id),
                metadata=self.agent_metadata(),
                timeout=timeout,
            )
        )
        return response.server_time.ToDatetime(tzinfo=UTC)

    async def report_state(self, state: agent_pb2.ReportedAgentState.ValueType) -> None:
        """Report the agent's state (IDLE, BUSY); tried until answered."""
        await self.until_answered(
            lambda stubs: stubs.lifecycle.ReportState(
                agent_lifecycle_pb2.ReportStateRequest(agent_id=self.agent_id, state=state),
                metadata=self.agent_metadata(),
                timeout=CALL_TIMEOUT,
            )
        )

    async def deregister(self) -> None:
        """Remove the agent: the attempts it still holds go back to the queue."""
        await self.until_answered(
            lambda stubs: stubs.lifecycle.DeregisterAgent(
                agent_lifecycle_pb2.DeregisterAgentRequest(agent_id=self.agent_id),
                metadata=self.agent_metadata(),
                timeout=CALL_TIMEOUT,
            )
        )

    def stream(self) -> Any:
        """Open the task stream on the address in use (the call, to read from)."""
        return self._channels.current().workflows.StreamTasks(
            workflow_service_pb2.StreamTasksRequest(agent_id=self.agent_id),
            metadata=self.agent_metadata(),
        )

    # Results and leases ----------------------------------------------------------------------

    async def complete(self, key: AttemptKey, output: JsonObject) -> None:
        """Record the attempt's output, sent again until answered (a repeat of a recorded
        result is OK). Raises `AttemptLost` or `OutputRefused`."""
        try:
            request = workflow_service_pb2.CompleteTaskRequest(
                task_id=key[0], agent_id=self.agent_id, attempt=key[1], output=to_struct(output)
            )
        except NOT_A_STRUCT as error:
            raise OutputRefused(f"the output cannot be sent as a JSON object: {error}") from error
        try:
            await self._result(
                lambda stubs: stubs.workflows.CompleteTask(
                    request, metadata=self.agent_metadata(), timeout=CALL_TIMEOUT
                )
            )
        except OpsCoreError as error:
            if error.code in REFUSED_OUTPUT:
                raise OutputRefused(f"the server refused the output: {error.message}") from error
            raise

    async def fail(self, key: AttemptKey, error: str, retryable: bool) -> None:
        """Record the attempt's failure, sent again until answered. Raises `AttemptLost`."""
        request = workflow_service_pb2.FailTaskRequest(
            task_id=key[0], agent_id=self.agent_id, attempt=key[1], error=error, retryable=retryable
        )
        await self._result(
            lambda stubs: stubs.workflows.FailTask(
                request, metadata=self.agent_metadata(), timeout=CALL_TIMEOUT
            )
        )

    async def extend(self, key: AttemptKey, by: timedelta) -> datetime:
        """Extend the attempt's lease to `by` from now, once; the new deadline. Raises
        `AttemptLost`, `Unreachable` (the next try goes to the next address), or the refusal."""
        extend_by = Duration()
        extend_by.FromTimedelta(by)
        request = workflow_service_pb2.ExtendTaskLeaseRequest(
            task_id=key[0], agent_id=self.agent_id, attempt=key[1], extend_by=extend_by
        )
        try:
            response = await self.once(
                lambda stubs: stubs.workflows.ExtendTaskLease(
                    request, metadata=self.agent_metadata(), timeout=CALL_TIMEOUT
                )
            )
        except Unreachable:
            self._channels.advance()
            raise
        except grpc.aio.AioRpcError as error:
            raise _lost_or(error) from error
        return response.deadline.ToDatetime(tzinfo=UTC)

    async def _result(self, call: Callable[[Stubs], Awaitable[object]]) -> None:
        try:
            await self.until_answered(call)
        except grpc.aio.AioRpcError as error:
            raise _lost_or(error) from error


def _lost_or(error: grpc.aio.AioRpcError) -> AttemptLost | OpsCoreError:
    """`AttemptLost` for a refusal that means the attempt is gone; the `OpsCoreError` of its
    code otherwise."""
    if error.code() in GONE:
        return AttemptLost(f"{error.code().name}: {error.details()}")
    return refusal(error)
