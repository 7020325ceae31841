"""How much one response may carry: every answer must fit in a message that a client with
gRPC's default receive limit accepts, whatever the server's own limit and whatever is stored.

Listings are cut by bytes as well as by page size: a page ends before the item that would take
the response past its budget, and its next page token continues with that item. The budget is
measured on the wire form of each item (`WireSizes`, given by the API layer), so the cut is
exact rather than estimated from stored JSON, whose encoding can differ in size.

The assignments a task stream pushes keep to the same budget: one whose dependency outputs
would take it past is sent with as many of them as fit, and names the rest
(`fit_assignment`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from opscore.domain.models import (
    Agent,
    Assignment,
    JsonObject,
    TaskRun,
    TaskState,
    WorkflowDefinition,
    WorkflowRun,
)

DEFAULT_CLIENT_MESSAGE_BYTES = 4 * 1024 * 1024
"""The largest message a gRPC client receives unless it is configured otherwise (every
language's default)."""
ENVELOPE_BYTES = 16 * 1024
"""Room kept in each response for what is not an item of it: the page token and the framing of
the response message itself."""


def response_bytes(max_message_bytes: int) -> int:
    """The bytes of runs and tasks one response may carry: within the server's own message limit
    and within a default client's, less the envelope."""
    limit = min(max_message_bytes, DEFAULT_CLIENT_MESSAGE_BYTES)
    return limit - min(ENVELOPE_BYTES, limit // 4)


class WireSizes(Protocol):
    """The size of an item as a response carries it, framing included."""

    def run(self, run: WorkflowRun) -> int:
        """Bytes of a run, with the tasks it holds."""

    def task(self, task: TaskRun) -> int:
        """Bytes of one task of a run."""

    def definition(self, definition: WorkflowDefinition) -> int:
        """Bytes of one workflow definition."""

    def agent(self, agent: Agent) -> int:
        """Bytes of one agent."""

    def assignment(self, assignment: Assignment) -> int:
        """Bytes of an assignment as its stream's message, with the outputs it holds."""

    def dependency_output(self, name: str, output: JsonObject) -> int:
        """Bytes one dependency's output adds to an assignment."""


@dataclass(frozen=True, slots=True)
class Budget:
    """What one response may carry, and how its items are measured."""

    bytes: int
    sizes: WireSizes


def fit_assignment(assignment: Assignment, budget: Budget) -> Assignment:
    """`assignment` with its dependency outputs cut to fit `budget`: in dependency order, as
    many as fit, the rest named in `omitted_outputs` (whose own bytes are counted first). The
    input is never cut: an assignment too large without any output is sent so, every output
    left out (see docs/api.md, "What the cut cannot cover")."""
    outputs = assignment.dependency_outputs
    bare = replace(assignment, dependency_outputs={}, omitted_outputs=tuple(outputs))
    room = budget.bytes - budget.sizes.assignment(bare)
    kept: dict[str, JsonObject] = {}
    for name, output in outputs.items():
        room -= budget.sizes.dependency_output(name, output)
        if room < 0:
            break
        kept[name] = output
    return replace(
        bare,
        dependency_outputs=kept,
        omitted_outputs=tuple(name for name in outputs if name not in kept),
    )


_STATES = tuple(TaskState)


def count_states(tasks: Iterable[TaskRun]) -> tuple[tuple[TaskState, int], ...]:
    """How many of `tasks` are in each state: the states with any, in TaskState's order."""
    counts = dict.fromkeys(_STATES, 0)
    for task in tasks:
        counts[task.state] += 1
    return tuple((state, count) for state, count in counts.items() if count)
