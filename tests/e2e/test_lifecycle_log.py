"""The lifecycle events a run leaves in the log, in the order they happened, with the ids that
tie them to it."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from conftest import ServerFactory, serve
from helpers import definition, task
from opscore.v1 import workflow_pb2


def _record(caplog: pytest.LogCaptureFixture, event: str) -> Any:
    """The one `event` record (written by its commit's callbacks, before anyone is answered)."""
    [record] = [record for record in caplog.records if record.getMessage() == event]
    return record


async def test_a_run_logs_its_start_failure_cancellation_and_end(
    start_server: ServerFactory, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.engine")
    async with serve(start_server, sqlite_url) as client:
        one = await client.agent("logged-1", capabilities=["work"])
        two = await client.agent("logged-2", capabilities=["work"])
        created = await client.create(
            definition("logged", task("a", capability="work"), task("b", capability="work"))
        )
        run = await client.trigger(definition_id=created.definition_id)
        first, second = await one.next_assignment(), await two.next_assignment()
        await one.fail(first, "broken", retryable=False)
        await client.wait_run(run.run_id, workflow_pb2.RUN_STATE_FAILED)

    started = _record(caplog, "run started")
    failed = _record(caplog, "task failed")
    cancelled = _record(caplog, "task attempt cancelled")
    finished = _record(caplog, "run finished")
    assert (started.run_id, started.workflow) == (run.run_id, "logged")
    assert (failed.task_id, failed.error, failed.retryable) == (first.task_id, "broken", False)
    assert (cancelled.task_id, cancelled.agent_id) == (second.task_id, "logged-2")
    assert (finished.run_id, finished.state) == (run.run_id, "failed")
    order = [caplog.records.index(r) for r in (started, failed, cancelled, finished)]
    assert order == sorted(order)
