"""The AgentLifecycle service: decode, call the engine, encode."""

from __future__ import annotations

from typing import Any

import grpc

from opscore.api import convert
from opscore.domain.engine import Engine
from opscore.domain.models import AgentRegistration
from opscore.v1 import agent_lifecycle_pb2 as pb
from opscore.v1 import agent_lifecycle_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AgentLifecycleServicer(agent_lifecycle_pb2_grpc.AgentLifecycleServicer):
    """Agents join, report and leave; operators look at them."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def RegisterAgent(  # noqa: N802 - gRPC method names are the contract's
        self, request: pb.RegisterAgentRequest, context: Context
    ) -> pb.RegisterAgentResponse:
        agent, token = await self._engine.register_agent(
            AgentRegistration(
                agent_id=request.agent_id,
                name=request.name,
                version=request.version,
                capabilities=tuple(request.capabilities),
                labels=dict(request.labels),
                max_concurrent_tasks=request.max_concurrent_tasks,
            )
        )
        return pb.RegisterAgentResponse(agent=convert.agent(agent), agent_token=token)

    async def DeregisterAgent(  # noqa: N802
        self, request: pb.DeregisterAgentRequest, context: Context
    ) -> pb.DeregisterAgentResponse:
        await self._engine.deregister_agent(request.agent_id)
        return pb.DeregisterAgentResponse()

    async def Heartbeat(  # noqa: N802
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        now = await self._engine.heartbeat(request.agent_id)
        return pb.HeartbeatResponse(server_time=convert.timestamp(now))

    async def ReportState(  # noqa: N802
        self, request: pb.ReportStateRequest, context: Context
    ) -> pb.ReportStateResponse:
        state = convert.reported_state_in(request.state, "state")
        agent = await self._engine.report_state(request.agent_id, state, request.detail)
        return pb.ReportStateResponse(agent=convert.agent(agent))

    async def GetAgent(  # noqa: N802
        self, request: pb.GetAgentRequest, context: Context
    ) -> pb.GetAgentResponse:
        agent = await self._engine.get_agent(request.agent_id)
        return pb.GetAgentResponse(agent=convert.agent(agent))

    async def ListAgents(  # noqa: N802
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        page = await self._engine.list_agents(
            request.page_size,
            request.page_token,
            convert.agent_state_in(request.state, "state"),
            request.capability,
        )
        return pb.ListAgentsResponse(
            agents=[convert.agent(agent) for agent in page.items],
            next_page_token=page.next_page_token,
        )
