"""The hot statements on SQLite, straight through the `sqlite3` module: SQLite's
counterpart of `store.fast`'s asyncpg path.

Measured on the bench machine (2 vCPU, a file database in WAL mode): a write transaction of
three one-row inserts costs ~400 µs of CPU through the async engine (greenlet switches,
pool checkout, execution context, result objects) and ~40 µs on a `sqlite3` connection. At a
few hundred messages a second every commit holds one or two messages, so that overhead was
most of the accept's and the claim's CPU.

`RawSqlite` keeps two connections of the database file beside the engine's pool:

- the **writer**, used only inside the process's write turn (`Database.writing`), so no
  other writer of this process contends; `transaction(work)` runs the synchronous `work`
  between `BEGIN IMMEDIATE` and `COMMIT` (`ROLLBACK` on any error) on the loop's thread;
- the **reader**, for single reads (`rows(..., writes=False)`), also on the loop's thread;

and, once the writer is opened, a `store.sqlite_checkpoint.Checkpointer`, which checkpoints
the WAL from a thread of its own so that commits on the loop's thread rarely do.

Contract, as `store.sqlite_inline` has for the engine's connections: a call never sleeps
holding the event loop. Both connections have a busy timeout of 0. When `BEGIN IMMEDIATE`
finds the file locked by another process (a CLI command, a second worker), the whole
transaction runs again on a thread with the busy timeout of `BUSY_TIMEOUT_MS`, still inside
the write turn, and the loop keeps serving; a cancelled caller waits for that thread to end
before it gives the turn back, so the writer connection is never used by two at once. A read
that finds the database busy (only during another process's WAL recovery) is run again
through the engine, whose connections wait on their own threads.

Statements are SQLAlchemy Core statements compiled once for the engine's SQLite dialect
(`Statement`), so the SQL text is the same as the engine would send, values go through the
same bind processors (timestamps, JSON) and result values through the same result
processors; an insert's Python-side column defaults (`default=utcnow`, …) are applied as the
engine does for every column a row leaves out. Errors are SQLAlchemy's, as `store.fast`
raises them: a constraint is an `IntegrityError`, a refused value a `DataError` (neither
carries the parameters: they may be a patient's data).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import Executable

from clinicomm.store.sqlite_checkpoint import Checkpointer
from clinicomm.store.sqlite_inline import BUSY_TIMEOUT_MS, is_busy

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Statement:
    """One Core statement compiled for SQLite: its text, how to build its positional
    parameters from a mapping, and how to read its result rows."""

    sql: str
    #: Per positional parameter: its name, its bind processor (or None), and for an insert's
    #: column with a Python-side default, that default (called when a row has no value).
    binds: tuple[tuple[str, Callable[[Any], Any] | None, Callable[[], Any] | None], ...]
    #: The compiled statement's own values (literals in its WHERE clause, and so on).
    fixed: Mapping[str, Any]
    #: Result columns: their key and result processor (or None).
    columns: tuple[tuple[str, Callable[[Any], Any] | None], ...]

    def args(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, process, default in self.binds:
            if name in values:
                value = values[name]
            elif default is not None:
                value = default()
            else:
                value = self.fixed[name]
            out.append(value if process is None else process(value))
        return tuple(out)

    def read(self, cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
        """The cursor's rows as mappings by column key, values processed as the engine's.
        A textual statement has no typed columns: its rows are as the driver gives them."""
        found = cursor.fetchall()
        if not found:
            return []
        columns = self.columns or tuple((d[0], None) for d in cursor.description)
        return [
            {
                key: (value if process is None else process(value))
                for (key, process), value in zip(columns, row, strict=True)
            }
            for row in found
        ]


def compile_for(statement: Executable, dialect: Dialect, keys: Iterable[str] = ()) -> Statement:
    """`statement` compiled for `dialect` (SQLite). For an insert, `keys` are the columns the
    rows give; the other columns with a Python-side default get it."""
    compiled = statement.compile(  # type: ignore[attr-defined]
        dialect=dialect, column_keys=sorted(keys) or None
    )
    if "POSTCOMPILE" in compiled.string:
        raise NotCompilable("an expanding IN cannot be compiled once")
    if getattr(compiled, "update_prefetch", None):
        raise NotCompilable("a column's Python-side onupdate is not carried")
    processors = compiled._bind_processors
    defaults: dict[str, Callable[[], Any]] = {}
    for column in getattr(compiled, "insert_prefetch", ()):
        default = column.default
        if default is None or not (default.is_scalar or default.is_callable):
            raise NotCompilable(f"column {column.key}: only scalar and callable defaults")
        if default.is_callable:
            defaults[column.key] = _caller(default.arg)
        else:
            defaults[column.key] = _constant(default.arg)
    names = tuple(compiled.positiontup or ())
    binds = tuple((name, processors.get(name), defaults.get(name)) for name in names)
    columns = tuple(
        (entry[0], entry[3]._cached_result_processor(dialect, None))
        for entry in compiled._result_columns
    )
    return Statement(compiled.string, binds, dict(compiled.params), columns)


def _caller(arg: Callable[[Any], Any]) -> Callable[[], Any]:
    return lambda: arg(None)  # SQLAlchemy's wrapper of a zero-argument default ignores it


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


class Transaction:
    """What `RawSqlite.transaction`'s `work` is given: statements on the writer, in the
    transaction."""

    def __init__(self, raw: RawSqlite, connection: sqlite3.Connection) -> None:
        self._raw = raw
        self._connection = connection

    def rows(self, statement: Executable, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run `statement` once; its result rows (none for a statement without any)."""
        compiled = self._raw.statement(statement, params.keys())
        return compiled.read(self._connection.execute(compiled.sql, compiled.args(params)))

    def insert(self, statement: Executable, rows: Sequence[Mapping[str, Any]]) -> None:
        """`statement` (an insert without RETURNING) once per row, as one `executemany` per
        set of keys the rows give."""
        groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row), []).append(row)
        for keys, group in groups.items():
            compiled = self._raw.statement(statement, keys)
            self._connection.executemany(compiled.sql, [compiled.args(row) for row in group])


