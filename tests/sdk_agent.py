"""Agents built on the SDK, run as a process of their own by tests/e2e/test_sdk_worker.py to
see how they drain on SIGTERM:

    python tests/sdk_agent.py ADDRESS AGENT_ID[,AGENT_ID...] TOKEN MARKER

One Worker per agent id, all on one event loop. Each one's handler, for capability `slow`,
writes the task's id to the file MARKER as it starts, then sleeps for the input's `seconds` and
returns them.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from opscore.client import TaskContext, Worker


def worker(address: str, agent_id: str, token: str, marker: str) -> Worker:
    made = Worker(address, agent_id=agent_id, token=token, drain_timeout=10.0)

    @made.task("slow")
    async def slow(ctx: TaskContext, task_input: dict[str, Any]) -> dict[str, Any]:
        Path(marker).write_text(ctx.task_id)  # noqa: ASYNC240 - a few bytes, once
        await asyncio.sleep(float(task_input["seconds"]))
        return {"slept": task_input["seconds"]}

    return made


async def serve(workers: list[Worker]) -> None:
    await asyncio.gather(*(each.run() for each in workers))


def main(address: str, agent_ids: str, token: str, marker: str) -> None:
    asyncio.run(serve([worker(address, each, token, marker) for each in agent_ids.split(",")]))


if __name__ == "__main__":
    main(*sys.argv[1:5])
