"""Workflow definitions: stored once, versioned by name, never changed."""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.engine import Connection

from opscore.domain import idempotency
from opscore.domain.errors import NotFound, Resource
from opscore.domain.ids import new_id
from opscore.domain.models import DefinitionDraft, Page, WorkflowDefinition
from opscore.domain.responses import Budget
from opscore.store import rows
from opscore.store.prepared import Prepared
from opscore.store.queries.base import Shared
from opscore.store.queries.pages import read_id_page
from opscore.store.tables import DEFINITIONS

_ID = DEFINITIONS.c.definition_id

LATEST_DEFINITION = Prepared(
    "definitions.latest_definition",
    select(DEFINITIONS.c.definition_id)
    .where(DEFINITIONS.c.name == bindparam("b_name"))
    .order_by(DEFINITIONS.c.version.desc())
    .limit(1),
    samples=[{"b_name": "flow"}],
)


class Definitions:
    """The store's repository of workflow definitions."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared

    async def create_definition(
        self, draft: DefinitionDraft, request_id: str, now: datetime
    ) -> WorkflowDefinition:
        """Store the next version of the draft's workflow; the same draft with a request_id
        already used returns the definition it created (ALREADY_EXISTS for another draft)."""

        def op(conn: Connection) -> WorkflowDefinition:
            if request_id:
                existing = (
                    conn.execute(select(DEFINITIONS).where(DEFINITIONS.c.request_id == request_id))
                ).first()
                if existing is not None:
                    stored = rows.definition(existing)
                    idempotency.check_repeated_definition(request_id, draft, stored)
                    return stored
            return _insert_definition(conn, draft, request_id or None, now)

        return await self._shared.write(op)

    async def get_definition(self, definition_id: str) -> WorkflowDefinition:
        """One definition, NOT_FOUND if unknown."""

        def op(conn: Connection) -> WorkflowDefinition:
            return definition_by_id(conn, definition_id)

        return await self._shared.read(op)

    async def list_definitions(
        self, page_size: int, page_token: str, name: str, budget: Budget
    ) -> Page[WorkflowDefinition]:
        """A page of definitions, oldest first (ids sort by creation time), cut to fit
        `budget`."""
        query = select(DEFINITIONS).order_by(_ID)
        if name:
            query = query.where(DEFINITIONS.c.name == name)

        def op(conn: Connection) -> Page[WorkflowDefinition]:
            def fetch(start: str | None, limit: int) -> list[WorkflowDefinition]:
                chunk = query if start is None else query.where(start <= _ID)
                return [rows.definition(row) for row in conn.execute(chunk.limit(limit))]

            return read_id_page(
                fetch,
                lambda definition: definition.definition_id,
                budget.sizes.definition,
                page_size,
                page_token,
                json.dumps(["definitions", name]),
                budget.bytes,
            )

        return await self._shared.read(op)


def _insert_definition(
    conn: Connection, draft: DefinitionDraft, request_id: str | None, now: datetime
) -> WorkflowDefinition:
    latest = (
        conn.execute(
            select(func.max(DEFINITIONS.c.version)).where(DEFINITIONS.c.name == draft.workflow_name)
        )
    ).scalar_one_or_none()
    definition_id = new_id()
    conn.execute(
        insert(DEFINITIONS).values(
            definition_id=definition_id,
            name=draft.workflow_name,
            version=(latest or 0) + 1,
            description=draft.description,
            tasks=[rows.spec_to_json(spec) for spec in draft.tasks],
            request_id=request_id,
            created_at=now,
        )
    )
    return definition_by_id(conn, definition_id)


def definition_by_id(conn: Connection, definition_id: str) -> WorkflowDefinition:
    """One stored definition, NOT_FOUND if unknown."""
    row = (
        conn.execute(select(DEFINITIONS).where(DEFINITIONS.c.definition_id == definition_id))
    ).first()
    if row is None:
        raise NotFound(Resource.DEFINITION, definition_id)
    return rows.definition(row)
