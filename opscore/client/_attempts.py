"""The attempts a worker holds, by their identity `(task_id, attempt)`: the server may send the
same attempt again (marked `redelivered`) after a reconnection, and it must not run twice."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

AttemptKey = tuple[str, int]
"""The identity of a piece of work: `(task_id, attempt)`."""

REMEMBERED = 10_000
"""Finished attempts remembered, so that a copy of one still on its way is not run again."""


class Attempts(Generic[T]):
    """What is held for each attempt under way, and the latest finished ones.

    An attempt is taken once: `take` refuses one held or finished already. A copy can arrive
    after its attempt finished (it was sent at the reconnection, read after the result was
    acknowledged), so finished attempts are remembered, the `remembered` latest of them.
    """

    def __init__(self, remembered: int = REMEMBERED) -> None:
        self._held: dict[AttemptKey, T] = {}
        self._finished: OrderedDict[AttemptKey, None] = OrderedDict()
        self._remembered = remembered

    def take(self, key: AttemptKey, value: T) -> bool:
        """Hold `value` for the attempt `key`; False (and nothing held) if the attempt is
        held or was finished already."""
        if key in self._held or key in self._finished:
            return False
        self._held[key] = value
        return True

    def get(self, key: AttemptKey) -> T | None:
        """What is held for `key`, if it is held."""
        return self._held.get(key)

    def finish(self, key: AttemptKey) -> None:
        """The attempt is over (reported, cancelled, lost): let go of it, and remember it."""
        self._held.pop(key, None)
        self._finished[key] = None
        self._finished.move_to_end(key)
        while len(self._finished) > self._remembered:
            self._finished.popitem(last=False)

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._held.values()))
