"""Every rule a request must satisfy, checked all at once so a client sees every mistake in one
answer. Field paths follow the protobuf field names (`definition.tasks[2].depends_on[0]`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from opscore.domain.durations import human
from opscore.domain.errors import FieldViolation, InvalidArgument, ResourceExhausted
from opscore.domain.ids import is_valid_id
from opscore.domain.models import (
    AgentRegistration,
    DefinitionDraft,
    JsonObject,
    RetryPolicy,
    RunFilter,
    RunOrder,
    TaskSpec,
)

MAX_NAME_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes the server accepts; larger requests are refused before anything is stored."""

    max_tasks_per_definition: int = 1000
    """Tasks one workflow definition may hold."""
    max_payload_bytes: int = 1024 * 1024
    """Size, as compact JSON, of one input or output (a task's, a run's)."""
    max_page_size: int = 1000
    """Largest page a listing returns; larger page sizes are clamped to it."""
    default_page_size: int = 50
    """The page size of a listing that asks for none."""
    max_task_timeout: timedelta = timedelta(days=7)
    """Longest lease a task may ask for (its timeout, or an extension)."""
    max_backoff: timedelta = timedelta(days=1)
    """Longest backoff a retry policy may ask for."""
    max_attempts: int = 100
    """Most attempts a retry policy may ask for."""
    max_backoff_multiplier: float = 100.0
    """Largest growth factor of a retry policy."""
    max_error_bytes: int = 64 * 1024
    """Size of an error a failing agent reports."""


MAX_TEXT_LENGTH = 10_000
"""Free-form text an operator or agent gives (descriptions, state details)."""
MAX_LABELS = 64
"""Labels one agent or task may carry."""
MAX_CAPABILITIES = 256
"""Capabilities one agent may offer."""


def raise_if(violations: Iterable[FieldViolation]) -> None:
    """Raise one error naming every violation, if there is any: INVALID_ARGUMENT when any rule of
    shape is broken, RESOURCE_EXHAUSTED when only size limits are exceeded."""
    found = list(violations)
    if any(not violation.over_limit for violation in found):
        raise InvalidArgument(found)
    if found:
        raise ResourceExhausted(found)


def check_id(value: str, field: str, *, required: bool = True) -> Iterator[FieldViolation]:
    """An id a client sends must be present (when required) and of the accepted shape."""
    if not value:
        if required:
            yield FieldViolation(field, "is required")
    elif not is_valid_id(value):
        yield FieldViolation(
            field, "must be 1-128 characters of letters, digits, '.', '_', ':', '-'"
        )


def check_name(value: str, field: str) -> Iterator[FieldViolation]:
    """Names are required, bounded, and printable."""
    if not value.strip():
        yield FieldViolation(field, "must not be empty")
    elif len(value) > MAX_NAME_LENGTH:
        yield FieldViolation(field, f"must be at most {MAX_NAME_LENGTH} characters")
    elif not value.isprintable():
        yield FieldViolation(field, "must not contain control characters")


def check_text(
    value: str, field: str, max_length: int = MAX_TEXT_LENGTH
) -> Iterator[FieldViolation]:
    """Free-form text: bounded, and without NUL characters (no database stores them)."""
    if "\x00" in value:
        yield FieldViolation(field, "must not contain NUL characters")
    elif len(value) > max_length:
        yield FieldViolation(field, f"must be at most {max_length} characters")


def check_label_set(labels: dict[str, str], field: str) -> Iterator[FieldViolation]:
    """Labels: at most MAX_LABELS, keys non-empty, keys and values short printable text."""
    if len(labels) > MAX_LABELS:
        yield FieldViolation(field, f"must hold at most {MAX_LABELS} labels")
        return
    for key, value in labels.items():
        if not key:
            yield FieldViolation(field, "keys must not be empty")
        else:
            yield from check_name(key, f"{field}[{key[:40]!r}]")
            yield from check_text(value, f"{field}[{key[:40]!r}]", MAX_NAME_LENGTH)


def check_capability(value: str, field: str) -> Iterator[FieldViolation]:
    """A capability: empty (any agent) or a short printable name."""
    if value:
        yield from check_name(value, field)


def check_registration(registration: AgentRegistration) -> Iterator[FieldViolation]:
    """An agent's registration: a well-formed id if given, sane capabilities and slot count."""
    yield from check_id(registration.agent_id, "agent_id", required=False)
    for field, value in (("name", registration.name), ("version", registration.version)):
        if value:
            yield from check_name(value, field)
    if registration.max_concurrent_tasks < 0:
        yield FieldViolation("max_concurrent_tasks", "must not be negative")
    elif registration.max_concurrent_tasks > 100_000:
        yield FieldViolation("max_concurrent_tasks", "must be at most 100000")
    if len(registration.capabilities) > MAX_CAPABILITIES:
        yield FieldViolation("capabilities", f"must hold at most {MAX_CAPABILITIES} entries")
    else:
        for index, capability in enumerate(registration.capabilities):
            if not capability:
                yield FieldViolation(f"capabilities[{index}]", "must not be empty")
            else:
                yield from check_name(capability, f"capabilities[{index}]")
    yield from check_label_set(registration.labels, "labels")


