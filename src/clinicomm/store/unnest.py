"""Many rows of one table as one array parameter per column (PostgreSQL, `store.fast`).

`INSERT INTO t (c1, …) SELECT … FROM unnest(CAST(:p_c1 AS T1[]), …) AS u(c1, …)`: the text
does not change with the number of rows, so asyncpg prepares it once per connection, and the
rows travel in one round trip. Several of these can be data-modifying CTEs of one statement,
which runs atomically outside a transaction (`store.fast.rows`).

`Unnest.params` makes each row what SQLAlchemy's own insert would have stored: a column the
row leaves out gets the model's Python-side default (`default=utcnow`, `default=dict`, …),
every value given goes through the column type's bind processor for the engine's dialect
(JSON is encoded with the engine's encoder; a JSON column's None given is JSON `null`), and a
column left out without a default is SQL NULL, as `Table.insert()` stores them.

Rows of one shape (a record type's `row()`) name the columns they all carry in `given`: only
those are unnested. Every other column is the same for every row of a statement, so it costs
nothing per row: one with a Python-side default is that default, bound once as a constant of
the `SELECT`, and one without is left out of the insert (SQL NULL, or its server default), as
`Table.insert()` leaves out a column no row gives. A delivery row carries 16 of the table's 27
columns: the other 11 were 5,500 array elements per 500-row batch, each filled, bound and
encoded on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Column, Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

_PG = postgresql.dialect()  # type: ignore[no-untyped-call]
_QUOTE = _PG.identifier_preparer.quote
_MISSING = object()
_Plan = tuple[str, str, "Callable[[], Any] | None", "Callable[[Any], Any] | None"]


@dataclass(frozen=True)
class Unnest:
    """The rows of `table` (every column but an autoincrement key, or the `given` ones) bound
    as arrays named `{prefix}_{column}`."""

    table: Table
    prefix: str
    #: The columns every row carries (module docstring); None: every column is unnested.
    given: tuple[str, ...] | None = None
    #: The unnested columns.
    columns: tuple[Column[Any], ...] = field(init=False)
    #: The columns not given that have a Python-side default: bound once per statement.
    constants: tuple[Column[Any], ...] = field(init=False)
    #: By dialect: each column's (parameter, name, default filler, bind processor).
    _plans: dict[int, tuple[_Plan, ...]] = field(init=False, default_factory=dict, compare=False)

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

    def param(self, column: str) -> str:
        """The bound name of `column`'s array."""
        return f"{self.prefix}_{column}"

    def rows_from(self, alias: str) -> str:
        """`unnest(…) AS alias(columns)`: the rows, to select from."""
        arrays = ", ".join(f"CAST(:{self.param(c.name)} AS {_array_of(c)})" for c in self.columns)
        names = ", ".join(_QUOTE(c.name) for c in self.columns)
        return f"unnest({arrays}) AS {alias}({names})"

    def insert(self, *, where: str = "", tail: str = "") -> str:
        """`INSERT INTO table (columns) SELECT u.columns FROM <rows> AS u [WHERE where] tail`
        (`tail`: ON CONFLICT, RETURNING)."""
        names = ", ".join(_QUOTE(c.name) for c in (*self.columns, *self.constants))
        chosen = ", ".join(
            [f"u.{_QUOTE(c.name)}" for c in self.columns]
            + [f"CAST(:{self.param(c.name)} AS {_type_of(c)})" for c in self.constants]
        )
        # Names from the table's metadata, quoted: no value is spliced into the text.
        sql = f"INSERT INTO {_QUOTE(self.table.name)} ({names}) SELECT {chosen} FROM "  # noqa: S608
        sql += self.rows_from("u")
        if where:
            sql += f" WHERE {where}"
        return f"{sql} {tail}".rstrip()

    def params(self, rows: Sequence[Mapping[str, Any]], dialect: Dialect) -> dict[str, Any]:
        """One array per unnested column, defaults filled and values bound for `dialect` (the
        engine's: its JSON encoder), and one value per constant column."""
        plan = self._plans.get(id(dialect))
        if plan is None:
            plan = tuple(
                (
                    self.param(c.name),
                    c.name,
                    _filler(c),
                    c.type.dialect_impl(dialect).bind_processor(dialect),
                )
                for c in (*self.columns, *self.constants)
            )
            self._plans[id(dialect)] = plan
        arrays: dict[str, Any] = {}
        for param, _name, fill, process in plan[len(self.columns) :]:
            assert fill is not None  # a constant column has a default
            value = fill()
            arrays[param] = value if process is None else process(value)
        for param, name, fill, process in plan[: len(self.columns)]:
            if self.given is not None:  # every row carries it (KeyError if one does not)
                if process is None:
                    arrays[param] = [row[name] for row in rows]
                else:
                    arrays[param] = [process(row[name]) for row in rows]
                continue
            if fill is None and process is None:  # most columns: the value, or NULL
                arrays[param] = [row.get(name) for row in rows]
                continue
            values: list[Any] = []
            for row in rows:
                value = row.get(name, _MISSING)
                if value is _MISSING:
                    if fill is None:  # left out, no default: NULL, not bound
                        values.append(None)
                        continue
                    value = fill()
                values.append(value if process is None else process(value))
            arrays[param] = values
        return arrays


def _array_of(column: Column[Any]) -> str:
    """The array type of `column`'s values, without a length: an explicit cast to VARCHAR(n)
    truncates silently, whereas the insert's own assignment to the column refuses a value too
    long (a `DataError`, as `Table.insert()` raises)."""
    return _type_of(column) + "[]"


def _type_of(column: Column[Any]) -> str:
    """`column`'s type without a length (`_array_of`)."""
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
