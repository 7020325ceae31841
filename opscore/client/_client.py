"""`Client`: the operator's side of Ops-Core. It creates and reads workflow definitions,
triggers runs, reads, watches and cancels them, and reads the agents, over a list of
addresses; every refusal is raised as an `OpsCoreError` (see `_refusals`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from opscore.client._backoff import Backoff
from opscore.client._channels import Channels, Stubs, Tls, bearer
from opscore.client._refusals import refusal
from opscore.client._structs import NOT_A_STRUCT, to_struct
from opscore.v1 import (
    agent_lifecycle_pb2,
    agent_pb2,
    workflow_pb2,
    workflow_service_pb2,
)

T = TypeVar("T")

CALL_TIMEOUT = 10.0
"""Seconds each unary call may take by default."""

WATCH_REOPENINGS = 10
"""Times in a row a watch that lost its server is opened again before it gives up."""

WATCH_BACKOFF = Backoff(initial=0.1, maximum=2.0)
"""The waits between those reopenings: 6-11 s in all, longer than a server takes to restart."""

FINAL_RUN_STATES = frozenset(
    {
        workflow_pb2.RUN_STATE_SUCCEEDED,
        workflow_pb2.RUN_STATE_FAILED,
        workflow_pb2.RUN_STATE_CANCELLED,
    }
)
"""The states a run never leaves."""

Definition = workflow_pb2.WorkflowDefinition | Mapping[str, Any]
"""A workflow definition: the message, or a dict in its protobuf JSON form (the field names of
the protos, or their lowerCamelCase JSON names; durations as `"60s"`)."""


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing: its items, and the token of the next page (empty on the last)."""

    items: list[T]
    next_page_token: str


@dataclass(frozen=True)
class RunUpdate:
    """One response of a watch. `run` is the run as of this change with every task (the
    watch's responses after the first carry only the tasks that changed; the client keeps the
    others); `changed` are the tasks this change moved (every task, in the first update)."""

    run: workflow_pb2.WorkflowRun
    changed: list[workflow_pb2.TaskRun]

    @property
    def final(self) -> bool:
        """Whether the run is over: the watch ends with this update."""
        return self.run.state in FINAL_RUN_STATES


def definition_message(definition: Definition) -> workflow_pb2.WorkflowDefinition:
    """The definition as a message; ValueError for a dict that is not one."""
    if isinstance(definition, workflow_pb2.WorkflowDefinition):
        return definition
    try:
        return json_format.ParseDict(dict(definition), workflow_pb2.WorkflowDefinition())
    except json_format.ParseError as error:
        raise ValueError(f"not a workflow definition: {error}") from error


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def is_definition_id(source: str) -> bool:
    """Whether `source` is a definition id (a UUID, as the server assigns) rather than a
    workflow name."""
    try:
        uuid.UUID(source)
    except ValueError:
        return False
    return True


