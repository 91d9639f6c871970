"""SQLite calls on the loop's thread (store/sqlite_inline.py): they run inline without a
busy timeout, and a write that finds another process holding the write lock waits on the
connection's thread (the loop keeps running) and then succeeds; a lock held past the busy
timeout is the same `database is locked` error as before."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from clinicomm.store import sqlite_inline
from clinicomm.store.db import Database
from clinicomm.store.sqlite_inline import InlineConnection, is_busy


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'inline.db'}")
    async with database.session() as session:
        await session.execute(text("CREATE TABLE t (x INTEGER)"))
    yield database
    await database.dispose()


def other_process_lock(path: Path) -> sqlite3.Connection:
    """A second connection (as another process would hold it) with the write lock taken."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (0)")
    return holder


async def test_calls_run_on_the_loops_thread_without_a_busy_timeout(db: Database) -> None:
    threads: list[int] = []
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        assert isinstance(raw.driver_connection, InlineConnection)
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 0
        await conn.run_sync(
            lambda sync: sync.connection.driver_connection._conn.create_function(
                "whose", 0, lambda: threads.append(threading.get_ident()) or 1
            )
        )
        assert (await conn.execute(text("SELECT whose()"))).scalar() == 1
    assert threads == [threading.get_ident()]


async def test_a_write_waits_for_another_process_lock_without_blocking_the_loop(
    db: Database, tmp_path: Path
) -> None:
    holder = other_process_lock(tmp_path / "inline.db")
    waited = InlineConnection.waited
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    asyncio.get_running_loop().call_later(0.5, holder.commit)
    try:
        async with db.session() as session:
            await session.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        ticker.cancel()
        holder.close()
    assert InlineConnection.waited == waited + 1
    assert ticks >= 20, "the event loop was blocked while the write waited"
    async with db.read() as session:
        assert (await session.execute(text("SELECT x FROM t ORDER BY x"))).scalars().all() == [
            0,
            1,
        ]


async def test_a_lock_held_past_the_busy_timeout_is_an_error(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_inline, "BUSY_TIMEOUT_MS", 200)
    holder = other_process_lock(tmp_path / "inline.db")
    try:
        with pytest.raises(OperationalError, match="database is locked"):
            async with db.session() as session:
                await session.execute(text("INSERT INTO t VALUES (1)"))
    finally:
        holder.rollback()
        holder.close()
    # The connection is usable again, with the inline busy timeout back at 0.
    async with db.session() as session:
        await session.execute(text("INSERT INTO t VALUES (2)"))
        assert (await session.execute(text("PRAGMA busy_timeout"))).scalar() == 0


def test_busy_snapshot_is_not_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "snap.db"
    a = sqlite3.connect(path, isolation_level=None, timeout=0)
    a.execute("PRAGMA journal_mode=WAL")
    a.execute("CREATE TABLE t (x)")
    b = sqlite3.connect(path, isolation_level=None, timeout=0)
    a.execute("BEGIN IMMEDIATE")
    a.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError) as locked:
        b.execute("INSERT INTO t VALUES (2)")
    assert is_busy(locked.value)
    b.execute("BEGIN")
    b.execute("SELECT * FROM t").fetchall()
    a.execute("COMMIT")
    with pytest.raises(sqlite3.OperationalError) as stale:
        b.execute("INSERT INTO t VALUES (3)")  # SQLITE_BUSY_SNAPSHOT: waiting cannot help
    assert not is_busy(stale.value)
    a.close()
    b.close()
