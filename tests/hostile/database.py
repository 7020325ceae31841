"""The stored-data invariants checked after the examples, reading the SQLite file with the
sqlite3 module: consistent runs and tasks, and nothing PostgreSQL could not have stored (NUL in
text, text longer than its VARCHAR, NaN or NUL in JSON).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

from hostile.contract import MAX_ID, MAX_NAME

TEXT_COLUMNS = {
    "agents": {"agent_id": MAX_ID, "name": MAX_NAME, "version": MAX_NAME, "state_detail": 0},
    "agent_capabilities": {"agent_id": MAX_ID, "capability": MAX_NAME},
    "definitions": {
        "definition_id": MAX_ID,
        "name": MAX_NAME,
        "description": 0,
        "request_id": MAX_ID,
    },
    "runs": {"run_id": MAX_ID, "workflow_name": MAX_NAME, "agent_id": MAX_ID, "request_id": MAX_ID},
    "tasks": {
        "task_id": MAX_ID,
        "name": MAX_NAME,
        "capability": MAX_NAME,
        "fallback": MAX_NAME,
        "agent_id": MAX_ID,
        "pinned_agent_id": MAX_ID,
        "error": 0,
    },
}
"""Text columns, with their VARCHAR length (0: unbounded), that PostgreSQL enforces."""

JSON_COLUMNS = {
    "agents": ("labels",),
    "definitions": ("tasks",),
    "runs": ("input",),
    "tasks": ("labels", "depends_on", "input", "output", "retry_policy"),
}

INVARIANTS = {
    "a task whose run does not exist": """
        SELECT t.task_id FROM tasks t LEFT JOIN runs r ON r.run_id = t.run_id
        WHERE r.run_id IS NULL""",
    "an ASSIGNED task without agent, attempt or deadline": """
        SELECT task_id FROM tasks WHERE state = 'assigned'
        AND (agent_id IS NULL OR agent_id = '' OR attempt < 1 OR deadline IS NULL)""",
    "an ASSIGNED task held by an agent that does not exist": """
        SELECT t.task_id FROM tasks t LEFT JOIN agents a ON a.agent_id = t.agent_id
        WHERE t.state = 'assigned' AND a.agent_id IS NULL""",
    "a SUCCEEDED task without output": """
        SELECT task_id FROM tasks WHERE state = 'succeeded'
        AND (output IS NULL OR output = 'null')""",
    "a SUCCEEDED or FAILED task without finished_at": """
        SELECT task_id FROM tasks WHERE state IN ('succeeded', 'failed')
        AND finished_at IS NULL""",
    "a finished run without finished_at": """
        SELECT run_id FROM runs WHERE state IN ('succeeded', 'failed', 'cancelled')
        AND finished_at IS NULL""",
    "a SUCCEEDED run with a task neither SUCCEEDED nor SKIPPED": """
        SELECT DISTINCT r.run_id FROM runs r JOIN tasks t ON t.run_id = r.run_id
        WHERE r.state = 'succeeded' AND t.state NOT IN ('succeeded', 'skipped')""",
    "a PENDING or RUNNING run without an unfinished task": """
        SELECT r.run_id FROM runs r WHERE r.state IN ('pending', 'running')
        AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.run_id
                        AND t.state IN ('pending', 'queued', 'assigned'))""",
    "a finished run with an unfinished task": """
        SELECT DISTINCT r.run_id FROM runs r JOIN tasks t ON t.run_id = r.run_id
        WHERE r.state IN ('succeeded', 'failed', 'cancelled')
        AND t.state IN ('pending', 'queued', 'assigned')""",
}


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token} stored in JSON")


def _json_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_strings(item)


def _invariant_faults(db: sqlite3.Connection) -> Iterator[str]:
    for description, query in INVARIANTS.items():
        found = [row[0] for row in db.execute(query).fetchmany(5)]
        if found:
            yield f"{description}: {found}"


def _text_faults(db: sqlite3.Connection) -> Iterator[str]:
    """Text PostgreSQL could not store: NUL characters, values longer than their VARCHAR."""
    for table, columns in TEXT_COLUMNS.items():
        for column, limit in columns.items():
            query = f"SELECT count(*) FROM {table} WHERE instr({column}, char(0)) > 0"
            if nul := db.execute(query).fetchone()[0]:
                yield f"{table}.{column}: {nul} values hold NUL"
            query = f"SELECT count(*) FROM {table} WHERE length({column}) > {limit or 1e18}"
            if long := db.execute(query).fetchone()[0]:
                yield f"{table}.{column}: {long} values over VARCHAR({limit})"


def _json_faults(db: sqlite3.Connection) -> Iterator[str]:
    """JSON PostgreSQL could not store: NaN or the infinities, NUL in strings (as \\u0000)."""
    for table, columns in JSON_COLUMNS.items():
        for column in columns:
            for (raw,) in db.execute(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL"):
                try:
                    loaded = json.loads(raw, parse_constant=_refuse_constant)
                except ValueError as error:
                    yield f"{table}.{column}: {error}"
                    break
                if any("\x00" in text for text in _json_strings(loaded)):
                    yield f"{table}.{column}: a string holds NUL"
                    break


def database_faults(path: str) -> list[str]:
    """Every broken invariant of the database (read with the sqlite3 module)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [*_invariant_faults(db), *_text_faults(db), *_json_faults(db)]


def database_path(url: str) -> str:
    """The file of a sqlite:/// URL."""
    return url.split(":///", 1)[1]
