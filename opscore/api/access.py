"""Who may call what, and how much: the one place where every call is authenticated,
authorized, rate-limited and counted against the server's capacity, before its servicer runs.

`RULES` names what each method of the server needs; a method missing from it is refused (a test
checks it against every method reflection finds). Refusals are domain errors, mapped to their
statuses by `ErrorInterceptor`, which wraps this interceptor. A refused call reaches no
servicer, so it changes nothing.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from opscore.api.peers import peer_certificate, peer_host
from opscore.domain.access import Authority, Caller, Need, authorize
from opscore.domain.errors import Overloaded, RateLimited, Unauthenticated
from opscore.domain.quotas import RateLimiter, Slots
from opscore.v1 import agent_lifecycle_pb2, workflow_service_pb2

log = logging.getLogger("opscore.api")
audit = logging.getLogger("opscore.audit")

Fields = Callable[[Any, Any], Mapping[str, str]]
"""What an audit line records of a call: (request, response) to named values."""


@dataclass(frozen=True, slots=True)
class Audited:
    """An operator action worth an audit line: what it did, and what it did it to."""

    action: str
    fields: Fields


@dataclass(frozen=True, slots=True)
class Rule:
    """What one method needs of its caller."""

    need: Need
    acting_as: str = ""
    """The request's field that names the agent the caller acts as (for `Need.AGENT` and
    `Need.REGISTRATION`)."""
    rate: str = ""
    """The per-caller rate this method counts against ("trigger", "register"), if any."""
    audited: Audited | None = None


def _agent_id(request: Any, response: Any) -> Mapping[str, str]:
    return {"agent_id": response.agent.agent_id if response is not None else request.agent_id}


_LIFECYCLE = agent_lifecycle_pb2.DESCRIPTOR.services_by_name["AgentLifecycle"].full_name
_WORKFLOWS = workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"].full_name
_OPERATOR = Rule(Need.OPERATOR)
_AGENT = Rule(Need.AGENT, acting_as="agent_id")

RULES: dict[str, Rule] = {
    f"/{_LIFECYCLE}/RegisterAgent": Rule(
        Need.REGISTRATION,
        acting_as="agent_id",
        rate="register",
        audited=Audited("agent token issued", _agent_id),
    ),
    f"/{_LIFECYCLE}/DeregisterAgent": Rule(
        Need.AGENT,
        acting_as="agent_id",
        audited=Audited("agent deregistered", lambda request, _: {"agent_id": request.agent_id}),
    ),
    f"/{_LIFECYCLE}/Heartbeat": _AGENT,
    f"/{_LIFECYCLE}/ReportState": _AGENT,
    f"/{_LIFECYCLE}/GetAgent": _AGENT,
    f"/{_LIFECYCLE}/ListAgents": _OPERATOR,
    f"/{_WORKFLOWS}/CreateWorkflowDefinition": Rule(
        Need.OPERATOR,
        audited=Audited(
            "definition created",
            lambda _, response: {
                "definition_id": response.definition.definition_id,
                "workflow_name": response.definition.workflow_name,
            },
        ),
    ),
    f"/{_WORKFLOWS}/GetWorkflowDefinition": _OPERATOR,
    f"/{_WORKFLOWS}/ListWorkflowDefinitions": _OPERATOR,
    f"/{_WORKFLOWS}/TriggerWorkflow": Rule(
        Need.OPERATOR,
        rate="trigger",
        audited=Audited(
            "run triggered",
            lambda _, response: {
                "run_id": response.run.run_id,
                "definition_id": response.run.definition_id,
                "pinned_agent_id": response.run.agent_id,
            },
        ),
    ),
    f"/{_WORKFLOWS}/GetWorkflowRun": _OPERATOR,
    f"/{_WORKFLOWS}/ListWorkflowRuns": _OPERATOR,
    f"/{_WORKFLOWS}/ListWorkflowRunTasks": _OPERATOR,
    f"/{_WORKFLOWS}/CancelWorkflowRun": Rule(
        Need.OPERATOR,
        audited=Audited("run cancelled", lambda request, _: {"run_id": request.run_id}),
    ),
    f"/{_WORKFLOWS}/WatchWorkflowRun": _OPERATOR,
    f"/{_WORKFLOWS}/StreamTasks": _AGENT,
    f"/{_WORKFLOWS}/CompleteTask": _AGENT,
    f"/{_WORKFLOWS}/FailTask": _AGENT,
    f"/{_WORKFLOWS}/ExtendTaskLease": _AGENT,
    # Open, so that load balancers probe and grpcurl discovers the API without credentials.
    f"/{health.SERVICE_NAME}/Check": Rule(Need.NOTHING),
    f"/{health.SERVICE_NAME}/Watch": Rule(Need.NOTHING),
    f"/{health.SERVICE_NAME}/List": Rule(Need.NOTHING),
    f"/{reflection.SERVICE_NAME}/ServerReflectionInfo": Rule(Need.NOTHING),
}
"""Every method the server offers, and what it needs of its caller."""

_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("opscore_caller")


def current_caller() -> Caller:
    """The caller of the call being handled (set before its servicer runs)."""
    return _CALLER.get()


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the server takes at once, and how fast one caller may call."""

    streams: Slots
    """Server-streaming calls open at once."""
    calls: Slots
    """Unary calls in flight at once."""
    rates: Mapping[str, RateLimiter]
    """Each per-caller rate by name (see `Rule.rate`)."""
    retry_after: timedelta = timedelta(seconds=1)
    """What a refusal for capacity advises waiting."""


