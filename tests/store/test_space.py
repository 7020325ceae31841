"""The free-space reserve on SQLite: new work is refused while less than the reserve is free,
judged from the real file system at most once a second (a clock the test moves by hand)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from opscore.domain.errors import StorageReserve
from opscore.store.space import FreeSpaceReserve, reserve_for


class Clock:
    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


def free_bytes(directory: Path) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def test_below_the_reserve_new_work_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.store")
    reserve = free_bytes(tmp_path) + (1 << 40)  # more than this disk will ever have free
    gate = FreeSpaceReserve(tmp_path, reserve, clock=Clock())
    for _ in range(3):
        with pytest.raises(StorageReserve) as refused:
            gate.admit_new_work()
    assert refused.value.reason == "STORAGE_RESERVE"
    assert refused.value.reserve == reserve
    assert 0 < refused.value.free < reserve
    assert refused.value.retry_after.total_seconds() == 5
    # One warning when refusals begin, not one per refusal.
    assert [r.getMessage() for r in caplog.records] == [
        "free space below the reserve: refusing new work"
    ]


def test_the_free_space_is_looked_at_once_a_second_at_most(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="opscore.store")
    clock = Clock()
    directory = tmp_path / "database"
    directory.mkdir()
    gate = FreeSpaceReserve(directory, free_bytes(tmp_path) + (1 << 40), clock=clock)
    with pytest.raises(StorageReserve):
        gate.admit_new_work()
    directory.rmdir()  # the next look fails, and says so
    clock.value = 0.9
    with pytest.raises(StorageReserve):
        gate.admit_new_work()
    assert len(caplog.records) == 1  # no look since the first
    clock.value = 1.0
    with pytest.raises(StorageReserve):
        gate.admit_new_work()  # a look that cannot be made changes nothing
    assert [r.getMessage() for r in caplog.records][1:] == ["cannot read the free space"]


def test_no_reserve_is_kept_when_it_is_zero_or_the_disk_is_not_ours(tmp_path: Path) -> None:
    FreeSpaceReserve(tmp_path, 0).admit_new_work()
    FreeSpaceReserve(None, 1 << 62).admit_new_work()


def test_the_reserve_is_on_the_sqlite_files_disk_only(tmp_path: Path) -> None:
    beyond = free_bytes(tmp_path) + (1 << 40)
    with pytest.raises(StorageReserve):
        reserve_for(f"sqlite:///{tmp_path / 'opscore.db'}", beyond).admit_new_work()
    reserve_for("sqlite:///:memory:", beyond).admit_new_work()
    reserve_for("postgresql://nobody@127.0.0.1/opscore", beyond).admit_new_work()
