"""Hot statements, compiled once and run straight on the driver's cursor.

SQLAlchemy Core does real work on every execution: it looks the statement up in its compiled
cache, builds an execution context, processes every parameter through a dictionary, fires
events and wraps the cursor in a result object. On SQLite that costs several times the statement
itself, and the handful of statements that every task runs (a few per write batch) spent a large
share of the server's CPU on it alone; on PostgreSQL, where each statement is also a round trip,
the driver's cursor still saves CPU on every task (the figures are in the performance log).

`Prepared` keeps what SQLAlchemy computes once per statement and dialect (the SQL text, the order
of its parameters, each parameter's and each column's type conversion) and runs the statement on
the DBAPI cursor of the transaction's own connection: SQLite's `sqlite3`, or the asyncpg cursor
that SQLAlchemy's greenlet bridge adapts (which begins the transaction as Core would). It
converts values with the same processors SQLAlchemy would use, taken from the statement's own
types, so what it stores and reads back is exactly what Core stores and reads (a test runs each
hot statement both ways, on both databases, and compares). Expanding `IN` parameters get one
parameter marker per value, as SQLAlchemy's own expansion does: `?` each on SQLite; on PostgreSQL,
where expanding renumbers every `$n`, SQLAlchemy's expansion itself, once for each length of the
lists. Either way the rows come back with attribute access by column name.

Every `Prepared` is registered by name in `REGISTERED` when it is built (at import), with sample
parameters, so that the test comparing it with Core finds every one. Because this module uses
SQLAlchemy's internals (the compiler's `positiontup` and `construct_expanded_state`, a bind's
`effective_value`, the expanding-parameter marker, `Connection._handle_dbapi_exception`), it
refuses at import a SQLAlchemy outside `SQLALCHEMY_RANGE`, the series it is tested with.
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy
from sqlalchemy import DateTime, bindparam, column
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ClauseElement
from sqlalchemy.sql.selectable import Select
from sqlalchemy.sql.type_api import TypeEngine

Params = Mapping[str, Any]
_Convert = Callable[[Any], Any] | None

_EXPANDING = "__[POSTCOMPILE_{}]"
"""How SQLAlchemy marks an expanding parameter in compiled SQL text, to be replaced per call."""

SQLALCHEMY_RANGE = ">=2.1.9,<2.2"
"""The SQLAlchemy versions this module is tested with, as `pyproject.toml` requires them."""
_LOWEST = (2, 1, 9)
_BELOW = (2, 2)

Sample = Params | Sequence[Params]
"""Parameters of one run of a statement: a mapping, or for a write a list (an executemany)."""

SAMPLE_TIME = datetime(2026, 1, 2, tzinfo=UTC)
"""A time for samples (the test comparing with Core replaces every time and JSON value)."""


def check_sqlalchemy(version: str) -> None:
    """Raise `ImportError`, naming the supported range, if SQLAlchemy `version` is outside it or
    the installed SQLAlchemy lacks an internal this module uses: a new minor version may change
    them, and a wrong value stored would be found much later than a server refusing to start."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    numbers = tuple(int(part) for part in found.groups()) if found else ()
    if not found or numbers < _LOWEST or numbers[:2] >= _BELOW:
        raise ImportError(
            f"Ops-Core runs on SQLAlchemy {SQLALCHEMY_RANGE} (its prepared statements use "
            f"SQLAlchemy's internals); installed: {version}"
        )
    probe = column("x").in_(bindparam("p", expanding=True))
    marked = _EXPANDING.format("p") in str(probe.compile(dialect=sqlite.dialect()))
    lacking = [
        name
        for owner, name in (
            (SQLCompiler, "positiontup"),
            (SQLCompiler, "construct_expanded_state"),
            (BindParameter, "effective_value"),
            (Connection, "_handle_dbapi_exception"),
        )
        if not hasattr(owner, name)
    ] + ([] if marked else ["the expanding parameter marker"])
    if lacking:
        raise ImportError(
            f"SQLAlchemy {version} lacks what Ops-Core's prepared statements use "
            f"({', '.join(lacking)}); Ops-Core runs on SQLAlchemy {SQLALCHEMY_RANGE}"
        )


