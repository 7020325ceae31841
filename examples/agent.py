"""An Ops-Core agent built on the SDK (docs/sdk.md): it offers the capability `summarize`.

    make serve                       # in one terminal
    .venv/bin/python examples/agent.py   # in another; then trigger the README's walk-through

OPSCORE_ADDRESS (comma-separated, default localhost:50051), OPSCORE_AGENT_ID and OPSCORE_TOKEN
(a registration or operator token, for servers that require one) configure it. SIGTERM or
Ctrl-C drains it: it finishes what it holds, deregisters, and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from opscore.client import NonRetryable, TaskContext, Worker

worker = Worker(
    os.environ.get("OPSCORE_ADDRESS", "localhost:50051").split(","),
    agent_id=os.environ.get("OPSCORE_AGENT_ID", "summarizer-1"),
    token=os.environ.get("OPSCORE_TOKEN"),
    max_concurrent_tasks=4,
)


@worker.task("summarize")
async def summarize(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
    """The first `max_words` words of the input's `text` or `url`, and of what the tasks this
    one depends on returned."""
    earlier = [output.get("summary") for output in ctx.dependency_outputs.values()]
    text = " ".join(
        str(part) for part in [task_input.get("text"), task_input.get("url"), *earlier] if part
    )
    if not text:
        raise NonRetryable("nothing to summarize: the input has no 'text'")
    words = text.split()
    return {"summary": " ".join(words[: int(task_input.get("max_words", 50))]), "words": len(words)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(worker.run())
