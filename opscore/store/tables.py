"""The schema: every table, column and index Ops-Core stores. Migrations in
`migrations/versions/` must produce exactly this (a test compares them).

Declarative models give typed column attributes; the queries in `queries/` use them as SQLAlchemy
Core statements (no ORM unit of work on the hot path).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    literal_column,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from opscore.domain.models import TaskState
from opscore.store.types import UTCDateTime, json_type

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(128)
"""Ids: server-assigned UUIDv7 strings, or client-chosen agent ids of at most 128 characters."""


def _in_state(state: TaskState) -> dict[str, Any]:
    """The keyword arguments that make an index hold only the tasks in `state`, on both
    backends."""
    condition = text(f"state = '{state.value}'")
    return {"sqlite_where": condition, "postgresql_where": condition}


class Base(DeclarativeBase):
    """Base of the models; named constraints so migrations can refer to them."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: json_type(),
        list[Any]: json_type(),
    }


class AgentRow(Base):
    """A registered agent. Its running-task count is derived from `tasks`, never stored twice."""

    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    labels: Mapped[dict[str, Any]]
    max_concurrent_tasks: Mapped[int] = mapped_column(Integer)
    reported_state: Mapped[str] = mapped_column(String(16))
    state_detail: Mapped[str] = mapped_column(Text)
    connected: Mapped[bool] = mapped_column(Boolean)
    """Whether its task stream is open, on the replica `replica_id`."""
    replica_id: Mapped[str | None] = mapped_column(ID)
    """The replica holding its stream while it is connected (see `ReplicaRow`)."""
    stream_generation: Mapped[int] = mapped_column(Integer, server_default="0")
    """How many streams it has opened: a replica closes, or loses, the stream it opened and not
    a newer one opened elsewhere."""
    registered_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    disconnected_at: Mapped[datetime | None] = mapped_column(index=True)
    """When its stream closed while it held tasks: the start of its grace period. Cleared when it
    reconnects, or when its tasks are declared lost."""
    lease_expiries: Mapped[int] = mapped_column(Integer, server_default="0")
    """Its attempts whose leases expired since its last success, its IDLE report or its
    registration."""
    quarantined: Mapped[bool] = mapped_column(Boolean, server_default=false())
    """Put in ERROR by the server for its expiries (not by its own report)."""
    token_digest: Mapped[str | None] = mapped_column(String(64), unique=True)
    """The SHA-256 of its current token (the token itself is never stored); each registration
    replaces it. None for agents registered before tokens existed: they register again."""


class AgentCapabilityRow(Base):
    """One capability an agent offers: a table of its own so `capability = ?` is an index look-up
    on every backend, instead of a dialect-specific search inside a JSON array.
    """

    __tablename__ = "agent_capabilities"

    agent_id: Mapped[str] = mapped_column(
        ID, ForeignKey("agents.agent_id", ondelete="CASCADE"), primary_key=True
    )
    capability: Mapped[str] = mapped_column(String(200), primary_key=True, index=True)


class DefinitionRow(Base):
    """An immutable version of a workflow definition; its task specs are one JSON document."""

    __tablename__ = "definitions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    definition_id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text)
    tasks: Mapped[list[Any]]
    request_id: Mapped[str | None] = mapped_column(ID, unique=True)
    created_at: Mapped[datetime]


RUN_FILTER_COLUMNS = ("state", "definition_id", "agent_id", "workflow_name")
"""The columns a listing of runs filters on by equality."""