check_sqlalchemy(sqlalchemy.__version__)


@dataclass(frozen=True, slots=True)
class _Slot:
    """One parameter position: its name, whether the caller gives it (else it is `constant`),
    the conversion to the driver's value, and whether it expands to a list."""

    name: str
    given: bool
    constant: Any
    convert: _Convert
    expanding: bool

    def value(self, params: Params) -> Any:
        """The caller's value, or the statement's own."""
        return params[self.name] if self.given else self.constant


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A statement as the driver runs it."""

    sql: str
    slots: tuple[_Slot, ...]
    expanding: bool
    row: Callable[..., Any] | None
    """Builds a row from the driver's values, converting each column (None: not a read)."""
    compiler: SQLCompiler
    numbered: bool
    """Parameters are `$1`, `$2`... (PostgreSQL), not `?` (SQLite)."""
    expansions: dict[tuple[int, ...], _Expansion] = field(default_factory=dict)
    """For numbered parameters: the text and parameter order for each length of the expanding
    parameters' lists (expanding renumbers every parameter, so it is worked out once a length)."""


_Expansion = tuple[str, tuple[tuple[int, int | None], ...]]
"""SQL text, and for each of its parameters in order: the slot, and the item of an expanding
slot's list (None for a slot's whole value)."""


@dataclass(frozen=True, slots=True)
class RowLayout:
    """The parameters of an INSERT for some columns, in the order the driver takes them: where
    each column's value goes in a row, and how it is converted to the driver's value."""

    index: dict[str, int]
    converts: dict[str, _Convert]

    def convert(self, key: str, value: Any) -> Any:
        """`value` of column `key` as the driver takes it."""
        return _converted(self.converts[key], value)

    def row(self, values: Params) -> list[Any]:
        """A row of driver values, every column converted."""
        row: list[Any] = [None] * len(self.index)
        for key, index in self.index.items():
            row[index] = self.convert(key, values[key])
        return row


REGISTERED: dict[str, Prepared] = {}
"""Every prepared statement by name, in the order they were built."""


