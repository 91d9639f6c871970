"""The hot statements on PostgreSQL (the worker's, and the accept's group commit), straight
through asyncpg.

Measured on the bench machine (2 vCPU, PostgreSQL 15, one-row SELECT by id): an ORM
`Session.execute` costs ~525 µs of CPU, the same statement on a pooled asyncpg connection
~150 µs; at a few hundred messages a second the worker runs four statements per message, so
that overhead was most of its CPU. `rows` runs a SQLAlchemy Core statement compiled once for
the asyncpg dialect (its SQL text and the order of its parameters) on a connection of
`Database.fast_pool` (custom plans unless the statement's plan cannot depend on its values:
see there), outside a transaction: only for a statement that is atomic by itself. On a
SQLite file it runs the same statement on `store.sqlite_raw`'s connections (a write in a
transaction of its own, in the write turn), and on the engine's Core connections when it
cannot be compiled once (an expanding IN) or the file is busy for a read.

Errors are SQLAlchemy's, as the engine raises them (`_translated`), so callers and the API's
error table see one set: a constraint is an `IntegrityError`, a refused value a `DataError`,
a lost or refused connection an `OperationalError`, any other database error a `DBAPIError`.

Rows come back as mappings by column name. Values are the driver's: on PostgreSQL a JSON
column is its text (`json_value` decodes either form), timestamps are aware.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.sql import Executable

from clinicomm.store import sqlite_raw
from clinicomm.store.db import Database

_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]


_compiled: dict[int, tuple[Executable, _Compiled]] = {}
#: SQLite: statements `sqlite_raw` cannot compile once (an expanding IN), by id (module
#: constants, as in `_compiled`): they run on the engine's connections.
_engine_only: set[int] = set()


def _compile(statement: Executable) -> _Compiled:
    """`statement` compiled for asyncpg, once (kept while the statement object lives: the
    statements passed here are module constants)."""
    found = _compiled.get(id(statement))
    if found is not None and found[0] is statement:
        return found[1]
    compiled = statement.compile(dialect=_DIALECT)  # type: ignore[attr-defined]
    if "POSTCOMPILE" in str(compiled):
        raise ValueError("an expanding IN cannot be compiled once: use among_param")
    result = _Compiled(str(compiled), tuple(compiled.positiontup or ()), dict(compiled.params))
    _compiled[id(statement)] = (statement, result)
    return result


async def rows(
    db: Database,
    statement: Executable,
    params: Mapping[str, Any],
    *,
    writes: bool,
    custom_plans: bool = True,
) -> Sequence[Mapping[Any, Any]]:
    """The rows of ONE statement that is atomic by itself (see the module docstring). On
    SQLite a statement that `writes` runs in a write transaction with the write turn
    (`Database.writing`), a read on a connection of its own; both on the engine's Core
    connections. `custom_plans=False` only for a statement that reaches every table by an
    index and whose plan cannot depend on its values (the accept's inserts from arrays, the
    claim, the flat flush): one generic plan, see `Database.fast_pool`."""
    if db.raw is not None and id(statement) not in _engine_only:
        try:
            if writes:
                async with db.writing():
                    return await db.raw.transaction(lambda tx: tx.rows(statement, params))
            return db.raw.read(statement, params)
        except sqlite_raw.Busy:
            pass  # through the engine, whose connections wait on their threads
        except sqlite_raw.NotCompilable:
            _engine_only.add(id(statement))
    if db.is_sqlite:
        # A Core connection, not an ORM session: ~100-150 µs less per statement here.
        if writes:
            async with db.writing(), db.engine.begin() as conn:
                return (await conn.execute(statement, dict(params))).mappings().all()
        async with db.engine.connect() as conn:
            return (await conn.execute(statement, dict(params))).mappings().all()
    compiled = _compile(statement)
    values = {**compiled.defaults, **params}
    args = [values[name] for name in compiled.names]
    try:
        pool = await db.fast_pool(custom_plans=custom_plans)
        async with pool.acquire() as connection:
            result: Sequence[Mapping[Any, Any]] = await connection.fetch(compiled.sql, *args)
    except Exception as exc:
        translated = _translated(compiled.sql, exc)
        if translated is None:
            raise
        raise translated from exc
    return result


def _translated(sql: str, exc: Exception) -> sa_exc.DBAPIError | None:
    """asyncpg's error as the SQLAlchemy error the engine would raise; None: not the
    database's (a cancellation, a bug in the caller), raised as it is."""
    import asyncpg

    kind: type[sa_exc.DBAPIError]
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        kind = sa_exc.IntegrityError
    elif isinstance(exc, asyncpg.DataError):
        kind = sa_exc.DataError
    elif isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError | OSError):
        kind = sa_exc.OperationalError
    elif isinstance(exc, asyncpg.PostgresError):
        kind = sa_exc.DBAPIError
    else:
        return None
    # No parameters in the error: they may be a patient's data.
    return kind(sql, None, exc, hide_parameters=True)


def json_value(value: Any) -> Any:
    """A JSON column's value from `rows`: decoded on PostgreSQL, as it is on SQLite."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value
