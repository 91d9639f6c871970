"""The PostgreSQL pool (store/db.py): a connection in steady use is not pinged, one left idle
is pinged at checkout and replaced when the server dropped it, and reads run outside a
transaction (no BEGIN/ROLLBACK round trips)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from clinicomm.store import db as db_module
from clinicomm.store.db import Database

pytestmark = pytest.mark.postgres


def count_pings(db: Database) -> list[int]:
    dialect = db.engine.sync_engine.dialect
    original = dialect.do_ping
    pings: list[int] = []

    def counting(dbapi_connection: Any) -> bool:
        pings.append(1)
        return bool(original(dbapi_connection))

    dialect.do_ping = counting  # type: ignore[method-assign]
    return pings


async def test_a_connection_in_steady_use_is_not_pinged(database_url: str) -> None:
    db = Database(database_url)
    try:
        pings = count_pings(db)
        for _ in range(20):
            async with db.read() as session:
                assert await session.scalar(text("SELECT 1")) == 1
            async with db.session() as session:
                await session.execute(text("SELECT 1"))
        assert pings == []
    finally:
        await db.dispose()


async def test_an_idle_connection_the_server_dropped_is_replaced_at_checkout(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "IDLE_PING_SECONDS", 0.05)
    db, admin = Database(database_url), Database(database_url)
    try:
        pings = count_pings(db)
        async with db.read() as session:
            pid = await session.scalar(text("SELECT pg_backend_pid()"))
        async with admin.read() as session:
            assert await session.scalar(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        await asyncio.sleep(0.1)
        async with db.read() as session:  # the dead connection fails its ping: a new one
            assert await session.scalar(text("SELECT pg_backend_pid()")) != pid
        assert len(pings) == 1
    finally:
        await db.dispose()
        await admin.dispose()


async def test_reads_run_outside_a_transaction(database_url: str) -> None:
    """now() is the transaction's start: the same for two statements of one transaction, each
    statement's own in autocommit."""
    db = Database(database_url)
    try:
        async with db.read() as session:
            first = await session.scalar(text("SELECT now()"))
            await asyncio.sleep(0.02)
            assert await session.scalar(text("SELECT now()")) > first
        async with db.session() as session:
            first = await session.scalar(text("SELECT now()"))
            await asyncio.sleep(0.02)
            assert await session.scalar(text("SELECT now()")) == first
    finally:
        await db.dispose()
