"""Who owns a database (store/ownership.py), seen from one process: a second claim is refused,
naming the holder, until the first is released; on every backend."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from opscore.store import ownership
from opscore.store.database import name_of
from opscore.store.ownership import DatabaseOwned, Holder


async def test_a_second_claim_is_refused_naming_the_holder_until_it_is_released(
    db_url: str,
) -> None:
    first = await ownership.claim(db_url, Holder("serve", "127.0.0.1:7070"))
    try:
        with pytest.raises(DatabaseOwned) as refusal:
            await ownership.claim(db_url, Holder("db upgrade"))
    finally:
        await first.release()
    assert refusal.value.database == name_of(db_url)
    assert f"pid {os.getpid()}" in refusal.value.holder
    assert "127.0.0.1:7070" in refusal.value.holder

    again = await ownership.claim(db_url, Holder("db upgrade"))
    await again.release()


async def test_the_lock_file_names_its_holder_while_it_holds_it(tmp_path: Path) -> None:
    lock_file = tmp_path / "opscore.db.lock"
    holder = Holder("serve", "localhost:50051")
    owned = await ownership.claim(f"sqlite:///{tmp_path / 'opscore.db'}", holder)
    named = lock_file.read_text()
    await owned.release()
    assert named == f"{holder}\n"
    assert lock_file.read_text() == ""


async def test_a_lock_whose_holder_wrote_nothing_still_refuses(tmp_path: Path) -> None:
    lock_file = tmp_path / "opscore.db.lock"
    with lock_file.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DatabaseOwned) as refusal:
            await ownership.claim(f"sqlite:///{tmp_path / 'opscore.db'}", Holder("serve"))
    assert str(lock_file) in refusal.value.holder


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
async def test_an_in_memory_database_takes_no_lock(url: str) -> None:
    claims = [await ownership.claim(url, Holder("serve")) for _ in range(2)]
    for claim in claims:
        await claim.watch()  # nothing can take it away: it returns at once
        await claim.release()


def test_postgresql_keeps_the_holder_s_pid_and_address() -> None:
    holder = Holder("serve", "[2001:db8::1]:50051", pid=4242, host="h" * 80)
    assert len(holder.application_name) == ownership.APPLICATION_NAME_LENGTH
    assert holder.application_name.startswith("opscore serve pid 4242 [2001:db8::1]:50051 h")


def test_a_postgresql_url_is_named_without_its_password() -> None:
    url = "postgresql://opscore:secret@db.example:5432/opscore"
    assert name_of(url) == "postgresql://opscore:***@db.example:5432/opscore"
