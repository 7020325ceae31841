"""Validation rules as pure functions, including inputs too large or deep to build by hand."""

from __future__ import annotations

import json
from datetime import timedelta

from hypothesis import example, given
from hypothesis import strategies as st

from opscore.domain.models import DefinitionDraft, RetryPolicy, TaskSpec
from opscore.domain.validation import (
    Limits,
    check_definition,
    check_payload,
    page_size_or_default,
)

DEFAULT_LIMITS = Limits()


def fields(draft: DefinitionDraft, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    return [v.field for v in check_definition(draft, "", limits)]


def test_a_long_chain_is_valid_and_checked_without_recursion() -> None:
    tasks = [TaskSpec("t0")] + [TaskSpec(f"t{i}", depends_on=(f"t{i - 1}",)) for i in range(1, 999)]
    assert fields(DefinitionDraft("chain", tasks=tuple(tasks))) == []


def test_a_long_cycle_names_every_task_on_it() -> None:
    size = 600
    tasks = tuple(TaskSpec(f"t{i}", depends_on=(f"t{(i + 1) % size}",)) for i in range(size))
    assert fields(DefinitionDraft("ring", tasks=tasks)) == [
        f"tasks[{i}].depends_on" for i in range(size)
    ]


def test_the_task_limit_is_enforced() -> None:
    tasks = tuple(TaskSpec(f"t{i}") for i in range(3))
    assert fields(DefinitionDraft("big", tasks=tasks), Limits(max_tasks_per_definition=2)) == [
        "tasks"
    ]


def test_bad_numbers_are_named() -> None:
    task = TaskSpec(
        "t",
        timeout=timedelta(0),
        retry_policy=RetryPolicy(
            max_attempts=-1,
            initial_backoff=timedelta(seconds=-1),
            backoff_multiplier=float("nan"),
            max_backoff=timedelta(seconds=-2),
        ),
    )
    assert fields(DefinitionDraft("n", tasks=(task,))) == [
        "tasks[0].timeout",
        "tasks[0].retry_policy.max_attempts",
        "tasks[0].retry_policy.backoff_multiplier",
        "tasks[0].retry_policy.initial_backoff",
        "tasks[0].retry_policy.max_backoff",
    ]


def test_page_sizes_default_and_clamp() -> None:
    limits = Limits(max_page_size=100, default_page_size=10)
    assert page_size_or_default(0, limits) == 10
    assert page_size_or_default(7, limits) == 7
    assert page_size_or_default(10**6, limits) == 100


names = st.sampled_from(["a", "b", "c", "d", "e", ""])


@given(
    st.lists(
        st.tuples(names, st.lists(names, max_size=4), names),
        min_size=0,
        max_size=8,
    )
)
def test_any_graph_is_accepted_only_when_well_formed(
    raw: list[tuple[str, list[str], str]],
) -> None:
    tasks = tuple(TaskSpec(n, depends_on=tuple(d), fallback=f) for n, d, f in raw)
    found = fields(DefinitionDraft("g", tasks=tasks))
    declared = [t.name for t in tasks]
    well_formed = (
        bool(tasks)
        and all(declared)
        and len(set(declared)) == len(declared)
        and all(dep in declared and dep != t.name for t in tasks for dep in t.depends_on)
        and all(not t.fallback or (t.fallback in declared and t.fallback != t.name) for t in tasks)
        and _acyclic({t.name: t.depends_on for t in tasks})
        and _fallbacks_are_leaves(tasks)
    )
    assert (found == []) == well_formed, found


def _fallbacks_are_leaves(tasks: tuple[TaskSpec, ...]) -> bool:
    """A fallback stands in for one task only, has no dependencies and no fallback of its own,
    and no task depends on it."""
    by_name = {t.name: t for t in tasks}
    fallbacks = [t.fallback for t in tasks if t.fallback]
    return len(set(fallbacks)) == len(fallbacks) and all(
        not by_name[f].depends_on
        and not by_name[f].fallback
        and all(f not in t.depends_on for t in tasks)
        for f in fallbacks
    )


def _acyclic(graph: dict[str, tuple[str, ...]]) -> bool:
    remaining = dict(graph)
    while remaining:
        free = [n for n, deps in remaining.items() if not set(deps) & set(remaining)]
        if not free:
            return False
        for name in free:
            del remaining[name]
    return True


# What a Struct from the wire can hold: no lone surrogates (protobuf strings are UTF-8); NUL
# has a rule of its own.
_TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=12)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda children: st.lists(children) | st.dictionaries(_TEXT, children),
    max_leaves=20,
)


@given(st.dictionaries(_TEXT, _JSON, max_size=6), st.integers(0, 400))
# The longest encodings per character or value, just over the limit.
@example({"a": -1.7976931348623157e308}, 29)
@example({"k": "\x01\x02\x03"}, 25)
@example({"n": [10**30, True, None]}, 48)
def test_a_payload_is_over_the_limit_exactly_when_its_json_is(
    payload: dict[str, object], limit: int
) -> None:
    size = len(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    found = list(check_payload(payload, "input", Limits(max_payload_bytes=limit)))
    assert [v.over_limit for v in found] == ([True] if size > limit else [])
