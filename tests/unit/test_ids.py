"""Server-assigned ids: UUIDv7s, unique, in creation order to the millisecond."""

from __future__ import annotations

import time
import uuid

from opscore.domain.ids import is_valid_id, new_id, new_ids


def test_ids_are_uuid7_with_the_creation_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ids = [*new_ids(100), new_id()]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in ids:
        value = uuid.UUID(text)
        assert str(value) == text
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert before <= value.int >> 80 <= after
        assert is_valid_id(text)


def test_ids_made_later_sort_later() -> None:
    first = new_ids(3)
    time.sleep(0.002)
    second = new_ids(3)
    assert max(first) < min(second)


def test_no_ids() -> None:
    assert new_ids(0) == []
