"""Every rule a request must satisfy, checked all at once so a client sees every mistake in one
answer. Field paths follow the protobuf field names (`definition.tasks[2].depends_on[0]`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from opscore.domain.errors import FieldViolation, InvalidArgument
from opscore.domain.ids import is_valid_id
from opscore.domain.models import AgentRegistration, DefinitionDraft, RetryPolicy, TaskSpec

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


def raise_if(violations: Iterable[FieldViolation]) -> None:
    """Raise one InvalidArgument naming every violation, if there is any."""
    found = list(violations)
    if found:
        raise InvalidArgument(found)


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


def check_registration(registration: AgentRegistration) -> Iterator[FieldViolation]:
    """An agent's registration: a well-formed id if given, sane capabilities and slot count."""
    yield from check_id(registration.agent_id, "agent_id", required=False)
    if registration.max_concurrent_tasks < 0:
        yield FieldViolation("max_concurrent_tasks", "must not be negative")
    for index, capability in enumerate(registration.capabilities):
        if not capability:
            yield FieldViolation(f"capabilities[{index}]", "must not be empty")
    for key in registration.labels:
        if not key:
            yield FieldViolation("labels", "keys must not be empty")


def check_definition(
    draft: DefinitionDraft, prefix: str, limits: Limits
) -> Iterator[FieldViolation]:
    """A workflow definition: a name; 1..limit tasks with unique names; references to tasks of
    the same definition; no dependency cycle; no negative numbers or durations.
    """
    yield from check_name(draft.name, f"{prefix}name")
    if not draft.tasks:
        yield FieldViolation(f"{prefix}tasks", "must hold at least one task")
        return
    if len(draft.tasks) > limits.max_tasks_per_definition:
        yield FieldViolation(
            f"{prefix}tasks", f"must hold at most {limits.max_tasks_per_definition} tasks"
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
        yield from _check_task(task, f"{prefix}tasks[{index}]", first_index)
    yield from _check_acyclic(draft.tasks, prefix, first_index)


def _check_task(task: TaskSpec, path: str, names: dict[str, int]) -> Iterator[FieldViolation]:
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
    for key in task.labels:
        if not key:
            yield FieldViolation(f"{path}.labels", "keys must not be empty")
    yield from _check_duration(task.timeout, f"{path}.timeout", allow_zero=False)
    if task.retry_policy is not None:
        yield from _check_retry_policy(task.retry_policy, f"{path}.retry_policy")


def _check_retry_policy(policy: RetryPolicy, path: str) -> Iterator[FieldViolation]:
    if policy.max_attempts is not None and policy.max_attempts < 0:
        yield FieldViolation(f"{path}.max_attempts", "must not be negative")
    if policy.backoff_multiplier is not None and not (
        policy.backoff_multiplier >= 0 and policy.backoff_multiplier < float("inf")
    ):
        yield FieldViolation(f"{path}.backoff_multiplier", "must be a finite, non-negative number")
    yield from _check_duration(policy.initial_backoff, f"{path}.initial_backoff", allow_zero=True)
    yield from _check_duration(policy.max_backoff, f"{path}.max_backoff", allow_zero=True)


def _check_duration(
    value: timedelta | None, path: str, *, allow_zero: bool
) -> Iterator[FieldViolation]:
    if value is None:
        return
    if value < timedelta(0):
        yield FieldViolation(path, "must not be negative")
    elif value == timedelta(0) and not allow_zero:
        yield FieldViolation(path, "must be positive (leave it unset for the server default)")


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
