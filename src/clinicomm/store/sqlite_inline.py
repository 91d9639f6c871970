"""SQLite statements on the event loop's own thread; a wait for another writer in aiosqlite's.

aiosqlite runs every call of a connection (each execute, fetch, commit) on that connection's
thread and hands the answer back through the loop's self-pipe: two thread switches per call.
A SQLite statement of this service takes tens of microseconds, and the hand-off cost as much
again: in process, the accept path spent ~25 % and the worker ~15-25 % less CPU per message
with the calls made directly (`bench.pipeline_inproc`, bench/RESULTS.md).

Contract of `InlineConnection._execute` (the one method every aiosqlite call goes through):

- the call runs right away on the calling thread, with SQLite's busy timeout at 0, so it never
  sleeps holding the event loop;
- if SQLite answers SQLITE_BUSY (another connection holds the write lock: in this process
  that cannot happen, as writers take turns in `Database.writing`, so another process, a CLI
  command, a second worker), the same call runs again on the connection's thread with the
  busy timeout of `BUSY_TIMEOUT_MS`, as every call did before; the loop keeps serving while
  it waits. SQLITE_BUSY means the statement did nothing, so running it again is what
  SQLite's own busy handler does. SQLITE_BUSY_SNAPSHOT (a read transaction that would have
  to write over a newer snapshot) is never retried: waiting cannot help, as before.

What the loop gives up: while SQLite's C code runs, the loop's thread does nothing else (the
worker thread let Python run on the other core meanwhile). The service's statements are
short and bounded (retention and reads go in pages), so this is the cheaper side. A read
that scans many rows (statistics, the bounce-rate alert's count) goes to `Database.report`,
whose connections run each statement on their own thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import partial
from typing import Any

import aiosqlite

#: How long a call waits for another process's write lock (the busy timeout of the thread
#: path), in milliseconds. `store.db` used it for every connection before.
BUSY_TIMEOUT_MS = 30_000

_SQLITE_BUSY = 5
_SQLITE_BUSY_SNAPSHOT = 517


def is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or one of its extended codes that a wait can resolve (not BUSY_SNAPSHOT)."""
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # pragma: no cover - Python < 3.11
        return "database is locked" in str(exc)
    return code & 0xFF == _SQLITE_BUSY and code != _SQLITE_BUSY_SNAPSHOT


def _waiting(connection: sqlite3.Connection, call: Callable[[], Any]) -> Any:
    """`call` on the connection's thread with the busy timeout on, then off again."""
    connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    try:
        return call()
    finally:
        connection.execute("PRAGMA busy_timeout=0")


class InlineConnection(aiosqlite.Connection):
    """An aiosqlite connection whose calls run inline (module docstring)."""

    #: Calls that found the database locked and waited on the thread (tests read it).
    waited = 0

    async def _connect(self) -> InlineConnection:
        """Open the file inline too (microseconds; it takes no lock). On aiosqlite's thread, a
        task cancelled while connecting (a background sweep stopped at shutdown) left the
        thread to finish the connect and answer a loop that was closed by then."""
        if self._connection is None:
            self._connection = self._connector()
        return self

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
        InlineConnection.waited += 1
        call = partial(fn, *args, **kwargs)
        return await super()._execute(_waiting, self._connection, call)  # type: ignore[no-untyped-call]


def inline_connect(database: Any, **kwargs: Any) -> InlineConnection:
    """The `async_creator_fn` of SQLAlchemy's aiosqlite dialect: its arguments are what it
    would pass to `aiosqlite.connect` (the path, `check_same_thread=False`, `connect_args`)."""
    kwargs["timeout"] = 0  # the busy timeout of the inline calls (module docstring)
    connection = InlineConnection(partial(sqlite3.connect, database, **kwargs), 64)
    connection._thread.daemon = True  # as SQLAlchemy does for aiosqlite's own connections
    return connection
