"""Waiting reasons are worked out after a response is cut, so the cut makes room for them: no
reason may be longer on the wire than the room `reason_room` kept for it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from opscore.api.convert import WireSizes
from opscore.domain.models import Agent, ReportedState, TaskRun, TaskState
from opscore.domain.waiting import Candidates, Offer, WithReasons, reason_room, waiting_reason

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=200)


def _agent(agent_id: str, state: ReportedState, connected: bool) -> Agent:
    return Agent(agent_id, "a", "1", (), {}, 1, state, "", connected, 0, NOW, NOW)


@given(
    capability=text,
    labels=st.dictionaries(text, text, max_size=5),
    pinned=text,
    backoff=st.booleans(),
    registered=st.booleans(),
    connected=st.booleans(),
    free=st.booleans(),
    pinned_state=st.sampled_from(list(ReportedState)),
    pinned_connected=st.booleans(),
)
def test_no_reason_outgrows_the_room_kept_for_it(
    capability: str,
    labels: dict[str, str],
    pinned: str,
    backoff: bool,
    registered: bool,
    connected: bool,
    free: bool,
    pinned_state: ReportedState,
    pinned_connected: bool,
) -> None:
    task = TaskRun(
        "t-1",
        "r-1",
        "t",
        0,
        TaskState.QUEUED,
        1,
        "",
        None,
        "",
        NOW,
        None,
        None,
        None,
        capability=capability,
        labels=labels,
        pinned_agent_id=pinned,
        not_before=NOW + timedelta(seconds=3) if backoff else None,
    )
    agent = _agent(pinned, pinned_state, pinned_connected) if pinned else None
    candidates = Candidates(Offer(registered, connected), free, agent)
    reason = waiting_reason(task, NOW, candidates)
    assert reason
    sizes = WireSizes()
    bare = sizes.task(task)
    explained = sizes.task(dataclasses.replace(task, waiting_reason=reason))
    assert explained - bare <= reason_room(task)
    assert WithReasons(sizes).task(task) >= explained


def test_only_queued_tasks_get_room() -> None:
    done = TaskRun(
        "t-1",
        "r-1",
        "t",
        0,
        TaskState.SUCCEEDED,
        1,
        "a",
        {},
        "",
        NOW,
        NOW,
        NOW,
        None,
        capability="gpu",
    )
    assert reason_room(done) == 0
    assert WithReasons(WireSizes()).task(done) == WireSizes().task(done)
