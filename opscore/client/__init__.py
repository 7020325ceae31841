"""Ops-Core's Python SDK. The agent side: a `Worker` registers, holds its task stream, runs
handlers and reports their results. The operator side: a `Client` creates definitions,
triggers, watches and cancels runs, and reads agents. See docs/sdk.md.

    worker = Worker("localhost:50051", agent_id="summarizer-1")

    @worker.task("summarize")
    async def summarize(ctx: TaskContext, input: dict) -> dict:
        return {"summary": input["text"][:100]}

    asyncio.run(worker.run())

    async with Client("localhost:50051", token=OPERATOR_TOKEN) as client:
        run = await client.trigger("summarize-url", input={"text": "..."})
        async for update in client.watch(run.run_id):
            print(update.run.state)
"""

from opscore.client._backoff import Backoff
from opscore.client._channels import Tls
from opscore.client._client import Client, Definition, Page, RunUpdate
from opscore.client._context import JsonObject, TaskContext
from opscore.client._errors import AttemptLost, NonRetryable, Unreachable
from opscore.client._refusals import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    OpsCoreError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from opscore.client._structs import to_dict
from opscore.client._worker import AsyncHandler, Handler, SyncHandler, Worker

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncHandler",
    "AttemptLost",
    "Backoff",
    "Client",
    "DeadlineExceeded",
    "Definition",
    "FailedPrecondition",
    "FieldViolation",
    "Handler",
    "Internal",
    "InvalidArgument",
    "JsonObject",
    "NonRetryable",
    "NotFound",
    "OpsCoreError",
    "Page",
    "PermissionDenied",
    "ResourceExhausted",
    "RunUpdate",
    "SyncHandler",
    "TaskContext",
    "Tls",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unreachable",
    "Worker",
    "to_dict",
]
