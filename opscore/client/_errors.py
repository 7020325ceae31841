"""The exceptions of the agent SDK: one a handler raises, the others the worker's own."""

from __future__ import annotations


class NonRetryable(Exception):
    """Raised by a handler for a failure another attempt would not cure (bad input, a refused
    request): the task fails at once, with this exception's message as its error, instead of
    being retried under its retry policy. Any other exception is reported as retryable."""


class AttemptLost(Exception):
    """The server no longer counts this worker as the holder of an attempt (its lease ran out,
    its run was cancelled or failed, the agent was deregistered): nothing more may be reported
    for it."""


class OutputRefused(Exception):
    """The server refused a handler's output as invalid or too large: the attempt is failed
    instead, since sending the same output again cannot succeed."""


class Unreachable(Exception):
    """No server answered a call this time (unavailable, timed out, overloaded): the same call
    may succeed later, or on another address."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds the server asked the client to wait before trying again (0: no advice)."""
