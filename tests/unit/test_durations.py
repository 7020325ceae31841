"""Durations in messages read as people write them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from opscore.domain.durations import human


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(days=7), "7 days"),
        (timedelta(days=1), "1 day"),
        (timedelta(seconds=90), "1 minute 30 seconds"),
        (timedelta(hours=1, minutes=30), "1 hour 30 minutes"),
        (timedelta(seconds=1.5), "1.5 seconds"),
        (timedelta(milliseconds=250), "0.25 seconds"),
        (timedelta(0), "0 seconds"),
        (timedelta(days=2, seconds=1), "2 days 1 second"),
        (-timedelta(seconds=5), "-5 seconds"),
    ],
)
def test_human(delta: timedelta, expected: str) -> None:
    assert human(delta) == expected
