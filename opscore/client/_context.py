"""What a handler knows of the attempt it runs, and what it may ask of the worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from opscore.client._lease import Lease

JsonObject = dict[str, Any]
"""A task's input or output: a JSON object (a protobuf `Struct` on the wire, whose numbers
are all floats)."""


@dataclass(frozen=True)
class Assignment:
    """A task assignment as the worker received it, in Python types."""

    task_id: str
    run_id: str
    task_name: str
    attempt: int
    capability: str
    input: JsonObject
    deadline: datetime
    redelivered: bool
    dependency_outputs: dict[str, JsonObject] = field(default_factory=dict)
    omitted_dependency_outputs: tuple[str, ...] = ()
    fallback_for: str = ""
    fallback_error: str = ""


class TaskContext:
    """The attempt a handler runs: which task, which attempt, its lease, and whether it was
    cancelled. Given to the handler as its first argument.

    Its attributes may be read from any thread (a synchronous handler runs in one); `extend`
    is a coroutine, for asynchronous handlers (a synchronous one's lease is extended
    automatically, as every handler's is unless the worker was told otherwise).
    """

    def __init__(self, assignment: Assignment, lease: Lease) -> None:
        self._assignment = assignment
        self._lease = lease
        self._cancel_reason: str | None = None

    @property
    def task_id(self) -> str:
        """Id of the task."""
        return self._assignment.task_id

    @property
    def run_id(self) -> str:
        """Id of the run the task belongs to."""
        return self._assignment.run_id

    @property
    def task_name(self) -> str:
        """The task's name in its workflow definition."""
        return self._assignment.task_name

    @property
    def attempt(self) -> int:
        """The attempt, 1 for the first: with `task_id`, the identity of this piece of work."""
        return self._assignment.attempt

    @property
    def capability(self) -> str:
        """The capability the task needs (empty: any agent may run it)."""
        return self._assignment.capability

    @property
    def redelivered(self) -> bool:
        """Whether the server had sent this attempt before, to an earlier connection of this
        agent (a worker that restarted runs such an attempt; a running one never twice)."""
        return self._assignment.redelivered

    @property
    def dependency_outputs(self) -> dict[str, JsonObject]:
        """The outputs of the tasks this one depends on, by task name."""
        return self._assignment.dependency_outputs

    @property
    def omitted_dependency_outputs(self) -> tuple[str, ...]:
        """Dependencies whose outputs did not fit in the assignment (read them with
        `ListWorkflowRunTasks`)."""
        return self._assignment.omitted_dependency_outputs

    @property
    def fallback_for(self) -> str:
        """For a fallback task, the name of the task that failed; empty otherwise."""
        return self._assignment.fallback_for

    @property
    def fallback_error(self) -> str:
        """For a fallback task, the last error of the task that failed."""
        return self._assignment.fallback_error

    @property
    def deadline(self) -> datetime:
        """When the attempt's lease ends, as the server last said (moved by extensions)."""
        return self._lease.deadline

    @property
    def cancelled(self) -> bool:
        """Whether the attempt was cancelled: by the server, by the worker's drain, or because
        the server no longer counts it as the worker's (a synchronous handler polls this: its
        thread cannot be interrupted)."""
        return self._cancel_reason is not None

    @property
    def cancel_reason(self) -> str:
        """Why the attempt was cancelled (`run cancelled`, `timed out`, ...); empty if not."""
        return self._cancel_reason or ""

    async def extend(self, seconds: float) -> datetime:
        """Ask for the lease to last at least `seconds` from now; returns the new deadline.
        Raises `AttemptLost` if the attempt is no longer this worker's, `Unreachable` if no
        server answered, or the server's refusal (`InvalidArgument` for more than the longest
        task timeout, say)."""
        return await self._lease.extend(timedelta(seconds=seconds))

    def _note_cancelled(self, reason: str) -> None:
        """Note that the attempt was cancelled, and why (called by the worker)."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
