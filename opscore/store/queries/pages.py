"""Page tokens of the List RPCs: opaque to clients, the key of the last item returned."""

from __future__ import annotations

import base64
import binascii

from opscore.domain.errors import InvalidArgument
from opscore.domain.ids import is_valid_id


def encode_page_token(last_key: str) -> str:
    """Page tokens are opaque to clients: the key of the last item, URL-safe base64."""
    return base64.urlsafe_b64encode(last_key.encode()).decode()


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
