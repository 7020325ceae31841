"""Durations as people write them ("7 days", "1 hour 30 minutes"), for every message that
prints one: `str(timedelta)` reads "7 days, 0:00:00"."""

from __future__ import annotations

from datetime import timedelta

_UNITS = (("day", 86_400), ("hour", 3_600), ("minute", 60))


def human(delta: timedelta) -> str:
    """`delta` in days, hours, minutes and seconds, each named only when not zero; a fraction
    of a second is kept to the millisecond ("1.5 seconds")."""
    sign = "-" if delta < timedelta(0) else ""
    left = round(abs(delta).total_seconds(), 3)
    parts: list[str] = []
    for name, size in _UNITS:
        count = int(left // size)
        if count:
            parts.append(_count(count, name))
            left = round(left - count * size, 3)
    if left or not parts:
        parts.append(_count(int(left) if left == int(left) else left, "second"))
    return sign + " ".join(parts)


def _count(amount: float, unit: str) -> str:
    return f"{amount:g} {unit}" + ("" if amount == 1 else "s")
