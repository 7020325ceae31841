"""How storage's health is judged from the outcome of transactions, and what is logged of an
outage: transitions, the rate-limited count, recovery; with a clock the test moves by hand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import pytest

from opscore.domain.errors import StorageFault, StorageLost, StorageUnavailable
from opscore.domain.health import Backoff, StorageHealth

REFUSED = StorageUnavailable("ConnectionRefusedError: refused", timedelta(seconds=1))


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


def told(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, int | None, float | None]]:
    return [
        (
            r.levelname,
            r.getMessage(),
            getattr(r, "failed_transactions", None),
            getattr(r, "outage_seconds", None),
        )
        for r in caplog.records
        if r.name == "opscore.storage"
    ]


def test_failures_in_a_row_turn_storage_unhealthy_and_the_first_success_mends_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.storage")
    clock = Clock()
    health = StorageHealth(3, clock=clock)
    health.failed(REFUSED, write=True)
    clock.value = 0.5
    health.failed(REFUSED, write=False)
    health.failed(REFUSED, write=True)
    assert health.healthy  # two writes and a read: no kind failed three times in a row
    health.failed(REFUSED, write=True)
    assert not health.healthy
    clock.value = 2.0
    health.succeeded(write=True)
    assert health.healthy
    health.succeeded(write=False)
    assert told(caplog) == [
        ("WARNING", "storage unavailable: health NOT_SERVING", 4, 0.5),
        ("INFO", "storage recovered", 4, 2.0),
    ]
    assert caplog.records[0].cause == REFUSED.cause  # type: ignore[attr-defined]


def test_reads_that_succeed_do_not_mend_failing_writes() -> None:
    """A full or read-only disk still serves reads: only a write that succeeds mends writes."""
    health = StorageHealth(2)
    for _ in range(2):
        health.failed(REFUSED, write=True)
    for _ in range(5):
        health.succeeded(write=False)
    assert not health.healthy
    health.succeeded(write=True)
    assert health.healthy


def test_an_outage_is_told_at_most_once_an_interval_while_it_lasts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.storage")
    clock = Clock()
    health = StorageHealth(1, clock=clock, report_every=10.0)
    for second in range(26):
        clock.value = float(second)
        health.failed(REFUSED, write=False)
    clock.value = 30.0
    health.succeeded(write=False)
    assert told(caplog) == [
        ("WARNING", "storage unavailable: health NOT_SERVING", 1, 0.0),
        ("WARNING", "storage still unavailable", 10, 10.0),
        ("WARNING", "storage still unavailable", 10, 20.0),
        ("INFO", "storage recovered", 26, 30.0),
    ]


def test_a_short_run_of_failures_is_told_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A killed connection fails one call; health stays SERVING, and one line says why."""
    caplog.set_level(logging.INFO, logger="opscore.storage")
    recoveries: list[None] = []
    health = StorageHealth(3)
    health.on_recovery(lambda: recoveries.append(None))
    health.succeeded(write=True)
    assert recoveries == []
    health.failed(REFUSED, write=True)
    health.succeeded(write=True)
    assert health.healthy
    assert [(level, event, count) for level, event, count, _ in told(caplog)] == [
        ("INFO", "storage recovered", 1)
    ]
    assert recoveries == [None]


def test_a_lost_database_is_reported_to_its_listener() -> None:
    lost: list[StorageFault] = []
    health = StorageHealth(3)
    health.on_lost(lost.append)
    health.failed(REFUSED, write=False)
    gone = StorageLost("InvalidCatalogNameError: no such database", timedelta(seconds=5))
    health.failed(gone, write=False)
    assert lost == [gone]


async def test_watch_publishes_each_change_and_probes_only_while_unhealthy() -> None:
    health = StorageHealth(2)
    published: list[bool] = []
    probes = 0
    mended = asyncio.Event()

    async def publish(serving: bool) -> None:
        published.append(serving)
        if serving:
            mended.set()

    async def probe() -> None:
        nonlocal probes
        probes += 1
        if probes < 3:
            health.failed(REFUSED, write=True)
            raise REFUSED.again()
        health.succeeded(write=True)

    watching = asyncio.create_task(health.watch(publish, probe, every=0.01))
    try:
        await asyncio.sleep(0.05)
        assert (published, probes) == ([], 0)  # healthy: nothing to publish or probe
        health.failed(REFUSED, write=True)
        health.failed(REFUSED, write=True)
        await asyncio.wait_for(mended.wait(), 5)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    assert (published, probes) == ([False, True], 3)


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = Backoff(first=0.05, cap=0.3)
    assert [backoff.next_delay() for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    backoff.reset()
    assert backoff.next_delay() == 0.05
