"""`messaging.writer.BatchWriter`: a group commit writes each message whose idempotency key is
free (or that has none) with its deliveries and callback events, and nothing of the others;
on PostgreSQL in one statement that also wakes the workers (NOTIFY at commit)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from clinicomm.delivery.outbox import Notifier
from clinicomm.delivery.records import DeliveryStatus, NewDelivery
from clinicomm.messaging.writer import BatchWriter, PendingWrite
from clinicomm.store.db import Database
from clinicomm.store.models import CallbackEvent, Delivery, IdempotencyKey, Message
from tests.conftest import BACKEND

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _item(
    message_id: str, key: str | None, *, deliveries: int = 1, callback: bool = False
) -> PendingWrite:
    rows = [
        NewDelivery(
            id=f"{message_id}-d{n}",
            message_id=message_id,
            clinic_id="c-1",
            channel="email",
            recipient="ciphertext",
            status=DeliveryStatus.QUEUED,
            fair_at=NOW,
            created_at=NOW,
        )
        for n in range(deliveries)
    ]
    return PendingWrite(
        message={
            "id": message_id,
            "clinic_id": "c-1",
            "category": "reminder",
            "content": b"sealed",
            "meta": {"appointmentId": "a-1"},
            "requested_by": "svc",
            "callback_url": None,
            "callback_opts": None,
            "created_at": NOW,
        },
        deliveries=rows,
        idempotency=None
        if key is None
        else {
            "scope": "c-1",
            "key": key,
            "request_hash": "h" * 64,
            "message_id": message_id,
            "response": {"id": message_id},
            "created_at": NOW,
            "expires_at": NOW + timedelta(days=1),
        },
        callbacks=[
            {
                "event_id": f"{message_id}-e",
                "delivery_id": f"{message_id}-d0",
                "message_id": message_id,
                "clinic_id": "c-1",
                "seq": 1,
                "status": "failed",
                "url": "https://cb.example/",
                "source": "clinic",
                "payload": {"status": "failed"},
            }
        ]
        if callback
        else [],
    )


async def _ids(db: Database, column: Any) -> set[str]:
    async with db.read() as session:
        return set((await session.execute(select(column))).scalars())


async def test_a_group_writes_the_messages_whose_key_is_free(db: Database) -> None:
    notifier = Notifier()
    writer = BatchWriter(db, notifier=notifier)
    try:
        assert await writer.write(_item("m-stored", "k-stored")) is True
        notifier.event.clear()
        group = [
            _item("m-a", "k-a", deliveries=2, callback=True),
            _item("m-a-again", "k-a"),  # the same key later in the group
            _item("m-none", None),  # no key: always written
            _item("m-stored-again", "k-stored"),  # the key was stored by an earlier commit
        ]
        assert await writer.write_group(group) == [True, False, True, False]
        assert notifier.event.is_set()
    finally:
        await writer.close()
    assert await _ids(db, Message.id) == {"m-stored", "m-a", "m-none"}
    assert await _ids(db, Delivery.id) == {"m-stored-d0", "m-a-d0", "m-a-d1", "m-none-d0"}
    assert await _ids(db, CallbackEvent.event_id) == {"m-a-e"}
    assert await _ids(db, IdempotencyKey.message_id) == {"m-stored", "m-a"}
    async with db.read() as session:
        stored = (await session.execute(select(Message).where(Message.id == "m-a"))).scalar_one()
        assert (stored.meta, stored.content, stored.requested_by) == (
            {"appointmentId": "a-1"},
            b"sealed",
            "svc",
        )
        event = (await session.execute(select(CallbackEvent))).scalar_one()
        assert (event.state, event.attempts, event.payload) == ("pending", 0, {"status": "failed"})


async def test_a_group_whose_keys_are_all_taken_writes_nothing(db: Database) -> None:
    notifier = Notifier()
    writer = BatchWriter(db, notifier=notifier)
    try:
        await writer.write(_item("m-1", "k-1"))
        notifier.event.clear()
        assert await writer.write_group([_item("m-2", "k-1"), _item("m-3", "k-1")]) == [
            False,
            False,
        ]
        assert not notifier.event.is_set()
    finally:
        await writer.close()
    async with db.read() as session:
        assert await session.scalar(select(func.count()).select_from(Delivery)) == 1


async def test_a_constraint_fails_only_its_own_group(db: Database) -> None:
    writer = BatchWriter(db)
    try:
        await writer.write(_item("m-1", None))
        # Two groups in one commit: the second repeats a message id (a primary key); the
        # batch fails, then each group is retried alone.
        results = await asyncio.gather(
            writer.write_group([_item("m-2", None)]),
            writer.write_group([_item("m-1", None)]),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert results[0] == [True]
    assert type(results[1]).__name__ == "IntegrityError"
    assert await _ids(db, Message.id) == {"m-1", "m-2"}


@pytest.mark.skipif(BACKEND != "postgres", reason="NOTIFY is PostgreSQL's")
async def test_postgresql_workers_are_woken_at_commit(db: Database) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    url = make_url(db.url).set(drivername="postgresql").render_as_string(hide_password=False)
    listener = await asyncpg.connect(url)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(Notifier.CHANNEL, lambda *args: heard.put_nowait(args[2]))
    writer = BatchWriter(db, notifier=Notifier())
    try:
        await writer.write(_item("m-1", "k-1", deliveries=3))
        assert await asyncio.wait_for(heard.get(), 5) == Notifier.CHANNEL
        await writer.write(_item("m-2", "k-1"))  # taken: nothing written, nobody woken
        await asyncio.sleep(0.2)
        assert heard.empty()
    finally:
        await writer.close()
        await listener.close()


@pytest.mark.skipif(BACKEND != "postgres", reason="SQLite stores any length and NUL")
async def test_a_refused_value_fails_only_its_own_group(db: Database) -> None:
    writer = BatchWriter(db)
    bad = _item("m-bad", None)
    bad.message["category"] = "x" * 61  # the column is VARCHAR(60): a DataError
    try:
        results = await asyncio.gather(
            writer.write_group([_item("m-good", None)]),
            writer.write_group([bad]),
            writer.write_group([_item("m-good-2", "k-2")]),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert results[0] == [True] and results[2] == [True]
    assert type(results[1]).__name__ == "DataError"
    assert await _ids(db, Message.id) == {"m-good", "m-good-2"}


async def test_a_caller_that_goes_away_does_not_undo_or_block_the_commit(db: Database) -> None:
    """The caller's wait is shielded: a cancelled request leaves its group to be committed
    (the rows were accepted for writing), and the groups beside it are answered as usual."""
    writer = BatchWriter(db)
    try:
        gone = asyncio.create_task(writer.write_group([_item("m-1", "k-1"), _item("m-2", None)]))
        stays = asyncio.create_task(writer.write_group([_item("m-3", "k-1")]))
        await asyncio.sleep(0)  # both queued, the commit not yet answered
        gone.cancel()
        assert await stays == [False]  # k-1 went to m-1, whose caller went away
        with pytest.raises(asyncio.CancelledError):
            await gone
    finally:
        await writer.close()
    assert await _ids(db, Message.id) == {"m-1", "m-2"}


async def test_an_error_of_the_commit_reaches_every_group_in_it(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = BatchWriter(db)

    async def down(*args: Any) -> Any:
        raise ConnectionError("database went away")

    monkeypatch.setattr(writer, "_commit", down)
    try:
        results = await asyncio.gather(
            writer.write_group([_item("m-1", None), _item("m-2", None)]),
            writer.write(_item("m-3", "k-1")),
            return_exceptions=True,
        )
    finally:
        await writer.close()
    assert [type(r).__name__ for r in results] == ["ConnectionError", "ConnectionError"]
