"""The agent SDK's pure logic: the backoff's bounds, attempts taken once by their identity,
and when a lease is extended (on a virtual clock); and its public surface."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from opscore.v1 import workflow_pb2

import opscore.client
from opscore.client import AttemptLost, Backoff, Unreachable
from opscore.client._attempts import Attempts
from opscore.client._calls import assignment_in
from opscore.client._lease import Lease, renewal_due
from opscore.domain.clock import VirtualClock

START = datetime(2026, 12, 1, tzinfo=UTC)
FAST = Backoff(initial=0.5, maximum=2.0)


def test_the_backoff_grows_to_its_maximum_with_equal_jitter() -> None:
    backoff = Backoff(initial=0.1, multiplier=2.0, maximum=1.0)
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4, 5, 10_000)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.delay(3, lambda: 0.0) == pytest.approx(0.2)
    assert backoff.delay(3, lambda: 0.999) == pytest.approx(0.4, abs=1e-3)
    assert all(0.5 <= backoff.delay(50) <= 1.0 for _ in range(100))


@pytest.mark.parametrize(
    "fields", [{"initial": 0}, {"multiplier": 0.5}, {"initial": 2.0, "maximum": 1.0}]
)
def test_a_backoff_that_would_not_back_off_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**fields)


def test_an_attempt_is_taken_once_even_after_it_finished() -> None:
    attempts: Attempts[str] = Attempts(remembered=2)
    assert attempts.take(("t1", 1), "first")
    assert not attempts.take(("t1", 1), "again")
    assert attempts.get(("t1", 1)) == "first"
    assert attempts.take(("t1", 2), "next attempt")  # a new attempt is new work
    attempts.finish(("t1", 1))
    assert not attempts.take(("t1", 1), "late copy")
    assert list(attempts) == ["next attempt"]
    attempts.finish(("t1", 2))
    attempts.finish(("t2", 1))  # remembers the latest two: ("t1", 1) is forgotten
    assert len(attempts) == 0
    assert attempts.take(("t1", 1), "long forgotten")
    assert not attempts.take(("t2", 1), "remembered")


def test_a_lease_is_renewed_when_half_of_it_is_left() -> None:
    assert renewal_due(START + timedelta(seconds=10), timedelta(seconds=10)) == START + timedelta(
        seconds=5
    )


class Server:
    """What the server answers extensions with: a deadline `by` from the clock's now, or the
    failures queued in `failures` first."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.asked: list[tuple[float, float]] = []
        """(seconds since START, extend_by seconds) of each extension asked for."""
        self.failures: list[Exception] = []

    async def extend(self, by: timedelta) -> datetime:
        self.asked.append(((self.clock.now() - START).total_seconds(), by.total_seconds()))
        if self.failures:
            raise self.failures.pop(0)
        return self.clock.now() + by


async def advance(clock: VirtualClock, seconds: float) -> None:
    """Move the clock on in steps of 0.5 s, letting the waits it ends run."""
    for _ in range(int(seconds * 2)):
        clock.advance(timedelta(seconds=0.5))
        for _ in range(5):
            await asyncio.sleep(0)


async def test_a_kept_lease_is_extended_by_its_length_before_it_ends() -> None:
    clock = VirtualClock(START)
    server = Server(clock)
    lease = Lease(START + timedelta(seconds=10), server.extend, clock, lambda: timedelta(0), FAST)
    keeper = asyncio.create_task(lease.keep())
    try:
        await advance(clock, 4.5)
        assert server.asked == []
        await advance(clock, 0.5)
        assert server.asked == [(5.0, 10.0)]
        assert lease.deadline == START + timedelta(seconds=15)
        await advance(clock, 5.0)
        assert server.asked == [(5.0, 10.0), (10.0, 10.0)]
        # An explicit extension moves the next automatic one later.
        assert await lease.extend(timedelta(seconds=30)) == START + timedelta(seconds=40)
        await advance(clock, 20.0)
        assert server.asked[-1] == (10.0, 30.0)
        await advance(clock, 5.0)
        assert server.asked[-1] == (35.0, 10.0)
    finally:
        keeper.cancel()


async def test_an_unanswered_extension_is_tried_again_and_a_lost_attempt_ends_the_keeping() -> None:
    clock = VirtualClock(START)
    server = Server(clock)
    server.failures = [Unreachable("down"), AttemptLost("timed out")]
    lease = Lease(START + timedelta(seconds=4), server.extend, clock, lambda: timedelta(0), FAST)
    keeper = asyncio.create_task(lease.keep())
    await advance(clock, 3.0)
    assert [at for at, _ in server.asked] == [2.0, 2.5]  # after a backoff of 0.25-0.5 s
    assert keeper.done()
    with pytest.raises(AttemptLost):
        keeper.result()


async def test_the_skew_moves_the_renewal_to_the_servers_time() -> None:
    clock = VirtualClock(START)
    server = Server(clock)
    ahead = timedelta(seconds=2)  # the server's clock is 2 s ahead of the worker's
    lease = Lease(START + timedelta(seconds=12), server.extend, clock, lambda: ahead, FAST)
    assert lease.length == timedelta(seconds=10)
    keeper = asyncio.create_task(lease.keep())
    try:
        await advance(clock, 4.5)
        assert server.asked == []
        await advance(clock, 0.5)  # server time 7 s: half the lease is left
        assert server.asked == [(5.0, 10.0)]
    finally:
        keeper.cancel()


def test_the_public_surface() -> None:
    assert sorted(opscore.client.__all__) == [
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


def test_dependency_outputs_come_in_the_order_of_their_names() -> None:
    message = workflow_pb2.TaskAssignment(task_id="t", attempt=1)
    names = [f"dep-{index:02}" for index in range(20, 0, -1)]
    for name in names:
        message.dependency_outputs[name].update({"from": name})
    outputs = assignment_in(message).dependency_outputs
    assert list(outputs) == sorted(names)
    assert outputs["dep-07"] == {"from": "dep-07"}
