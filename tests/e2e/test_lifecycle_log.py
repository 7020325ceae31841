"""The lifecycle events a run leaves in the log, in the order they happened, with the ids that
tie them to it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from conftest import ServerFactory, serve
from helpers import definition, task
from opscore.v1 import workflow_pb2

from opscore.domain.models import (
    AgentRegistration,
    DefinitionDraft,
    TaskSpec,
    TriggerRequest,
)


def _record(caplog: pytest.LogCaptureFixture, event: str) -> Any:
    """The one `event` record (written two turns of the loop after its commit's callbacks)."""
    [record] = [record for record in caplog.records if record.getMessage() == event]
    return record


async def test_a_run_logs_its_start_failure_cancellation_and_end(
    start_server: ServerFactory, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="opscore.engine")
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
    # A run's start is one event per trigger, like the per-task events; its end says how it went.
    levels = [r.levelname for r in (started, failed, cancelled, finished)]
    assert levels == ["DEBUG", "INFO", "INFO", "INFO"]


async def test_a_runs_first_assignment_is_on_its_stream_before_its_start_is_logged(
    start_server: ServerFactory, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Records written from a commit's callbacks wait two turns of the loop, so the stream sends
    those callbacks release go first: no assignment waits for a log record."""
    caplog.set_level(logging.DEBUG, logger="opscore.engine")
    async with start_server(sqlite_url) as server:
        engine = server.engine
        assert engine is not None
        await engine.register_agent(AgentRegistration("w", capabilities=("work",)))
        events = (await engine.open_stream("w")).messages()
        draft = DefinitionDraft("logged", tasks=(TaskSpec("a", capability="work"),))
        run = await engine.trigger(TriggerRequest(definition=draft))
        # Answered right after its commit's callbacks: the assignment is on the stream already.
        pushed = await anext(events)
        assert pushed.assignment.run_id == run.run_id
        assert not [record for record in caplog.records if record.getMessage() == "run started"]
        for _ in range(2):
            await asyncio.sleep(0)
        assert _record(caplog, "run started").run_id == run.run_id
