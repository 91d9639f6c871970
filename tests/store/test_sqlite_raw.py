"""`store.sqlite_raw`: the same rows as the engine writes, the engine's errors, a wait for
another process's lock off the loop, and nothing half-written.

These run on a SQLite file of their own whatever `CLINICOMM_TEST_DB` is."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, select
from sqlalchemy.exc import IntegrityError

from clinicomm.delivery.outbox import write_flat
from clinicomm.delivery.records import Attempt, DeliveryStatus, Outcome
from clinicomm.store import fast
from clinicomm.store.db import Database
from clinicomm.store.models import Delivery, DeliveryAttempt, Message
from clinicomm.store.sqlite_raw import NotCompilable, Transaction

MESSAGES: Table = Message.__table__  # type: ignore[assignment]
DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]
ATTEMPTS: Table = DeliveryAttempt.__table__  # type: ignore[assignment]
INSERT_MESSAGES = MESSAGES.insert()
INSERT_DELIVERIES = DELIVERIES.insert()

AT = datetime(2026, 12, 3, 16, 30, 1, 250000, tzinfo=UTC)


def _message(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"m{i}",
        "clinic_id": "clinic-a",
        "category": "APPOINTMENT",
        "content": b"ciphertext",
        "created_at": AT,
        **extra,
    }


def _delivery(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"d{i}",
        "message_id": f"m{i}",
        "clinic_id": "clinic-a",
        "channel": "email",
        "recipient": "enc",
        "status": "queued",
        **extra,
    }


async def _file_db(template: Path, path: Path) -> Database:
    shutil.copy(template, path)
    # In WAL mode as the service's first connection leaves it (the migrated template is not).
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
    db = Database(f"sqlite+aiosqlite:///{path}")
    assert db.raw is not None
    return db


def _stored(path: Path, table: str) -> list[tuple[Any, ...]]:
    """The rows as stored (SQLite's own text), in id order."""
    with sqlite3.connect(path) as connection:
        return connection.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


@pytest.fixture
async def pair(sqlite_template: Path, tmp_path: Path) -> Any:
    """Two copies of a migrated file: one written by the engine, one by `sqlite_raw`."""
    engine_db = await _file_db(sqlite_template, tmp_path / "engine.db")
    raw_db = await _file_db(sqlite_template, tmp_path / "raw.db")
    yield engine_db, raw_db, tmp_path
    await engine_db.dispose()
    await raw_db.dispose()


async def test_inserts_store_the_same_text_as_the_engine(pair: Any) -> None:
    engine_db, raw_db, tmp_path = pair
    messages = [
        _message(1, meta={"a": "é", "n": 1}, callback_opts=None),
        _message(2, meta={}, callback_opts={"url": "x"}),
    ]
    deliveries = [
        _delivery(
            1, next_attempt_at=AT, fair_at=AT, created_at=AT, updated_at=AT, error={"reason": "x"}
        ),
        _delivery(2, next_attempt_at=AT, fair_at=AT, created_at=AT, updated_at=AT, error=None),
    ]
    async with engine_db.engine.begin() as conn:
        await conn.execute(MESSAGES.insert(), messages)
        await conn.execute(DELIVERIES.insert(), deliveries)

    def work(tx: Transaction) -> None:
        tx.insert(INSERT_MESSAGES, messages)
        tx.insert(INSERT_DELIVERIES, deliveries)

    async with raw_db.writing():
        assert raw_db.raw is not None
        await raw_db.raw.transaction(work)
    for table in ("messages", "deliveries"):
        assert _stored(tmp_path / "raw.db", table) == _stored(tmp_path / "engine.db", table)


async def test_python_side_defaults_are_applied(pair: Any) -> None:
    _, raw_db, _tmp_path = pair
    before = datetime.now(UTC).replace(tzinfo=None)

    def work(tx: Transaction) -> None:
        tx.insert(INSERT_MESSAGES, [_message(1)])
        tx.insert(INSERT_DELIVERIES, [_delivery(1)])  # timestamps and counters left out

    async with raw_db.writing():
        assert raw_db.raw is not None
        await raw_db.raw.transaction(work)
    rows = await fast.rows(raw_db, select(DELIVERIES), {}, writes=False)
    (row,) = rows
    assert row["attempts"] == 0 and row["chain_position"] == 0 and row["priority"] == 1
    assert isinstance(row["next_attempt_at"], datetime) and row["next_attempt_at"] >= before
    (message,) = await fast.rows(raw_db, select(MESSAGES), {}, writes=False)
    assert message["meta"] == {}


async def test_a_failed_statement_leaves_nothing_written(pair: Any) -> None:
    _, raw_db, tmp_path = pair

    def work(tx: Transaction) -> None:
        tx.insert(INSERT_MESSAGES, [_message(1)])
        tx.insert(INSERT_MESSAGES, [_message(1)])  # the same primary key

    async with raw_db.writing():
        assert raw_db.raw is not None
        with pytest.raises(IntegrityError) as raised:
            await raw_db.raw.transaction(work)
    assert "ciphertext" not in str(raised.value)  # no parameters in the error
    assert _stored(tmp_path / "raw.db", "messages") == []
    # The writer is usable again.
    async with raw_db.writing():
        await raw_db.raw.transaction(lambda tx: tx.insert(INSERT_MESSAGES, [_message(2)]))
    assert len(_stored(tmp_path / "raw.db", "messages")) == 1


async def test_a_lock_held_by_another_process_is_waited_for_off_the_loop(pair: Any) -> None:
    _, raw_db, tmp_path = pair
    other = sqlite3.connect(tmp_path / "raw.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    running = asyncio.create_task(ticker())

    async def write() -> None:
        async with raw_db.writing():
            assert raw_db.raw is not None
            await raw_db.raw.transaction(lambda tx: tx.insert(INSERT_MESSAGES, [_message(1)]))

    task = asyncio.create_task(write())
    await asyncio.sleep(0.3)
    assert not task.done() and ticks >= 10  # the loop kept running while it waited
    other.execute("COMMIT")
    await asyncio.wait_for(task, 10)
    running.cancel()
    other.close()
    assert raw_db.raw is not None and raw_db.raw.waited == 1
    assert len(_stored(tmp_path / "raw.db", "messages")) == 1


async def test_a_cancelled_wait_keeps_the_turn_until_the_thread_is_done(pair: Any) -> None:
    _, raw_db, tmp_path = pair
    other = sqlite3.connect(tmp_path / "raw.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def write(i: int) -> None:
        async with raw_db.writing():
            assert raw_db.raw is not None
            await raw_db.raw.transaction(lambda tx: tx.insert(INSERT_MESSAGES, [_message(i)]))

    first = asyncio.create_task(write(1))
    await asyncio.sleep(0.2)
    first.cancel()
    second = asyncio.create_task(write(2))
    await asyncio.sleep(0.2)
    assert not first.done() and not second.done()  # the turn is still the first's
    other.execute("COMMIT")
    other.close()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(first, 10)
    await asyncio.wait_for(second, 10)
    # The thread's transaction committed: its caller was cancelled, not its statements.
    assert [r[0] for r in _stored(tmp_path / "raw.db", "messages")] == ["m1", "m2"]


async def test_write_flat_writes_only_where_the_lease_is_held(pair: Any) -> None:
    _, raw_db, tmp_path = pair
    async with raw_db.engine.begin() as conn:
        await conn.execute(MESSAGES.insert(), [_message(1), _message(2)])
        await conn.execute(
            DELIVERIES.insert(),
            [
                _delivery(1, status="sending", lease_owner="w1"),
                _delivery(2, status="sending", lease_owner="w2"),
            ],
        )
    outcomes = [
        Outcome(
            delivery_id=d,
            status=DeliveryStatus.SENT,
            attempts=1,
            chain_position=0,
            provider_attempts=1,
            provider="sendgrid",
            provider_message_id=f"p-{d}",
            sent_at=AT,
        )
        for d in ("d1", "d2")
    ]
    attempts = [
        Attempt("d1", "sendgrid", "sent", None, 202, None, None, 12, AT),
    ]
    written = await write_flat(raw_db, owner="w1", now=AT, outcomes=outcomes, attempts=attempts)
    assert written.outcomes == 1 and written.lease_lost == ["d2"]
    rows = {r["id"]: r for r in await fast.rows(raw_db, select(DELIVERIES), {}, writes=False)}
    assert rows["d1"]["status"] == "sent" and rows["d1"]["lease_owner"] is None
    assert rows["d1"]["provider_message_id"] == "p-d1"
    assert rows["d2"]["status"] == "sending" and rows["d2"]["lease_owner"] == "w2"
    assert len(_stored(tmp_path / "raw.db", "delivery_attempts")) == 1


async def test_an_expanding_in_runs_through_the_engine(pair: Any) -> None:
    _, raw_db, _ = pair
    statement = select(MESSAGES.c.id).where(MESSAGES.c.id.in_(["m1", "m2"]))
    assert raw_db.raw is not None
    with pytest.raises(NotCompilable):
        raw_db.raw.statement(statement)
    async with raw_db.engine.begin() as conn:
        await conn.execute(MESSAGES.insert(), [_message(1)])
    assert [r["id"] for r in await fast.rows(raw_db, statement, {}, writes=False)] == ["m1"]


async def test_every_connection_has_the_same_settings(pair: Any) -> None:
    """The engine's connections and `sqlite_raw`'s writer and reader: WAL, synchronous
    NORMAL, foreign keys, secure delete, and a checkpoint per 10,000 WAL pages."""
    from sqlalchemy import text

    from clinicomm.store.db import WAL_AUTOCHECKPOINT_PAGES

    engine_db, _, _ = pair
    names = ("journal_mode", "synchronous", "foreign_keys", "secure_delete", "wal_autocheckpoint")
    expected = ["wal", 1, 1, 1, WAL_AUTOCHECKPOINT_PAGES]
    assert WAL_AUTOCHECKPOINT_PAGES == 10_000
    async with engine_db.engine.connect() as conn:
        seen = [(await conn.execute(text(f"PRAGMA {name}"))).scalar() for name in names]
    assert seen == expected
    raw = engine_db.raw
    assert raw is not None

    def settings(tx: Transaction) -> list[Any]:
        return [next(iter(tx._connection.execute(f"PRAGMA {n}").fetchone())) for n in names]

    async with engine_db.writing():
        assert await raw.transaction(settings) == expected
    reader = raw._connect()
    try:
        assert [reader.execute(f"PRAGMA {n}").fetchone()[0] for n in names] == expected
    finally:
        reader.close()