def check_payload(value: JsonObject, field: str, limits: Limits) -> Iterator[FieldViolation]:
    """A Struct payload: finite numbers and no NUL characters anywhere (JSON and the databases
    cannot hold them), and at most `max_payload_bytes` as compact JSON.

    The walk also adds up a bound on the JSON size (a character encodes to at most 6 bytes, a
    float to at most 24), so a payload well under the limit, as nearly all are, is not encoded
    here only to be measured."""
    bound = 0
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            bound += 2 + 2 * len(item)
            for key, child in item.items():
                if "\x00" in key:
                    yield FieldViolation(field, "must not contain NUL characters")
                    return
                bound += 6 * len(key) + 2
                stack.append(child)
        elif isinstance(item, list):
            bound += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                yield FieldViolation(field, "must hold only finite numbers")
                return
            bound += 24
        elif isinstance(item, str):
            if "\x00" in item:
                yield FieldViolation(field, "must not contain NUL characters")
                return
            bound += 6 * len(item) + 2
        else:  # True, False, None, or an int
            bound += 5 if item is None or isinstance(item, bool) else len(repr(item))
    if bound <= limits.max_payload_bytes:
        return
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limits.max_payload_bytes:
        yield FieldViolation(
            field, f"is {size} bytes as JSON, over the limit of {limits.max_payload_bytes}", True
        )


def check_definition(
    draft: DefinitionDraft, prefix: str, limits: Limits
) -> Iterator[FieldViolation]:
    """A workflow definition: a name; 1..limit tasks with unique names; references to tasks of
    the same definition; no dependency cycle; no negative numbers or durations.
    """
    yield from check_name(draft.workflow_name, f"{prefix}workflow_name")
    yield from check_text(draft.description, f"{prefix}description")
    if not draft.tasks:
        yield FieldViolation(f"{prefix}tasks", "must hold at least one task")
        return
    if len(draft.tasks) > limits.max_tasks_per_definition:
        yield FieldViolation(
            f"{prefix}tasks", f"must hold at most {limits.max_tasks_per_definition} tasks", True
        )
        return
    first_index: dict[str, int] = {}
    for index, task in enumerate(draft.tasks):
        path = f"{prefix}tasks[{index}]"
        if not task.name.strip():
            yield FieldViolation(f"{path}.name", "must not be empty")
        elif task.name in first_index:
            yield FieldViolation(
                f"{path}.name", f"duplicates the name of tasks[{first_index[task.name]}]"
            )
        else:
            yield from check_name(task.name, f"{path}.name")
            first_index[task.name] = index
    for index, task in enumerate(draft.tasks):
        yield from _check_task(task, f"{prefix}tasks[{index}]", first_index, limits)
    yield from _check_fallbacks(draft.tasks, prefix, first_index)
    yield from _check_acyclic(draft.tasks, prefix, first_index)


def _check_task(
    task: TaskSpec, path: str, names: dict[str, int], limits: Limits
) -> Iterator[FieldViolation]:
    for dep_index, dep in enumerate(task.depends_on):
        if dep not in names:
            yield FieldViolation(
                f"{path}.depends_on[{dep_index}]", f"names no task of this definition: {dep!r}"
            )
        elif dep == task.name:
            yield FieldViolation(
                f"{path}.depends_on[{dep_index}]", "a task cannot depend on itself"
            )
    if task.fallback:
        if task.fallback not in names:
            yield FieldViolation(
                f"{path}.fallback", f"names no task of this definition: {task.fallback!r}"
            )
        elif task.fallback == task.name:
            yield FieldViolation(f"{path}.fallback", "a task cannot be its own fallback")
    yield from check_capability(task.capability, f"{path}.capability")
    yield from check_label_set(task.labels, f"{path}.labels")
    yield from check_payload(task.input, f"{path}.input", limits)
    yield from check_duration(
        task.timeout, f"{path}.timeout", allow_zero=False, maximum=limits.max_task_timeout
    )
    if task.retry_policy is not None:
        yield from _check_retry_policy(task.retry_policy, f"{path}.retry_policy", limits)


def _check_retry_policy(policy: RetryPolicy, path: str, limits: Limits) -> Iterator[FieldViolation]:
    if policy.max_attempts is not None and not 0 <= policy.max_attempts <= limits.max_attempts:
        yield FieldViolation(f"{path}.max_attempts", f"must be between 0 and {limits.max_attempts}")
    multiplier = policy.backoff_multiplier
    if multiplier is not None and not 0 <= multiplier <= limits.max_backoff_multiplier:
        yield FieldViolation(
            f"{path}.backoff_multiplier",
            f"must be a number between 0 and {limits.max_backoff_multiplier:g}",
        )
    for name, value in (
        ("initial_backoff", policy.initial_backoff),
        ("max_backoff", policy.max_backoff),
    ):
        yield from check_duration(
            value, f"{path}.{name}", allow_zero=True, maximum=limits.max_backoff
        )