class Prepared:
    """A Core statement run on the driver's cursor directly (see the module docstring), built
    once at import and registered under `name` (unique). `samples` are the runs of it that the
    test comparing it with Core makes, on rows of that test's fixture; `dialects`, the databases
    it runs on."""

    def __init__(
        self,
        name: str,
        statement: Executable,
        *,
        samples: Sequence[Sample],
        dialects: tuple[str, ...] = ("sqlite", "postgresql"),
    ) -> None:
        if name in REGISTERED:
            raise ValueError(f"a prepared statement is already named {name!r}")
        REGISTERED[name] = self
        self.name = name
        self.samples = samples
        self.dialects = dialects
        self.statement = statement
        # An INSERT is compiled for the columns it is given; anything else once.
        self._insert = getattr(statement, "is_insert", False) is True
        self._compiled: dict[tuple[str, tuple[str, ...]], _Compiled] = {}

    def rows(self, conn: Connection, params: Params) -> list[Any]:
        """Run a read; its rows, each with attribute access by column name."""
        compiled = self._compile(conn.dialect, params)
        assert compiled.row is not None, "rows() runs a SELECT"
        sql, values = _bind(compiled, params)
        make = compiled.row
        return [make(found) for found in _run(conn, sql, values, many=False).fetchall()]

    def execute(self, conn: Connection, params: Params | Sequence[Params]) -> None:
        """Run a write once (`params` a mapping) or once per mapping (an executemany). An INSERT
        names the same columns in every mapping."""
        if isinstance(params, Mapping):
            params = [params]
        if not params:
            return
        compiled = self._compile(conn.dialect, params[0])
        assert not compiled.expanding, "a write takes no list of values for IN"
        if len(params) == 1:
            _run(conn, compiled.sql, _values(compiled.slots, params[0]), many=False)
        else:
            rows = [_values(compiled.slots, one) for one in params]
            _run(conn, compiled.sql, rows, many=True)

    def layout(self, dialect: Dialect, keys: Sequence[str]) -> RowLayout:
        """How an INSERT for the columns `keys` takes its values: rows built ahead of time in
        this order, each value converted once, are run by `execute_rows` as they are."""
        compiled = self._compile(dialect, dict.fromkeys(keys))
        assert all(slot.given for slot in compiled.slots), "every column is given"
        return RowLayout(
            {slot.name: index for index, slot in enumerate(compiled.slots)},
            {slot.name: slot.convert for slot in compiled.slots},
        )

    def execute_rows(
        self, conn: Connection, keys: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Run an INSERT of rows of driver values for the columns `keys`, each row in the
        order of `layout(conn.dialect, keys)`."""
        if not rows:
            return
        compiled = self._compile(conn.dialect, dict.fromkeys(keys))
        if len(rows) == 1:
            _run(conn, compiled.sql, rows[0], many=False)
        else:
            _run(conn, compiled.sql, rows, many=True)

    def _compile(self, dialect: Dialect, params: Params) -> _Compiled:
        """The statement compiled for `dialect` (the statements are shared by every store of
        the process, whatever its database)."""
        key = (dialect.name, tuple(params) if self._insert else ())
        found = self._compiled.get(key)
        if found is None:
            found = self._compiled[key] = _compile(self.statement, dialect, key[1])
        return found


def _compile(statement: Executable, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
    """What SQLAlchemy works out for every execution, worked out once: the SQL text, each
    parameter's place and conversion (an INSERT for the columns `keys`), each column's."""
    assert dialect.paramstyle in ("qmark", "numeric_dollar"), "SQLite or asyncpg"
    assert isinstance(statement, ClauseElement)
    compiled = statement.compile(dialect=dialect, column_keys=list(keys) or None)
    assert isinstance(compiled, SQLCompiler)
    assert compiled.positiontup is not None, "both drivers bind parameters by position"
    slots = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if not bind.required:
            # A value written into the statement (`not_before=None`, a state): converted once.
            constant = bind.effective_value
            slots.append(_Slot(name, False, _converted(convert, constant), None, bind.expanding))
            continue
        given: _Convert = convert
        if convert is not None and _is_time(bind.type):
            given = _remembering(convert)
        slots.append(_Slot(name, True, None, given, bind.expanding))
    row = None
    if isinstance(statement, Select):
        columns = list(statement.selected_columns)
        converts = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        ]
        shape = namedtuple("Row", [column.key for column in columns])  # type: ignore[misc]
        row = _row_maker(shape, converts)
    return _Compiled(
        compiled.string,
        tuple(slots),
        any(slot.expanding for slot in slots),
        row,
        compiled,
        dialect.paramstyle == "numeric_dollar",
    )


def _converted(convert: _Convert, value: Any) -> Any:
    return value if convert is None else convert(value)


def _is_time(type_: TypeEngine[Any]) -> bool:
    """Whether values of `type_` are times (a decorated type counts as what it decorates)."""
    return isinstance(getattr(type_, "impl_instance", type_), DateTime)


_NOTHING = object()


def _remembering(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`convert` for times, remembering its last value: a write batch gives the same time
    (its `now`, or the same lease end) to many of the rows it writes, and each conversion costs
    about 2.4 us (SQLAlchemy's time zone step, then its text format on SQLite). An equal time is
    the same instant, which converts the same (the conversion is to UTC). The pair is replaced
    whole: reader threads share the statement."""
    last: list[tuple[Any, Any]] = [(_NOTHING, None)]

    def remembered(value: Any) -> Any:
        given, converted = last[0]
        if value is given or value == given:
            return converted
        converted = convert(value)
        last[0] = (value, converted)
        return converted

    return remembered


def _row_maker(shape: Any, converts: list[_Convert]) -> Callable[..., Any]:
    """A row of `shape` from the driver's values, converting only the columns that need it."""
    pairs = [(index, convert) for index, convert in enumerate(converts) if convert is not None]
    make = shape._make
    if not pairs:
        return make  # type: ignore[no-any-return]

    def converted(values: Sequence[Any]) -> Any:
        out = list(values)
        for index, convert in pairs:
            out[index] = convert(out[index])
        return make(out)

    return converted


def _values(slots: Sequence[_Slot], params: Params) -> list[Any]:
    """The driver's values for a statement without expanding parameters."""
    values = []
    for slot in slots:
        value = slot.value(params)
        values.append(value if slot.convert is None else slot.convert(value))
    return values


def _bind(compiled: _Compiled, params: Params) -> tuple[str, list[Any]]:
    """The SQL text with each expanding parameter given one parameter marker per value, and the
    values."""
    if not compiled.expanding:
        return compiled.sql, _values(compiled.slots, params)
    if compiled.numbered:
        return _bind_numbered(compiled, params)
    sql = compiled.sql
    values: list[Any] = []
    for slot in compiled.slots:
        value = slot.value(params)
        if not slot.expanding:
            values.append(value if slot.convert is None else slot.convert(value))
            continue
        items = list(value)
        sql = sql.replace(_EXPANDING.format(slot.name), ", ".join("?" * len(items)), 1)
        values.extend(items if slot.convert is None else [slot.convert(item) for item in items])
    return sql, values


def _bind_numbered(compiled: _Compiled, params: Params) -> tuple[str, list[Any]]:
    """`_bind` for `$n` parameters: SQLAlchemy's own expansion, once for each length of the
    lists, gives the text and the order of the values (it numbers the plain parameters first)."""
    given = [
        list(slot.value(params)) if slot.expanding else slot.value(params)
        for slot in compiled.slots
    ]
    lengths = tuple(
        len(value) for slot, value in zip(compiled.slots, given, strict=True) if slot.expanding
    )
    expansion = compiled.expansions.get(lengths)
    if expansion is None:
        expansion = compiled.expansions[lengths] = _expand(compiled, given)
    sql, places = expansion
    values = []
    for index, item in places:
        slot = compiled.slots[index]
        value = given[index] if item is None else given[index][item]
        values.append(value if slot.convert is None else slot.convert(value))
    return sql, values


def _expand(compiled: _Compiled, given: list[Any]) -> _Expansion:
    """SQLAlchemy's expansion for lists of these lengths, and where each of its parameters comes
    from: the values differ from call to call, the text and the order only with the lengths."""
    state = compiled.compiler.construct_expanded_state(
        {slot.name: value for slot, value in zip(compiled.slots, given, strict=True)},
        escape_names=False,
    )
    place: dict[str, tuple[int, int | None]] = {}
    for index, slot in enumerate(compiled.slots):
        if slot.expanding:
            for item, name in enumerate(state.parameter_expansion.get(slot.name, ())):
                place[name] = (index, item)
        else:
            place[slot.name] = (index, None)
    return state.statement, tuple(place[name] for name in state.positiontup or ())


def _run(conn: Connection, sql: str, values: Any, *, many: bool) -> Any:
    """Run on the transaction's own DBAPI connection; a driver error is handled as
    `Connection.execute` handles it: raised as SQLAlchemy's, and a connection found closed is
    invalidated, with every connection its pool opened before it (after a database restart
    they are all dead), so that no later transaction is given one."""
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None  # a connection inside a transaction is open
    cursor = dbapi_connection.cursor()
    try:
        if many:
            cursor.executemany(sql, values)
        else:
            cursor.execute(sql, values)
    except conn.dialect.loaded_dbapi.Error as error:
        conn._handle_dbapi_exception(error, sql, values, cursor, None)
    return cursor
