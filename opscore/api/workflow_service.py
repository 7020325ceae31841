"""The WorkflowService: decode, call the engine, encode."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # untyped

from opscore.api import convert
from opscore.api.access import current_caller
from opscore.domain.engine import Engine
from opscore.domain.models import RunFilter, TriggerRequest, WorkflowRun
from opscore.v1 import workflow_pb2, workflow_service_pb2_grpc
from opscore.v1 import workflow_service_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]

_WriteFailed: type[Exception] = cygrpc.ExecuteBatchError
"""What a write raises when the call has broken under it (grpc.aio has no public name for it)."""


class WorkflowServiceServicer(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """Definitions, runs, and the agents' task streams and results."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _whole_run(self, run: WorkflowRun) -> workflow_pb2.WorkflowRun:
        """A run read whole on the wire; cut by the engine only when its message is too large,
        so the common small run is encoded once and never measured item by item."""
        message = convert.run(run)
        if message.ByteSize() > self._engine.response_bytes:
            message = convert.run(self._engine.fit_run(run))
        return message

    async def CreateWorkflowDefinition(  # noqa: N802 - gRPC method names are the contract's
        self, request: pb.CreateWorkflowDefinitionRequest, context: Context
    ) -> pb.CreateWorkflowDefinitionResponse:
        draft = convert.definition_in(request.definition, "definition.")
        definition = await self._engine.create_definition(draft, request.request_id)
        return pb.CreateWorkflowDefinitionResponse(definition=convert.definition(definition))

    async def GetWorkflowDefinition(  # noqa: N802
        self, request: pb.GetWorkflowDefinitionRequest, context: Context
    ) -> pb.GetWorkflowDefinitionResponse:
        definition = await self._engine.get_definition(request.definition_id)
        return pb.GetWorkflowDefinitionResponse(definition=convert.definition(definition))

    async def ListWorkflowDefinitions(  # noqa: N802
        self, request: pb.ListWorkflowDefinitionsRequest, context: Context
    ) -> pb.ListWorkflowDefinitionsResponse:
        page = await self._engine.list_definitions(
            request.page_size, request.page_token, request.workflow_name
        )
        return pb.ListWorkflowDefinitionsResponse(
            definitions=[convert.definition(item) for item in page.items],
            next_page_token=page.next_page_token,
        )

    async def TriggerWorkflow(  # noqa: N802
        self, request: pb.TriggerWorkflowRequest, context: Context
    ) -> pb.TriggerWorkflowResponse:
        run = await self._engine.trigger(
            TriggerRequest(
                definition_id=request.definition_id,
                workflow_name=request.workflow_name,
                definition=(
                    convert.definition_in(request.definition, "definition.")
                    if request.HasField("definition")
                    else None
                ),
                agent_id=request.agent_id,
                input=convert.json_object(request.input),
                request_id=request.request_id,
            )
        )
        return pb.TriggerWorkflowResponse(run=self._whole_run(run))

    async def GetWorkflowRun(  # noqa: N802
        self, request: pb.GetWorkflowRunRequest, context: Context
    ) -> pb.GetWorkflowRunResponse:
        run = await self._engine.get_run(request.run_id, convert.run_view_in(request.view, "view"))
        return pb.GetWorkflowRunResponse(run=convert.run(run))

    async def ListWorkflowRuns(  # noqa: N802
        self, request: pb.ListWorkflowRunsRequest, context: Context
    ) -> pb.ListWorkflowRunsResponse:
        page = await self._engine.list_runs(
            request.page_size,
            request.page_token,
            RunFilter(
                state=convert.run_state_in(request.state, "state"),
                definition_id=request.definition_id,
                agent_id=request.agent_id,
                workflow_name=request.workflow_name,
                created_after=convert.optional_timestamp_in(request, "created_after"),
                created_before=convert.optional_timestamp_in(request, "created_before"),
            ),
            request.order_by,
            convert.run_view_in(request.view, "view"),
        )
        return pb.ListWorkflowRunsResponse(
            runs=[convert.run(run) for run in page.items], next_page_token=page.next_page_token
        )

    async def ListWorkflowRunTasks(  # noqa: N802
        self, request: pb.ListWorkflowRunTasksRequest, context: Context
    ) -> pb.ListWorkflowRunTasksResponse:
        page = await self._engine.list_run_tasks(
            request.run_id, request.page_size, request.page_token
        )
        return pb.ListWorkflowRunTasksResponse(
            tasks=[convert.task_run(task) for task in page.items],
            next_page_token=page.next_page_token,
        )

    async def CancelWorkflowRun(  # noqa: N802
        self, request: pb.CancelWorkflowRunRequest, context: Context
    ) -> pb.CancelWorkflowRunResponse:
        run = await self._engine.cancel_run(request.run_id)
        return pb.CancelWorkflowRunResponse(run=self._whole_run(run))

    async def StreamTasks(  # type: ignore[override]  # noqa: N802 - writes, see below
        self, request: pb.StreamTasksRequest, context: Context
    ) -> None:
        stream = await self._engine.open_stream(request.agent_id, current_caller().token_digest)
        # Headers now, not with the first task: the client learns at once that its stream is
        # open (a refusal is a status without headers), rather than from the absence of one.
        await context.send_initial_metadata(())
        # The client going away cancels this handler; closing on "done" as well makes sure the
        # loop below ends even if the cancellation lands between two events.
        # (The stubs type the callback as a class rather than a callable protocol.)
        context.add_done_callback(lambda _context: stream.close())  # type: ignore[arg-type]
        try:
            async for message in stream.messages():
                # Written here rather than yielded: a write that fails because the client has
                # gone (its window was full, and then it closed) is caught here, instead of
                # gRPC logging it as an error of this handler.
                try:
                    await context.write(message)
                except _WriteFailed:
                    # The call is over (the client is gone): end as gRPC ends a handler whose
                    # client cancelled, quietly.
                    raise asyncio.CancelledError from None
        finally:
            await self._engine.close_stream(stream)

    async def WatchWorkflowRun(  # type: ignore[override]  # noqa: N802 - writes, see StreamTasks
        self, request: pb.WatchWorkflowRunRequest, context: Context
    ) -> None:
        async for run, changed in self._engine.watch_run(request.run_id):
            response = pb.WatchWorkflowRunResponse(
                run=convert.run(run), changed_tasks=map(convert.task_run, changed)
            )
            try:
                await context.write(response)
            except _WriteFailed:
                raise asyncio.CancelledError from None

    async def CompleteTask(  # noqa: N802
        self, request: pb.CompleteTaskRequest, context: Context
    ) -> pb.CompleteTaskResponse:
        await self._engine.complete_task(
            request.task_id, request.agent_id, request.attempt, convert.json_object(request.output)
        )
        return pb.CompleteTaskResponse()

    async def ExtendTaskLease(  # noqa: N802
        self, request: pb.ExtendTaskLeaseRequest, context: Context
    ) -> pb.ExtendTaskLeaseResponse:
        extend_by = (
            convert.duration(request.extend_by, "extend_by")
            if request.HasField("extend_by")
            else None
        )
        deadline = await self._engine.extend_lease(
            request.task_id, request.agent_id, request.attempt, extend_by
        )
        return pb.ExtendTaskLeaseResponse(deadline=convert.timestamp(deadline))

    async def FailTask(  # noqa: N802
        self, request: pb.FailTaskRequest, context: Context
    ) -> pb.FailTaskResponse:
        await self._engine.fail_task(
            request.task_id, request.agent_id, request.attempt, request.error, request.retryable
        )
        return pb.FailTaskResponse()