class RunRow(Base):
    """A workflow run. Its tasks carry their specs, so a run never depends on its definition."""

    __tablename__ = "runs"
    __table_args__ = (
        # Listings read runs by creation time and id, newest or oldest first, from a page
        # token's key on: one index for the whole table, and one for each filter, which each
        # lead with the filtered column (and serve look-ups by it alone as well).
        Index("ix_runs_created_at_run_id", "created_at", "run_id"),
        *(
            Index(f"ix_runs_{column}_created_at_run_id", column, "created_at", "run_id")
            for column in RUN_FILTER_COLUMNS
        ),
    )

    run_id: Mapped[str] = mapped_column(ID, primary_key=True)
    definition_id: Mapped[str | None] = mapped_column(ID, ForeignKey("definitions.definition_id"))
    workflow_name: Mapped[str] = mapped_column(String(200))
    agent_id: Mapped[str | None] = mapped_column(ID)
    state: Mapped[str] = mapped_column(String(16))
    input: Mapped[dict[str, Any]]
    request_id: Mapped[str | None] = mapped_column(ID, unique=True)
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    """Digest of the trigger that had `request_id` (see `domain.idempotency`); None for a run
    without one, or stored before fingerprints were."""
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class TaskRow(Base):
    """One task of a run: its spec (copied from the definition), its state and its attempts."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("run_id", "name"),
        # Partial: only the tasks waiting for an agent, or held by one, are in the indexes the
        # server finds them by. Finished tasks, nearly all of a database that has run for a
        # while, never enter them, and a task's change of state touches only the indexes it
        # enters or leaves instead of all three. Queries name the state as a literal (see
        # `TASK_IS_QUEUED`) so that every plan, generic ones included, can use them.
        Index("ix_tasks_queued", "queued_at", "task_id", **_in_state(TaskState.QUEUED)),
        # Replicas claim the earliest queued tasks of a capability their agents offer.
        Index(
            "ix_tasks_queued_capability",
            "capability",
            "queued_at",
            "task_id",
            **_in_state(TaskState.QUEUED),
        ),
        Index("ix_tasks_assigned_deadline", "deadline", **_in_state(TaskState.ASSIGNED)),
        Index("ix_tasks_assigned_agent_id", "agent_id", **_in_state(TaskState.ASSIGNED)),
        # A run's tasks in definition order, from a page token's position on.
        Index("ix_tasks_run_id_position", "run_id", "position"),
    )

    task_id: Mapped[str] = mapped_column(ID, primary_key=True)
    run_id: Mapped[str] = mapped_column(ID, ForeignKey("runs.run_id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    capability: Mapped[str] = mapped_column(String(200))
    labels: Mapped[dict[str, Any]]
    depends_on: Mapped[list[Any]]
    fallback: Mapped[str] = mapped_column(String(200))
    timeout_ms: Mapped[int | None] = mapped_column(Integer)
    retry_policy: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    pinned_agent_id: Mapped[str | None] = mapped_column(ID)
    input: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    agent_id: Mapped[str | None] = mapped_column(ID)
    output: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    error: Mapped[str] = mapped_column(Text)
    queued_at: Mapped[datetime | None]
    assigned_at: Mapped[datetime | None]
    deadline: Mapped[datetime | None]
    """The end of the current attempt's lease, while assigned."""
    not_before: Mapped[datetime | None]
    """The earliest time of the next attempt, while queued for a retry."""
    error_reported: Mapped[bool] = mapped_column(Boolean, server_default=false())
    """Whether `error` was reported by the holder (FailTask), not declared by the server (a
    lease that ran out, an agent lost): only the former may be repeated idempotently."""
    finished_at: Mapped[datetime | None]


class ReplicaRow(Base):
    """A running server on this database, under a lease it renews: one whose lease lapsed is
    declared dead by another, which disconnects its agents."""

    __tablename__ = "replicas"

    replica_id: Mapped[str] = mapped_column(ID, primary_key=True)
    address: Mapped[str] = mapped_column(String(300))
    """Where it listens, and on which host: for operators."""
    started_at: Mapped[datetime]
    renewed_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


metadata = Base.metadata

# The Core tables behind the models: what the statements are built on.
AGENTS = metadata.tables[AgentRow.__tablename__]
CAPABILITIES = metadata.tables[AgentCapabilityRow.__tablename__]
DEFINITIONS = metadata.tables[DefinitionRow.__tablename__]
RUNS = metadata.tables[RunRow.__tablename__]
TASKS = metadata.tables[TaskRow.__tablename__]
REPLICAS = metadata.tables[ReplicaRow.__tablename__]

_task_state = TASKS.c.state
TASK_IS_QUEUED = _task_state == literal_column(f"'{TaskState.QUEUED.value}'")
"""`tasks.state = 'queued'`, written into the SQL as the partial index says it (not bound)."""
TASK_IS_ASSIGNED = _task_state == literal_column(f"'{TaskState.ASSIGNED.value}'")
"""`tasks.state = 'assigned'`, written into the SQL as the partial indexes say it."""
