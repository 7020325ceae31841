"""Sending hostile requests and running the property: the Hypothesis settings, `send` (one
request over gRPC's synchronous client, StreamTasks included) and `run_property` (every example
for one RPC, sent and judged, in a worker thread while the event loop serves).
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import auth
import grpc
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_lifecycle_pb2_grpc,
    workflow_service_pb2_grpc,
)

from hostile.contract import Code
from hostile.oracle import judge, problems
from hostile.world import World, resolve
from opscore.domain.validation import Limits

EXAMPLES = 75
"""Examples per RPC (the whole module stays well under a minute)."""

CALL_TIMEOUT = 30.0
"""Seconds a unary call may take: a server that hangs fails the property with DEADLINE_EXCEEDED."""


HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


STREAMS = ("StreamTasks", "WatchWorkflowRun")
"""The server-streaming RPCs."""


def send(
    channel: grpc.Channel, rpc: str, request: Message, limits: Limits
) -> tuple[grpc.StatusCode, Any]:
    """Send one request; returns its status and the error (None when OK). A stream (StreamTasks,
    WatchWorkflowRun) counts as OK once the server has accepted it (it sends its headers then),
    unless the contract refuses the request: then its status is awaited, so a late refusal is
    never taken for an accepted stream, nor an accepted one for a refusal."""
    method = rpc.split("[", maxsplit=1)[0]
    if method in agent_lifecycle_pb2.DESCRIPTOR.services_by_name["AgentLifecycle"].methods_by_name:
        stub: Any = agent_lifecycle_pb2_grpc.AgentLifecycleStub(channel)
    else:
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
    try:
        if method in STREAMS:
            call = getattr(stub, method)(request, timeout=CALL_TIMEOUT)
            refusal_due = bool(problems(request, limits))
            if not refusal_due:
                call.initial_metadata()  # accepted (headers) or refused (a status alone)
            if refusal_due or call.done():
                with contextlib.suppress(StopIteration):
                    next(call)  # the refusal, or a first task
            call.cancel()
        else:
            getattr(stub, method)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as raised:
        error = cast(grpc.Call, raised)
        return error.code(), error
    return Code.OK, None


def run_property(
    port: int, strategy: st.SearchStrategy[Any], world: World, limits: Limits, rpc: str
) -> None:
    """Run the Hypothesis property for one RPC over a synchronous channel (in a worker thread)."""
    with auth.sync_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
    ) as channel:

        @HYPOTHESIS
        @given(request=strategy)
        def answers_are_sound(request: Message) -> None:
            request = resolve(request, world)
            code, error = send(channel, rpc, request, limits)
            judge(rpc, request, code, error, limits)

        answers_are_sound()