def check_duration(
    value: timedelta | None, path: str, *, allow_zero: bool, maximum: timedelta
) -> Iterator[FieldViolation]:
    """A duration: not negative, zero only where allowed, and at most `maximum`."""
    if value is None:
        return
    if value < timedelta(0):
        yield FieldViolation(path, "must not be negative")
    elif value == timedelta(0) and not allow_zero:
        yield FieldViolation(path, "must be positive (leave it unset for the server default)")
    elif value > maximum:
        yield FieldViolation(path, f"must be at most {human(maximum)}")


def _check_fallbacks(
    tasks: tuple[TaskSpec, ...], prefix: str, names: dict[str, int]
) -> Iterator[FieldViolation]:
    """A fallback stands in for exactly one task and is a leaf of the graph: it has no
    dependencies and no fallback of its own, and no task depends on it."""
    stands_in_for: dict[str, int] = {}
    for index, task in enumerate(tasks):
        if not task.fallback or task.fallback not in names or task.fallback == task.name:
            continue
        path = f"{prefix}tasks[{index}].fallback"
        fallback = tasks[names[task.fallback]]
        if task.fallback in stands_in_for:
            yield FieldViolation(
                path,
                f"{task.fallback!r} is already the fallback of "
                f"tasks[{stands_in_for[task.fallback]}]",
            )
            continue
        stands_in_for[task.fallback] = index
        if fallback.depends_on:
            yield FieldViolation(path, f"fallback {task.fallback!r} must not have depends_on")
        if fallback.fallback:
            yield FieldViolation(path, f"fallback {task.fallback!r} must not have a fallback")
    for index, task in enumerate(tasks):
        for dep_index, dep in enumerate(task.depends_on):
            if dep in stands_in_for:
                yield FieldViolation(
                    f"{prefix}tasks[{index}].depends_on[{dep_index}]",
                    f"{dep!r} is a fallback; depend on the task it stands in for instead",
                )


def _check_acyclic(
    tasks: tuple[TaskSpec, ...], prefix: str, names: dict[str, int]
) -> Iterator[FieldViolation]:
    """Report each task that lies on a dependency cycle, with the cycle spelled out."""
    graph = {
        task.name: [dep for dep in task.depends_on if dep in names and dep != task.name]
        for task in tasks
        if names.get(task.name) is not None
    }
    reported: set[str] = set()
    for cycle in _cycles(graph):
        for name in cycle:
            if name in reported:
                continue
            reported.add(name)
            described = " -> ".join([*cycle, cycle[0]])
            yield FieldViolation(
                f"{prefix}tasks[{names[name]}].depends_on", f"forms a dependency cycle: {described}"
            )


def _cycles(graph: dict[str, list[str]]) -> Iterator[list[str]]:
    """Yield cycles found by an iterative depth-first search (deep graphs must not recurse)."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    for root, children in graph.items():
        if color[root] != white:
            continue
        path: list[str] = [root]
        iterators = [iter(children)]
        color[root] = grey
        while iterators:
            child = next(iterators[-1], None)
            if child is None:
                color[path.pop()] = black
                iterators.pop()
            elif color[child] == white:
                color[child] = grey
                path.append(child)
                iterators.append(iter(graph[child]))
            elif color[child] == grey:
                yield path[path.index(child) :]


def check_page(page_size: int) -> Iterator[FieldViolation]:
    """A page size is 0 (the default) or positive; larger than the limit is clamped, not refused."""
    if page_size < 0:
        yield FieldViolation("page_size", "must not be negative")


def page_size_or_default(page_size: int, limits: Limits) -> int:
    """0 means the default page size; more than the maximum means the maximum (AIP-158)."""
    if page_size == 0:
        return limits.default_page_size
    return min(page_size, limits.max_page_size)


_ORDERS = {
    "": RunOrder.NEWEST_FIRST,
    "created_at desc": RunOrder.NEWEST_FIRST,
    "created_at": RunOrder.OLDEST_FIRST,
    "created_at asc": RunOrder.OLDEST_FIRST,
}


def run_order(order_by: str) -> RunOrder:
    """The order an `order_by` of a listing of runs names (AIP-132: a field, then `asc` or
    `desc`; spaces between words are free); INVALID_ARGUMENT for any other."""
    order = _ORDERS.get(" ".join(order_by.split()))
    if order is None:
        raise InvalidArgument.single(
            "order_by", 'must be "created_at desc" (the default), "created_at" or "created_at asc"'
        )
    return order


def check_run_filter(where: RunFilter) -> Iterator[FieldViolation]:
    """The ids and name of a listing's filter are well-formed, and its time window is not
    empty by construction."""
    yield from check_id(where.definition_id, "definition_id", required=False)
    yield from check_id(where.agent_id, "agent_id", required=False)
    yield from check_text(where.workflow_name, "workflow_name", MAX_NAME_LENGTH)
    if (
        where.created_after is not None
        and where.created_before is not None
        and where.created_before <= where.created_after
    ):
        yield FieldViolation("created_before", "must be later than created_after")
