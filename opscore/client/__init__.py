"""The agent side of Ops-Core: a `Worker` registers, holds its task stream, runs handlers and
reports their results. See docs/sdk.md.

    worker = Worker("localhost:50051", agent_id="summarizer-1")

    @worker.task("summarize")
    async def summarize(ctx: TaskContext, input: dict) -> dict:
        return {"summary": input["text"][:100]}

    asyncio.run(worker.run())
"""

from opscore.client._backoff import Backoff
from opscore.client._channels import Tls
from opscore.client._context import JsonObject, TaskContext
from opscore.client._errors import AttemptLost, NonRetryable, Unreachable
from opscore.client._worker import AsyncHandler, Handler, SyncHandler, Worker

__all__ = [
    "AsyncHandler",
    "AttemptLost",
    "Backoff",
    "Handler",
    "JsonObject",
    "NonRetryable",
    "SyncHandler",
    "TaskContext",
    "Tls",
    "Unreachable",
    "Worker",
]
