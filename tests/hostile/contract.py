"""What the contract promises about answers, and the limits of its fields: the numbers the
strategies aim just past and the oracle enforces, in one place so the two cannot drift apart.
"""

from __future__ import annotations

import string
from datetime import timedelta

import grpc

Code = grpc.StatusCode

ACCEPTABLE = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
        Code.ALREADY_EXISTS,
        Code.ABORTED,
        Code.UNAVAILABLE,
    }
)
"""Every status the contract allows an answer to a client's request to have."""

REFUSALS = frozenset({Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED})
"""How a request the contract calls invalid must be answered."""


MAX_NAME = 200
MAX_ID = 128
MAX_DURATION_SECONDS = 315_576_000_000
MAX_TIMEOUT = timedelta(days=7)
MAX_BACKOFF = timedelta(days=1)
MAX_ATTEMPTS = 100
MAX_MULTIPLIER = 100.0
ID_ALPHABET = string.ascii_letters + string.digits + "._:-"


RUN_ORDERS = {"", "created_at", "created_at asc", "created_at desc"}
"""The order_by values of ListWorkflowRuns, words apart by any spaces."""