class Client:
    """A connection to Ops-Core for an operator: definitions, runs and agents.

        async with Client(["host1:50051", "host2:50051"], token=OPERATOR_TOKEN) as client:
            run = await client.trigger("summarize-url", input={"url": "https://example.com"})
            async for update in client.watch(run.run_id):
                print(update.run.state)

    `addresses` are the servers (replicas) to use: calls go to one, and move on to the next
    when it does not answer (`UNAVAILABLE`), each address tried once per call. `token` is the
    operator token, sent as `authorization: Bearer <token>` (None with authentication off, or
    under mutual TLS with a certificate naming an operator); `tls` the certificate files, as
    the `Worker` takes them (plaintext without). `timeout` bounds each unary call, in seconds.

    Methods return the messages of `opscore.v1` and take inputs as dicts; `to_dict` turns a
    message's `Struct` (a run's input, a task's output) into one. A refusal is raised as the
    `OpsCoreError` of its code, with the server's `ErrorInfo`.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        token: str | None = None,
        tls: Tls | None = None,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        self._channels = Channels([addresses] if isinstance(addresses, str) else addresses, tls)
        self._metadata = bearer(token)
        self._timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels (a watch still open ends)."""
        await self._channels.close()

    # Definitions ---------------------------------------------------------------------------

    async def create_definition(
        self, definition: Definition, *, request_id: str | None = None
    ) -> workflow_pb2.WorkflowDefinition:
        """Create a definition: version 1 of a new workflow name, or its next version. The
        `request_id` (a new one if None) makes the call safe to repeat."""
        request = workflow_service_pb2.CreateWorkflowDefinitionRequest(
            definition=definition_message(definition), request_id=request_id or _new_request_id()
        )
        response = await self._unary(
            lambda stubs: stubs.workflows.CreateWorkflowDefinition(request, **self._options())
        )
        return response.definition

    async def get_definition(self, definition_id: str) -> workflow_pb2.WorkflowDefinition:
        """One definition, by id."""
        request = workflow_service_pb2.GetWorkflowDefinitionRequest(definition_id=definition_id)
        response = await self._unary(
            lambda stubs: stubs.workflows.GetWorkflowDefinition(request, **self._options())
        )
        return response.definition

    async def list_definitions(
        self, *, workflow_name: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[workflow_pb2.WorkflowDefinition]:
        """One page of definitions, oldest first (of one workflow, if `workflow_name`)."""
        request = workflow_service_pb2.ListWorkflowDefinitionsRequest(
            workflow_name=workflow_name, page_size=page_size, page_token=page_token
        )
        response = await self._unary(
            lambda stubs: stubs.workflows.ListWorkflowDefinitions(request, **self._options())
        )
        return Page(list(response.definitions), response.next_page_token)

    # Runs ----------------------------------------------------------------------------------

    async def trigger(
        self,
        source: str | Definition,
        *,
        input: Mapping[str, Any] | None = None,  # noqa: A002 - the field's name
        agent_id: str = "",
        request_id: str | None = None,
    ) -> workflow_pb2.WorkflowRun:
        """Start a run of `source`: a definition id, a workflow name (its latest version runs),
        or a definition given inline (a message or a dict), which is not stored. `input` is laid
        over each task's own; `agent_id` pins every task to that agent. The `request_id` (a new
        one if None) makes the call safe to repeat. ValueError for an `input` that cannot be
        sent as a JSON object, or an inline definition that is not one."""
        try:
            request = workflow_service_pb2.TriggerWorkflowRequest(
                agent_id=agent_id,
                input=to_struct(input or {}),
                request_id=request_id or _new_request_id(),
            )
        except NOT_A_STRUCT as error:
            raise ValueError(f"the input cannot be sent as a JSON object: {error}") from error
        if not isinstance(source, str):
            request.definition.CopyFrom(definition_message(source))
        elif is_definition_id(source):
            request.definition_id = source
        else:
            request.workflow_name = source
        response = await self._unary(
            lambda stubs: stubs.workflows.TriggerWorkflow(request, **self._options())
        )
        return response.run

    async def get_run(
        self,
        run_id: str,
        *,
        view: workflow_pb2.WorkflowRunView.ValueType = workflow_pb2.WORKFLOW_RUN_VIEW_FULL,
    ) -> workflow_pb2.WorkflowRun:
        """One run: with its tasks (as many as fit; `next_task_page_token` continues) in the
        FULL view, without in the BASIC one."""
        request = workflow_service_pb2.GetWorkflowRunRequest(run_id=run_id, view=view)
        response = await self._unary(
            lambda stubs: stubs.workflows.GetWorkflowRun(request, **self._options())
        )
        return response.run

    async def list_runs(
        self,
        *,
        state: workflow_pb2.RunState.ValueType = workflow_pb2.RUN_STATE_UNSPECIFIED,
        definition_id: str = "",
        workflow_name: str = "",
        agent_id: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        order_by: str = "",
        view: workflow_pb2.WorkflowRunView.ValueType = workflow_pb2.WORKFLOW_RUN_VIEW_BASIC,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[workflow_pb2.WorkflowRun]:
        """One page of runs, newest first unless `order_by` is `"created_at"`; each filter
        given must match (docs/api.md, Listing runs)."""
        request = workflow_service_pb2.ListWorkflowRunsRequest(
            state=state,
            definition_id=definition_id,
            workflow_name=workflow_name,
            agent_id=agent_id,
            created_after=_timestamp(created_after),
            created_before=_timestamp(created_before),
            order_by=order_by,
            view=view,
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._unary(
            lambda stubs: stubs.workflows.ListWorkflowRuns(request, **self._options())
        )
        return Page(list(response.runs), response.next_page_token)

    async def list_run_tasks(
        self, run_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> Page[workflow_pb2.TaskRun]:
        """One page of a run's tasks, in the order of its definition, with their outputs."""
        request = workflow_service_pb2.ListWorkflowRunTasksRequest(
            run_id=run_id, page_size=page_size, page_token=page_token
        )
        response = await self._unary(
            lambda stubs: stubs.workflows.ListWorkflowRunTasks(request, **self._options())
        )
        return Page(list(response.tasks), response.next_page_token)

    async def cancel(self, run_id: str) -> workflow_pb2.WorkflowRun:
        """Cancel an unfinished run (`FailedPrecondition` for a finished one); the run after."""
        request = workflow_service_pb2.CancelWorkflowRunRequest(run_id=run_id)
        response = await self._unary(
            lambda stubs: stubs.workflows.CancelWorkflowRun(request, **self._options())
        )
        return response.run

    async def watch(self, run_id: str) -> AsyncIterator[RunUpdate]:
        """The run as it changes: first as it is, then at each change, until it is final
        (the iteration then ends, with one update for the whole of the change that made it
        final). A watch that cannot be opened moves on to the next address, each address
        once. A watch that was open and lost its server is opened again, on the next address
        after a backoff, up to `WATCH_REOPENINGS` times in a row (so it outlives a server's
        restart), starting again from the run as it is."""
        request = workflow_service_pb2.WatchWorkflowRunRequest(run_id=run_id)
        failures = 0
        opened = False
        while True:
            call = self._channels.current().workflows.WatchWorkflowRun(
                request, metadata=self._metadata
            )
            tasks: dict[str, workflow_pb2.TaskRun] | None = None
            ending: _Ending | None = None
            try:
                async for response in call:
                    failures, opened = 0, True
                    if tasks is None:
                        tasks = {each.task_id: each for each in await self.all_tasks(response.run)}
                        changed = list(tasks.values())
                    else:
                        changed = list(response.changed_tasks)
                        tasks.update((each.task_id, each) for each in changed)
                    if response.run.state in FINAL_RUN_STATES:
                        # A change too large for one response comes in parts, each carrying
                        # the final run; the stream ends after the last of them.
                        if ending is None:
                            ending = _Ending(response.run)
                        ending.take(response.run, changed)
                        continue
                    yield RunUpdate(with_tasks(response.run, tasks.values()), changed)
            except grpc.aio.AioRpcError as error:
                if ending is None:
                    failures += 1
                    if error.code() != grpc.StatusCode.UNAVAILABLE or failures >= (
                        WATCH_REOPENINGS if opened else len(self._channels.addresses)
                    ):
                        raise refusal(error) from error
                    self._channels.advance()
                    if opened:
                        await asyncio.sleep(WATCH_BACKOFF.delay(failures))
                    continue
            finally:
                call.cancel()
            if ending is not None and tasks is not None:
                yield RunUpdate(with_tasks(ending.run, tasks.values()), ending.changed())
            return

    async def all_tasks(self, run: workflow_pb2.WorkflowRun) -> list[workflow_pb2.TaskRun]:
        """All the tasks of a run read in the FULL view: its own, and those that did not fit
        its message (from its `next_task_page_token` on), paged in."""
        tasks = list(run.tasks)
        token = run.next_task_page_token
        while token:
            page = await self.list_run_tasks(run.run_id, page_token=token)
            tasks.extend(page.items)
            token = page.next_page_token
        return tasks

    # Agents --------------------------------------------------------------------------------

    async def get_agent(self, agent_id: str) -> agent_pb2.Agent:
        """One agent, by id."""
        request = agent_lifecycle_pb2.GetAgentRequest(agent_id=agent_id)
        response = await self._unary(
            lambda stubs: stubs.lifecycle.GetAgent(request, **self._options())
        )
        return response.agent

    async def list_agents(
        self,
        *,
        state: agent_pb2.AgentState.ValueType = agent_pb2.AGENT_STATE_UNSPECIFIED,
        capability: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[agent_pb2.Agent]:
        """One page of agents, in agent_id order (in `state`, offering `capability`, if given)."""
        request = agent_lifecycle_pb2.ListAgentsRequest(
            state=state, capability=capability, page_size=page_size, page_token=page_token
        )
        response = await self._unary(
            lambda stubs: stubs.lifecycle.ListAgents(request, **self._options())
        )
        return Page(list(response.agents), response.next_page_token)

    # Calls ---------------------------------------------------------------------------------

    def _options(self) -> dict[str, Any]:
        return {"metadata": self._metadata, "timeout": self._timeout}

    async def _unary(self, call: Callable[[Stubs], Awaitable[T]]) -> T:
        """`call` on the address in use, then on the next ones while none answers; its
        refusal raised as an `OpsCoreError`. Creates and triggers carry a `request_id`, so
        sending one again to another replica is safe."""
        failures = 0
        while True:
            try:
                return await call(self._channels.current())
            except grpc.aio.AioRpcError as error:
                failures += 1
                if error.code() != grpc.StatusCode.UNAVAILABLE or failures >= len(
                    self._channels.addresses
                ):
                    raise refusal(error) from error
                self._channels.advance()


class _Ending:
    """The change that made a watched run final, gathered from its parts."""

    def __init__(self, run: workflow_pb2.WorkflowRun) -> None:
        self.run = run
        self._changed: dict[str, workflow_pb2.TaskRun] = {}

    def take(self, run: workflow_pb2.WorkflowRun, changed: Iterable[workflow_pb2.TaskRun]) -> None:
        """One more part: the run as of it, and the tasks it carries."""
        self.run = run
        self._changed.update((each.task_id, each) for each in changed)

    def changed(self) -> list[workflow_pb2.TaskRun]:
        """The tasks of every part, each once."""
        return list(self._changed.values())


def with_tasks(
    run: workflow_pb2.WorkflowRun, tasks: Iterable[workflow_pb2.TaskRun]
) -> workflow_pb2.WorkflowRun:
    """A copy of `run` holding `tasks` (in their order) instead of its own."""
    merged = workflow_pb2.WorkflowRun()
    merged.CopyFrom(run)
    del merged.tasks[:]
    merged.tasks.extend(tasks)
    merged.next_task_page_token = ""
    return merged


def _new_request_id() -> str:
    return str(uuid.uuid4())
