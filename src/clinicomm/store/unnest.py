"""Many rows of one table as ONE JSON parameter (PostgreSQL, `store.fast`).

`INSERT INTO t (c1, …) SELECT u.c1, … FROM json_to_recordset(CAST(:p_rows AS JSON)) AS u(c1
T1, …)`: the text does not change with the number of rows, so asyncpg prepares it once per
connection, and the rows travel in one round trip. Several of these can be data-modifying
CTEs of one statement, which runs atomically outside a transaction (`store.fast.rows`).

Why JSON and not one array per column (`unnest(CAST(:p_c1 AS T1[]), …)`, what this module
bound until Dec 2026): asyncpg encodes an array element by element in Python-level code (an
`isinstance` against `collections.abc` per element, a datetime split into fields), ~0.4 µs
per text, ~0.8 µs per timestamp here. A 500-row delivery batch was 8,000 elements and ~3.5-4.5
ms of the client's CPU; orjson writes the same rows in ~0.5 ms and PostgreSQL's recordset
reader takes them at about the arrays' server time (bench/RESULTS.md, Dec 6). The class keeps
its name: it is still "rows as one parameter, unnested by the server".

`Unnest.params` makes each row what SQLAlchemy's own insert would have stored: a column the
row leaves out gets the model's Python-side default (`default=utcnow`, `default=dict`, …),
every value given goes through the column type's bind processor for the engine's dialect
(JSON is encoded with the engine's encoder; a JSON column's None given is JSON `null`), and a
column left out without a default is SQL NULL, as `Table.insert()` leaves it out. In the
recordset a JSON column travels as its encoded text (cast back to JSON by the insert: JSON
`null` stays JSON `null`, it does not become SQL NULL) and a binary column as base64 (decoded
by the insert); a naive timestamp is read as UTC, as the project writes them; a string with a
NUL is refused by the server (a `DataError`, as with arrays).

Rows of one shape (a record type's `row()`) name the columns they all carry in `given`: only
those travel per row. Every other column is the same for every row of a statement, so it
costs nothing per row: one with a Python-side default is that default, bound once as a
constant of the `SELECT`, and one without is left out of the insert (SQL NULL, or its server
default), as `Table.insert()` leaves out a column no row gives.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import JSON, Column, LargeBinary, Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

_PG = postgresql.dialect()  # type: ignore[no-untyped-call]
_QUOTE = _PG.identifier_preparer.quote
_MISSING = object()
#: (name, default filler, encoder): how a column's value becomes its recordset value.
_Plan = tuple[str, "Callable[[], Any] | None", "Callable[[Any], Any] | None"]
_ORJSON = orjson.OPT_NAIVE_UTC


@dataclass(frozen=True)
class Unnest:
    """The rows of `table` (every column but an autoincrement key, or the `given` ones) bound
    as one JSON array of objects named `{prefix}_rows`; constants as `{prefix}_{column}`."""

    table: Table
    prefix: str
    #: The columns every row carries (module docstring); None: every column travels per row.
    given: tuple[str, ...] | None = None
    #: The columns that travel per row.
    columns: tuple[Column[Any], ...] = field(init=False)
    #: The columns not given that have a Python-side default: bound once per statement.
    constants: tuple[Column[Any], ...] = field(init=False)
    #: By dialect: the per-row columns' plans, and the constants' (parameter, filler, bind).
    _plans: dict[int, tuple[tuple[_Plan, ...], tuple[_Plan, ...]]] = field(
        init=False, default_factory=dict, compare=False
    )

    def __post_init__(self) -> None:
        skip = self.table.autoincrement_column
        every = tuple(c for c in self.table.columns if c is not skip)
        if self.given is None:
            object.__setattr__(self, "columns", every)
            object.__setattr__(self, "constants", ())
            return
        unknown = set(self.given) - {c.name for c in every}
        if unknown:
            raise ValueError(f"{self.table.name} has no column {sorted(unknown)}")
        object.__setattr__(self, "columns", tuple(c for c in every if c.name in self.given))
        object.__setattr__(
            self,
            "constants",
            tuple(c for c in every if c.name not in self.given and c.default is not None),
        )

    @property
    def rows_param(self) -> str:
        """The bound name of the rows' JSON."""
        return f"{self.prefix}_rows"

    def param(self, column: str) -> str:
        """The bound name of constant `column`'s value."""
        return f"{self.prefix}_{column}"

    def rows_from(self, alias: str, only: Sequence[str] | None = None) -> str:
        """`json_to_recordset(…) AS alias(columns)`: the rows, to select from (`only`: just
        those columns, as they travel: a JSON column as text, a binary one as base64)."""
        chosen = [c for c in self.columns if only is None or c.name in only]
        names = ", ".join(f"{_QUOTE(c.name)} {_carried_as(c)}" for c in chosen)
        return f"json_to_recordset(CAST(:{self.rows_param} AS JSON)) AS {alias}({names})"

    def insert(self, *, where: str = "", tail: str = "") -> str:
        """`INSERT INTO table (columns) SELECT u.columns FROM <rows> AS u [WHERE where] tail`
        (`tail`: ON CONFLICT, RETURNING)."""
        names = ", ".join(_QUOTE(c.name) for c in (*self.columns, *self.constants))
        chosen = ", ".join(
            [_read(c, "u") for c in self.columns]
            + [f"CAST(:{self.param(c.name)} AS {_type_of(c)})" for c in self.constants]
        )
        # Names from the table's metadata, quoted: no value is spliced into the text.
        sql = f"INSERT INTO {_QUOTE(self.table.name)} ({names}) SELECT {chosen} FROM "  # noqa: S608
        sql += self.rows_from("u")
        if where:
            sql += f" WHERE {where}"
        return f"{sql} {tail}".rstrip()

    def params(self, rows: Sequence[Mapping[str, Any]], dialect: Dialect) -> dict[str, Any]:
        """The rows as one JSON text (defaults filled, values bound for `dialect`: the
        engine's JSON encoder), and one value per constant column."""
        found = self._plans.get(id(dialect))
        if found is None:
            found = (
                tuple((c.name, _filler(c), _encoder(c, dialect)) for c in self.columns),
                tuple((self.param(c.name), _filler(c), _bind(c, dialect)) for c in self.constants),
            )
            self._plans[id(dialect)] = found
        per_row, constants = found
        bound: dict[str, Any] = {}
        for param, fill, process in constants:
            assert fill is not None  # a constant column has a default
            value = fill()
            bound[param] = value if process is None else process(value)
        if self.given is not None:  # every row carries each (KeyError if one does not)
            records: Sequence[Any] = _given(rows, per_row)
        else:
            records = [_record(row, per_row) for row in rows]
        bound[self.rows_param] = records_json(records)
        return bound


