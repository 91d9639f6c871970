"""`column IN (values)` whose SQL text does not depend on how many values there are.

An expanding IN renders one bound parameter per value, so every list length is a new
statement: SQLAlchemy renders (and on PostgreSQL casts) each placeholder on every call,
asyncpg prepares the new text (one more round trip), and PostgreSQL parses and plans it
again. On PostgreSQL `among` is `column = ANY($1)` with the values as one array parameter:
one text, prepared and planned once per connection. SQLite has no arrays: there it is the
expanding IN (in process, without a server to re-plan, that costs little).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import any_, bindparam, literal
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement


def among(session: AsyncSession, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """`column` is one of `values`, for a statement run on `session`'s database."""
    wanted = list(values)
    if session.get_bind().dialect.name == "postgresql":
        result: ColumnElement[bool] = column == any_(literal(wanted, ARRAY(column.type)))
        return result
    in_: ColumnElement[bool] = column.in_(wanted)
    return in_


def among_param(column: Any, name: str, *, postgresql: bool) -> ColumnElement[bool]:
    """`among` with the values left to bind as `name` (a list) when the statement runs: for a
    statement built once per dialect (`store.fast`)."""
    if postgresql:
        array: ColumnElement[bool] = column == any_(bindparam(name, type_=ARRAY(column.type)))
        return array
    in_: ColumnElement[bool] = column.in_(bindparam(name, expanding=True))
    return in_
