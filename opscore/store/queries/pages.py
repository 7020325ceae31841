"""Pages of the List RPCs, read by key order and cut by bytes: a page ends at its page size or
before the item that would take the response past its budget (`read_by_bytes`), and its token
carries the key of the first item of the next page, which starts there (no offset to scan past,
and no item skipped or repeated when items are added between two pages).

Tokens are opaque to clients and scoped (`scoped_token`): with the key they carry a digest of
what the listing was asked for (its filters and order, or its run), so a token used with another
listing is refused rather than misread."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from opscore.domain.errors import InvalidArgument
from opscore.domain.ids import is_valid_id
from opscore.domain.models import Page

T = TypeVar("T")
K = TypeVar("K")

FIRST_CHUNK = 8
"""Items read by the first query of a page cut by bytes: few, since each may be large; the
next queries read as many as the sizes seen so far say will fit."""
_NOT_ISSUED = "is not a token this server issued for this request"


def _digest(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


def scoped_token(scope: str, key: list[Any]) -> str:
    """A page token for the listing described by `scope` that starts at the item of `key`."""
    payload = json.dumps([_digest(scope), key], separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode()


def scoped_key(token: str, scope: str) -> list[Any] | None:
    """The key a scoped page token carries, None for the first page; INVALID_ARGUMENT naming
    `page_token` if it is forged or was issued for another listing (other filters, order, run).
    The key's values are the caller's to check."""
    if not token:
        return None
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        digest, key = json.loads(raw)
    except (binascii.Error, UnicodeError, ValueError, TypeError):
        raise InvalidArgument.single("page_token", _NOT_ISSUED) from None
    if digest != _digest(scope) or not isinstance(key, list):
        raise InvalidArgument.single("page_token", _NOT_ISSUED)
    return key


def scoped_id(token: str, scope: str) -> str | None:
    """The id a scoped page token keyed by one id carries, None for the first page;
    INVALID_ARGUMENT as `scoped_key` says, or if its key is not one id."""
    key = scoped_key(token, scope)
    if key is None:
        return None
    if len(key) != 1 or not isinstance(key[0], str) or not is_valid_id(key[0]):
        raise InvalidArgument.single("page_token", _NOT_ISSUED)
    found: str = key[0]
    return found


def read_id_page(
    fetch: Callable[[str | None, int], Sequence[T]],
    key: Callable[[T], str],
    size: Callable[[T], int],
    page_size: int,
    page_token: str,
    scope: str,
    budget: int,
) -> Page[T]:
    """A page of a listing keyed by one id (see `read_by_bytes`), from the id `page_token`
    carries, and the token of the next page."""
    first = scoped_id(page_token, scope)
    items, rest, _ = read_by_bytes(
        lambda start, limit: fetch(start or first, limit), key, size, page_size, budget
    )
    return Page(tuple(items), "" if rest is None else scoped_token(scope, [rest]))


def read_by_bytes(
    fetch: Callable[[K | None, int], Sequence[T]],
    key: Callable[[T], K],
    size: Callable[[T], int],
    page_size: int,
    budget: int,
    *,
    at_least_one: bool = True,
) -> tuple[list[T], K | None, int]:
    """At most `page_size` items, together at most `budget` bytes by `size`, read in key order
    by `fetch(start, limit)` (at most `limit` items from the key `start` on, None for the
    first); the key of the first item left for the next page (None when none is left); and the
    bytes the page takes. With `at_least_one`, a page always holds an item, however large, so
    that paging always moves on. Read in chunks, so a page of large items never holds in memory
    much more than it returns."""
    items: list[T] = []
    used = 0
    start: K | None = None
    chunk = FIRST_CHUNK
    while True:
        want = min(chunk, page_size - len(items))
        found = fetch(start, want + 1)
        for item in found[:want]:
            cost = size(item)
            if used + cost > budget and (items or not at_least_one):
                return items, key(item), used
            items.append(item)
            used += cost
        if len(found) <= want:
            return items, None, used
        start = key(found[want])
        if len(items) == page_size:
            return items, start, used
        chunk = max(1, (budget - used) * len(items) // max(used, 1) + 1)