class RawSqlite:
    """The writer and reader connections of one SQLite file (module docstring)."""

    def __init__(
        self, path: str, dialect: Dialect, pragmas: Callable[[sqlite3.Connection], None]
    ) -> None:
        self.path = path
        self.dialect = dialect
        self._pragmas = pragmas
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._compiled: dict[tuple[int, tuple[str, ...]], tuple[Executable, Statement]] = {}
        #: Transactions that found the file locked and ran on a thread (tests read it).
        self.waited = 0
        #: Started with the writer: this process writes the file, so it checkpoints it.
        self.checkpointer = Checkpointer(path)

    def statement(self, statement: Executable, keys: Iterable[str] = ()) -> Statement:
        """`statement` compiled once (kept while the statement object lives: the ones passed
        here are module constants)."""
        key = (id(statement), tuple(sorted(keys)))
        found = self._compiled.get(key)
        if found is not None and found[0] is statement:
            return found[1]
        compiled = compile_for(statement, self.dialect, key[1])
        self._compiled[key] = (statement, compiled)
        return compiled

    def _connect(self, timeout: float = 0) -> sqlite3.Connection:
        """A connection with the engine's settings (`PRAGMA journal_mode` needs the file
        unlocked: `timeout` seconds of waiting for it), then a busy timeout of 0."""
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=timeout
        )
        try:
            self._pragmas(connection)
            connection.execute("PRAGMA busy_timeout=0")
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect_now(self) -> sqlite3.Connection:
        """`_connect` without waiting: `_Busy` when the file is locked."""
        try:
            return self._connect()
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise _Busy from exc
            raise _translated("PRAGMA journal_mode=WAL", exc) from exc

    async def transaction(self, work: Callable[[Transaction], T]) -> T:
        """`work` in one write transaction on the writer. Call only inside the write turn
        (`Database.writing`)."""
        try:
            if self._writer is None:
                self._writer = self._connect_now()
                self.checkpointer.start()
            return _run(self._writer, Transaction(self, self._writer), work)
        except _Busy:
            pass
        self.waited += 1
        return await _off_loop(self._waiting, work)

    def _waiting(self, work: Callable[[Transaction], T]) -> T:
        """`transaction` on a thread, waiting up to `BUSY_TIMEOUT_MS` for another process's
        lock (to open the writer too), with the busy timeout off again after."""
        if self._writer is None:
            try:
                self._writer = self._connect(BUSY_TIMEOUT_MS / 1000)
            except sqlite3.DatabaseError as exc:
                raise _translated("PRAGMA journal_mode=WAL", exc) from exc
            self.checkpointer.start()
        connection = self._writer
        connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            return _run(connection, Transaction(self, connection), work)
        except _Busy as exc:  # still locked after the timeout
            raise _translated("BEGIN IMMEDIATE", exc.__cause__ or exc) from exc
        finally:
            connection.execute("PRAGMA busy_timeout=0")

    def read(self, statement: Executable, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One read statement's rows on the reader. Raises `Busy` when the database is busy
        (the caller reads through the engine instead)."""
        compiled = self.statement(statement)
        if self._reader is None:
            try:
                self._reader = self._connect_now()
            except _Busy as exc:
                raise Busy from exc
        try:
            return compiled.read(self._reader.execute(compiled.sql, compiled.args(params)))
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise Busy from exc
            raise _translated(compiled.sql, exc) from exc
        except sqlite3.DatabaseError as exc:
            raise _translated(compiled.sql, exc) from exc

    def close(self) -> None:
        self.checkpointer.stop()
        for connection in (self._writer, self._reader):
            if connection is not None:
                connection.close()
        self._writer = self._reader = None


class NotCompilable(ValueError):
    """A statement this module cannot run as the engine would: its text depends on its
    values (an expanding IN), or a column's default or onupdate is computed otherwise."""


class Busy(Exception):
    """The database was busy for a read (`RawSqlite.read`)."""


class _Busy(Exception):
    """BEGIN IMMEDIATE found the file locked: nothing ran."""


def _run(connection: sqlite3.Connection, tx: Transaction, work: Callable[[Transaction], T]) -> T:
    try:
        connection.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            raise _Busy from exc
        raise _translated("BEGIN IMMEDIATE", exc) from exc
    try:
        result = work(tx)
        connection.execute("COMMIT")
    except BaseException as exc:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        if isinstance(exc, sqlite3.DatabaseError):
            raise _translated("", exc) from exc
        raise
    return result


async def _off_loop(
    call: Callable[[Callable[[Transaction], T]], T], work: Callable[[Transaction], T]
) -> T:
    """`call(work)` on a thread. A cancelled caller still waits for the thread (which holds
    the writer) before it goes on, so the write turn is not given back while it runs."""
    future = asyncio.get_running_loop().run_in_executor(None, call, work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def _translated(sql: str, exc: BaseException) -> sa_exc.DBAPIError:
    """`sqlite3`'s error as the SQLAlchemy error the engine raises for it."""
    kind: type[sa_exc.DBAPIError]
    if isinstance(exc, sqlite3.IntegrityError):
        kind = sa_exc.IntegrityError
    elif isinstance(exc, sqlite3.DataError):
        kind = sa_exc.DataError
    elif isinstance(exc, sqlite3.OperationalError):
        kind = sa_exc.OperationalError
    else:
        kind = sa_exc.DBAPIError
    return kind(sql, None, exc, hide_parameters=True)