def bearer_token(metadata: Any) -> str | None:
    """The token of the call's `authorization: Bearer <token>` metadata; None without one."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("the call carries more than one authorization header")
    scheme, _, token = str(values[0]).partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
    return token


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler with its rule: identify the caller, authorize, take its
    rate and a slot of capacity, run, and write the audit line of an operator action."""

    def __init__(self, authority: Authority, capacity: Capacity) -> None:
        self._authority = authority
        self._capacity = capacity
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Return the method's handler wrapped with its rule (the same wrapper every call)."""
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        rule = RULES.get(method)
        if rule is None:  # a method nobody decided on is closed
            rule = Rule(Need.OPERATOR)
            log.error("a method has no access rule: operators only", extra={"method": method})
        wrapped = self._wrap(handler, rule)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, handler: Any, rule: Rule) -> grpc.RpcMethodHandler[Any, Any]:
        wrapped: grpc.RpcMethodHandler[Any, Any] = handler
        if handler.unary_unary is not None:
            wrapped = handler._replace(unary_unary=self._unary(handler.unary_unary, rule))
        elif handler.unary_stream is not None:
            streaming = handler.unary_stream
            shape = self._stream if inspect.isasyncgenfunction(streaming) else self._counted_writer
            wrapped = handler._replace(unary_stream=shape(streaming, rule))
        # Reflection's bidirectional stream stays as it is: it is open to everyone.
        return wrapped

    def _admit(self, request: Any, context: grpc.aio.ServicerContext[Any, Any], rule: Rule) -> None:
        """Identify and authorize the caller, and take its rate: or raise the refusal."""
        if rule.need is Need.NOTHING:
            return
        caller = self._authority.identify(
            bearer_token(context.invocation_metadata()),
            functools.partial(peer_certificate, context),
            functools.partial(peer_host, context),
        )
        authorize(caller, rule.need, getattr(request, rule.acting_as, "") if rule.acting_as else "")
        if rule.rate:
            wait = self._capacity.rates[rule.rate].take(caller.name)
            if wait is not None:
                raise RateLimited(f"{caller.name} calls this faster than its rate allows", wait)
        _CALLER.set(caller)

    def _audit(self, rule: Rule, request: Any, response: Any) -> None:
        if rule.audited is not None:
            audit.info(
                rule.audited.action,
                extra={"caller": current_caller().name, **rule.audited.fields(request, response)},
            )

    def _slot(self, slots: Slots, what: str) -> None:
        if not slots.try_acquire():
            raise Overloaded(
                f"the server already has as many {what} as it is configured to",
                self._capacity.retry_after,
            )

    def _unary(self, behavior: Callable[..., Any], rule: Rule) -> Callable[..., Any]:
        calls = self._capacity.calls

        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._admit(request, context, rule)
            self._slot(calls, "calls in flight")
            try:
                response = await behavior(request, context)
            finally:
                calls.release()
            self._audit(rule, request, response)
            return response

        return admitted

    def _stream(self, behavior: Callable[..., Any], rule: Rule) -> Callable[..., Any]:
        streams = self._capacity.streams

        async def admitted(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            self._admit(request, context, rule)
            self._slot(streams, "streams open")
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                streams.release()

        return admitted

    def _counted_writer(self, behavior: Callable[..., Any], rule: Rule) -> Callable[..., Any]:
        """A stream whose behaviour writes with `context.write` (StreamTasks, health's Watch)."""
        streams = self._capacity.streams

        async def admitted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._admit(request, context, rule)
            self._slot(streams, "streams open")
            try:
                return await behavior(request, context)
            finally:
                streams.release()

        return admitted