def records_json(records: Sequence[Mapping[str, Any]]) -> str:
    """Rows as the JSON text a `json_to_recordset` parameter takes (orjson; a naive datetime
    as UTC). For a statement's own recordset of values already bound (`outbox._FLAT`)."""
    return orjson.dumps(records, option=_ORJSON).decode()


def _given(rows: Sequence[Mapping[str, Any]], plan: tuple[_Plan, ...]) -> list[Mapping[str, Any]]:
    """Rows that carry every column of `plan`. A row that carries those alone travels as it
    is when none needs encoding, else as a copy with the encoded values; any other row as a
    copy of those columns (a KeyError when it lacks one)."""
    names = {name for name, _fill, _encode in plan}
    encoded = [(name, encode) for name, _fill, encode in plan if encode is not None]
    records: list[Mapping[str, Any]] = []
    for row in rows:
        if row.keys() != names:
            records.append(
                {name: row[name] if enc is None else enc(row[name]) for name, _f, enc in plan}
            )
        elif not encoded:
            records.append(row)
        else:
            record = dict(row)
            for name, encode in encoded:
                record[name] = encode(record[name])
            records.append(record)
    return records


def _record(row: Mapping[str, Any], plan: tuple[_Plan, ...]) -> dict[str, Any]:
    """One row with every column: its value, the default, or None (NULL) when left out."""
    record: dict[str, Any] = {}
    for name, fill, encode in plan:
        value = row.get(name, _MISSING)
        if value is _MISSING:
            if fill is None:  # left out, no default: NULL
                record[name] = None
                continue
            value = fill()
        record[name] = value if encode is None else encode(value)
    return record


def _is_json(column: Column[Any]) -> bool:
    return isinstance(column.type, JSON)


def _is_binary(column: Column[Any]) -> bool:
    return isinstance(column.type, LargeBinary)


def _carried_as(column: Column[Any]) -> str:
    """The type the recordset reads `column`'s value as: JSON as its text, binary as base64
    text, anything else as the column's own type without a length (an explicit cast to
    VARCHAR(n) would truncate silently, where the insert's own assignment refuses a value too
    long: a `DataError`, as `Table.insert()` raises)."""
    return "TEXT" if _is_json(column) or _is_binary(column) else _type_of(column)


def _read(column: Column[Any], alias: str) -> str:
    """`column`'s value as the insert stores it, from the recordset `alias`."""
    value = f"{alias}.{_QUOTE(column.name)}"
    if _is_json(column):
        return f"CAST({value} AS {_type_of(column)})"
    if _is_binary(column):
        return f"decode({value}, 'base64')"
    return value


def _bind(column: Column[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    return column.type.dialect_impl(dialect).bind_processor(dialect)


def _encoder(column: Column[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    """How a value of `column` becomes its recordset value: the bind processor, then base64
    for binary; None: the value as it is (orjson writes it)."""
    process = _bind(column, dialect)
    if _is_json(column) and process is not None:
        null = process(None)  # JSON null's text, worked out once (most rows give None)
        json_process = process

        def encode_json(value: Any) -> Any:
            return null if value is None else json_process(value)

        return encode_json
    if not _is_binary(column):
        return process

    def encode(value: Any) -> Any:
        if process is not None:
            value = process(value)
        return None if value is None else binascii.b2a_base64(value, newline=False).decode()

    return encode


def _type_of(column: Column[Any]) -> str:
    """`column`'s type without a length (`_carried_as`)."""
    return re.sub(r"\(.*?\)", "", column.type.compile(dialect=_PG))


def _filler(column: Column[Any]) -> Callable[[], Any] | None:
    """How a row that leaves `column` out gets its value: the model's Python-side default;
    None for a column without one (SQL NULL, as `Table.insert()` leaves it out)."""
    default = column.default
    if default is None:
        return None
    if default.is_callable:
        arg = default.arg  # type: ignore[attr-defined]  # wrapped by SQLAlchemy: takes a context
        return lambda: arg(None)
    if default.is_scalar:
        scalar = default.arg  # type: ignore[attr-defined]
        return lambda: scalar
    raise ValueError(f"{column.table.name}.{column.name}: a default Unnest cannot compute")
