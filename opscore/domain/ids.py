"""Identifiers: server-assigned ids, and the shape of ids a client may choose."""

from __future__ import annotations

import os
import re
import time

MAX_ID_LENGTH = 128
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


_VERSION_BITS = (0xF << 76) | (0x3 << 62)
_VERSION_7 = (0x7 << 76) | (0x2 << 62)  # version 7, RFC 9562 variant


def new_id() -> str:
    """A UUIDv7 (RFC 9562): unique, and sorted by creation time to the millisecond.

    Time order lets listings page by id alone (a keyset on one indexed column) and read in the
    order things were created, without a second ordering column.
    """
    return new_ids(1)[0]


def new_ids(count: int) -> list[str]:
    """`count` UUIDv7s (see `new_id`), from one read of the system's randomness. Formatted
    directly rather than through `uuid.UUID`, which checks and converts what is right by
    construction: every task of every run gets an id."""
    prefix = (time.time_ns() // 1_000_000 & ((1 << 48) - 1)) << 80
    noise = os.urandom(10 * count)
    ids = []
    for start in range(0, 10 * count, 10):
        random_bits = int.from_bytes(noise[start : start + 10], "big") & ~_VERSION_BITS
        text = f"{prefix | random_bits | _VERSION_7:032x}"
        ids.append(f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}")
    return ids


def is_valid_id(value: str) -> bool:
    """Whether a client-supplied id has an acceptable shape: 1-128 of `[A-Za-z0-9._:-]`."""
    return _ID_PATTERN.fullmatch(value) is not None
