"""Identifiers: server-assigned ids, and the shape of ids a client may choose."""

from __future__ import annotations

import os
import re
import time
import uuid

MAX_ID_LENGTH = 128
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_id() -> str:
    """A UUIDv7 (RFC 9562): unique, and sorted by creation time to the millisecond.

    Time order lets listings page by id alone (a keyset on one indexed column) and read in the
    order things were created, without a second ordering column.
    """
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))


def is_valid_id(value: str) -> bool:
    """Whether a client-supplied id has an acceptable shape: 1-128 of `[A-Za-z0-9._:-]`."""
    return _ID_PATTERN.fullmatch(value) is not None
