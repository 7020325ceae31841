"""Pages of the List RPCs, read by key order: the page token is opaque to clients, the key of the
last item returned, and the next page starts after it (no offset to scan past, and no item
skipped or repeated when items are added between two pages)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, Select
from sqlalchemy.engine import Connection

from opscore.domain.errors import InvalidArgument
from opscore.domain.ids import is_valid_id


def decode_page_token(token: str) -> str | None:
    """The key a page token carries, None for the first page; INVALID_ARGUMENT if it is forged."""
    if not token:
        return None
    try:
        key = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeError, ValueError):
        key = ""
    if not is_valid_id(key):
        raise InvalidArgument.single("page_token", "is not a token this server issued")
    return key


def read_page(
    conn: Connection,
    query: Select[Any],
    key: Column[str],
    after: str | None,
    page_size: int,
) -> tuple[Sequence[Any], str]:
    """At most `page_size` rows of `query` in `key` order, after the key `after` (from
    `decode_page_token`), and the token of the next page ("" when this one is the last). One row
    more than the page is read to know whether another page follows."""
    query = query.order_by(key)
    if after is not None:
        query = query.where(key > after)
    found = conn.execute(query.limit(page_size + 1)).all()
    page = found[:page_size]
    if len(found) <= page_size:
        return page, ""
    last_key: str = getattr(page[-1], key.name)
    return page, base64.urlsafe_b64encode(last_key.encode()).decode()
