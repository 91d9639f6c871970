"""`column IN (values)` whose SQL text does not depend on how many values there are.

An expanding IN renders one bound parameter per value, so every list length is a new
statement: SQLAlchemy renders (and on PostgreSQL casts) each placeholder on every call,
asyncpg prepares the new text (one more round trip), and PostgreSQL parses and plans it
again. On PostgreSQL `among_param` is `column = ANY($1)` with the values as one array
parameter: one text, prepared once per connection. SQLite has no arrays: there it is
`column IN (SELECT value FROM json_each(?))` with the values as one JSON array, so the text is
one too and `store.sqlite_raw` compiles it once (an expanding IN it cannot: it went through
the engine, ~150 µs more per statement); the IN over a subquery is still looked up in the
column's index.

Only for `store.fast`'s statements, whose connections plan every execution for its values
(`Database.fast_pool`): prepared once on a connection with PostgreSQL's default plan cache,
`= ANY($1)` got a generic plan made while the table was new and small, and kept its
sequential scan as the table grew.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, any_, bindparam, func, literal_column, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement


def among_param(column: Any, name: str, *, postgresql: bool | None) -> ColumnElement[bool]:
    """`column` is one of the list bound as `name` when the statement runs, for a statement
    built once per dialect (`store.fast`): True for PostgreSQL, False for SQLite, None for a
    statement that must run on either (the expanding IN, for a session)."""
    if postgresql:
        array: ColumnElement[bool] = column == any_(bindparam(name, type_=ARRAY(column.type)))
        return array
    if postgresql is None:
        expanding: ColumnElement[bool] = column.in_(bindparam(name, expanding=True))
        return expanding
    values = func.json_each(bindparam(name, type_=JSON()))
    in_: ColumnElement[bool] = column.in_(select(literal_column("value")).select_from(values))
    return in_
