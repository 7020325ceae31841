"""Hypothesis strategies for hostile values: text, ids, numbers, durations, Struct payloads and
whole workflow definitions, each mixing valid values with values the contract refuses. None of
them knows the live server; `rpcs` aims them at it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from hypothesis import strategies as st
from opscore.v1 import (
    workflow_pb2,
)

from hostile.contract import ID_ALPHABET, MAX_DURATION_SECONDS, MAX_ID, MAX_NAME

# Strategies: text, ids, numbers --------------------------------------------------------------

# Surrogates are excluded: protobuf refuses them on the client side (they are not UTF-8).
CHARACTERS = st.characters(exclude_categories=("Cs",))


def _repeat(seed: str, length: int) -> str:
    """`seed` repeated to exactly `length` characters (long strings at little entropy cost)."""
    return (seed * (length // len(seed) + 1))[:length]


def _with_nul(before: str, after: str) -> str:
    return f"{before}\x00{after}"


def _insert(text: str, character: str, position: int) -> str:
    position %= len(text) + 1
    return text[:position] + character + text[position:]


short_text = st.text(CHARACTERS, max_size=24)
long_text = st.builds(
    _repeat, st.text(CHARACTERS, min_size=1, max_size=4), st.integers(MAX_NAME + 1, 100_000)
)
nul_text = st.builds(_with_nul, st.text(CHARACTERS, max_size=8), st.text(CHARACTERS, max_size=8))
edge_text = st.sampled_from(
    [
        "",
        " ",
        "\t",
        "\n",
        "\x00",
        "\x7f",
        "\u200b",
        "\ufeff",
        "\U0001f600",
        "a" * MAX_NAME,
        "a" * (MAX_NAME + 1),
        "\u00e9" * MAX_NAME,
        "\U0001f600" * (MAX_NAME + 1),
        "../../etc/passwd",
        "'; DROP TABLE tasks; --",
        "%s%n%x",
        "\\",
        "null",
        "NaN",
    ]
)
hostile_text = st.one_of(short_text, nul_text, long_text, edge_text)

valid_ids = st.text(ID_ALPHABET, min_size=1, max_size=MAX_ID)
wrong_ids = st.one_of(
    st.just(""),
    st.text(ID_ALPHABET, min_size=MAX_ID + 1, max_size=400),
    st.builds(
        _insert,
        st.text(ID_ALPHABET, min_size=1, max_size=20),
        st.characters(exclude_categories=("Cs",), exclude_characters=ID_ALPHABET),
        st.integers(0, 20),
    ),
    hostile_text,
)


def ids(known: Sequence[str]) -> st.SearchStrategy[str]:
    """Ids that exist, ids of the right shape that do not, and ids of the wrong shape."""
    return st.one_of(st.sampled_from(list(known)), valid_ids, wrong_ids)


def optional_ids(known: Sequence[str]) -> st.SearchStrategy[str]:
    """As `ids`, with the empty string (the field left unset) likely."""
    return st.one_of(st.just(""), ids(known))


int32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1, -1, 2, 100, 101, 1000, 1001, 2**31 - 1, -(2**31)]),
)
enum_numbers = st.one_of(st.integers(-3, 9), int32)
page_sizes = st.one_of(st.integers(-2, 3), int32)


def _duration(seconds: int, nanos: int) -> Duration:
    return Duration(seconds=seconds, nanos=nanos)


durations = st.builds(
    _duration,
    st.one_of(
        st.integers(-10, 10),
        st.integers(-MAX_DURATION_SECONDS, MAX_DURATION_SECONDS),
        st.sampled_from(
            [60, 86_400, 86_401, 604_800, 604_801, MAX_DURATION_SECONDS, -MAX_DURATION_SECONDS]
        ),
    ),
    st.one_of(st.just(0), st.integers(-999_999_999, 999_999_999)),
)
optional_durations = st.one_of(st.none(), durations)
multipliers = st.one_of(
    st.floats(), st.sampled_from([0.0, 1.0, 2.0, 100.0, 100.5, -1.0, math.nan, math.inf])
)


# Strategies: Struct payloads -----------------------------------------------------------------

struct_keys = st.one_of(st.sampled_from(["k", "a", "b", ""]), short_text, nul_text)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),  # NaN and the infinities included
    st.integers(-(2**53), 2**53),
    short_text,
    short_text,
    nul_text,
    long_text,
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(struct_keys, children, max_size=4)
    ),
    max_leaves=12,
)


def _nest(value: Any, depth: int, key: str) -> dict[str, Any]:
    """`value` wrapped `depth` times, alternately in an object and a list, inside an object."""
    for level in range(depth):
        value = {key: value} if level % 2 == 0 else [value]
    return value if isinstance(value, dict) else {key: value}


def blob(size: int) -> dict[str, Any]:
    return {"blob": "x" * size}


deep_payloads = st.builds(_nest, json_values, st.integers(1, 70), struct_keys)
big_payloads = st.builds(blob, st.sampled_from([10_000, 600_000, 1_100_000, 5_000_000]))
small_payloads = st.one_of(
    st.just({}), st.dictionaries(struct_keys, json_values, max_size=5), deep_payloads
)
payloads = st.one_of(small_payloads, big_payloads)


def fill_struct(target: Struct, value: dict[str, Any]) -> None:
    """Set a Struct field in place: assigning or copying one re-parses it, which a deep one
    fails on the client side before it could reach the server."""
    target.update(value)


# Strategies: definitions ---------------------------------------------------------------------

TASK_NAMES = ("a", "b", "c", "d", "e")
task_names = st.one_of(st.sampled_from(TASK_NAMES), st.sampled_from(TASK_NAMES), hostile_text)
workflow_names = st.one_of(st.sampled_from(["hostile", "chain", "stuck"]), hostile_text)
capabilities = st.one_of(st.sampled_from(["", "work", "nobody"]), hostile_text)
labels = st.dictionaries(st.one_of(st.just("zone"), hostile_text), hostile_text, max_size=3)


@st.composite
def retry_policies(draw: st.DrawFn) -> workflow_pb2.RetryPolicy:
    """A retry policy with any numbers and durations."""
    policy = workflow_pb2.RetryPolicy(
        max_attempts=draw(st.one_of(st.integers(-2, 102), int32)),
        backoff_multiplier=draw(multipliers),
    )
    for name in ("initial_backoff", "max_backoff"):
        value = draw(optional_durations)
        if value is not None:
            getattr(policy, name).CopyFrom(value)
    return policy


def _server_set_fields(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """Fields the server sets and must ignore: sometimes sent anyway."""
    if draw(st.booleans()):
        message.definition_id = draw(hostile_text)
        message.version = draw(int32)


def _fill_small(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """Up to 8 tasks with random names, references, fallbacks, labels, inputs and policies."""
    names = draw(st.lists(task_names, max_size=8))
    message.workflow_name = draw(workflow_names)
    message.description = draw(st.one_of(st.just(""), hostile_text))
    _server_set_fields(draw, message)
    references = st.one_of(st.sampled_from(names), hostile_text) if names else hostile_text
    for name in names:
        spec = message.tasks.add(
            name=name,
            capability=draw(capabilities),
            depends_on=draw(st.lists(references, max_size=3)),
            fallback=draw(st.one_of(st.just(""), st.just(""), references)),
        )
        spec.labels.update(draw(labels))
        fill_struct(spec.input, draw(small_payloads))
        timeout = draw(optional_durations)
        if timeout is not None:
            spec.timeout.CopyFrom(timeout)
        if draw(st.booleans()):
            spec.retry_policy.CopyFrom(draw(retry_policies()))


def _fill_ring(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """A ring of dependencies (a self-dependency for one task), possibly behind a valid task."""
    size = draw(st.integers(1, 6))
    message.workflow_name = "ring"
    if draw(st.booleans()):
        message.tasks.add(name="entry", capability="nobody")
    for index in range(size):
        message.tasks.add(
            name=f"r{index}", capability="nobody", depends_on=[f"r{(index + 1) % size}"]
        )


def _fill_many(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """Around the limit of tasks per definition: flat, one long chain, or one long cycle."""
    size = draw(st.sampled_from([999, 1000, 1001, 1500]))
    shape = draw(st.sampled_from(["flat", "chain", "cycle"]))
    message.workflow_name = f"many-{shape}"
    for index in range(size):
        depends_on: list[str] = []
        if shape == "chain" and index:
            depends_on = [f"t{index - 1}"]
        elif shape == "cycle":
            depends_on = [f"t{(index + 1) % size}"]
        message.tasks.add(name=f"t{index}", capability="nobody", depends_on=depends_on)


DEFINITION_SHAPES: dict[str, Callable[[st.DrawFn, workflow_pb2.WorkflowDefinition], None]] = {
    "small": _fill_small,
    "ring": _fill_ring,
    "many": _fill_many,
}


def fill_definition(draw: st.DrawFn, message: workflow_pb2.WorkflowDefinition) -> None:
    """Draw a definition into `message` in place (built apart and copied in, a deep Struct in a
    task input would fail to re-parse on the client side)."""
    shape = draw(st.sampled_from(["small", "small", "small", "small", "ring", "many"]))
    DEFINITION_SHAPES[shape](draw, message)
