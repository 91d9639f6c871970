"""Message contents (PHI) are erased after the retention period; the records stay."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import event, insert, select, update
from sqlalchemy.orm import Session

from clinicomm.delivery import worker as worker_module
from clinicomm.delivery.retention import purge_contents
from clinicomm.delivery.worker import Worker, WorkerOptions
from clinicomm.runtime import Runtime
from clinicomm.store.db import Database
from clinicomm.store.models import Delivery, IdempotencyKey, Message, utcnow
from tests.support.pipeline import create_clinic, wait_terminal


async def test_contents_are_erased_after_retention_and_records_kept(make_client) -> None:
    client = await make_client()
    await create_clinic(client, "clinic-ret", {})
    from tests.delivery.test_pipeline import email_request

    old = await client.send(email_request("clinic-ret"))
    new = await client.send(email_request("clinic-ret", to="other@example.com"))
    await wait_terminal(client, old.id)
    rt = client._rt()
    async with rt.db.session() as session:
        await session.execute(
            update(Message)
            .where(Message.id == old.id)
            .values(created_at=utcnow() - timedelta(days=31))
        )
    async with rt.db.session() as session:
        erased = await purge_contents(session, utcnow() - timedelta(days=30))
    assert erased == 1
    async with rt.db.read() as session:
        contents = dict((await session.execute(select(Message.id, Message.content))).all())
        deliveries = (
            await session.execute(select(Delivery.id).where(Delivery.message_id == old.id))
        ).all()
    assert contents[old.id] == b""
    assert contents[new.id] != b""
    assert len(deliveries) == 1  # the record of what was sent stays
    status = await client.get(old.id)
    assert status is not None and status["deliveries"][0]["status"] == "failed"  # no provider


async def _expired_keys_and_old_messages(db: Database, keys: int, messages: int) -> None:
    old = utcnow() - timedelta(days=31)
    async with db.session() as session:
        await session.execute(
            insert(Message),
            [
                {"id": f"m-{i}", "clinic_id": "c-1", "category": "x", "content": b"x",
                 "meta": {}, "created_at": old}
                for i in range(messages)
            ],
        )  # fmt: skip
        await session.execute(
            insert(IdempotencyKey),
            [
                {"scope": "c-1", "key": f"k-{i}", "request_hash": "h", "message_id": "m-0",
                 "response": {}, "created_at": old, "expires_at": old}
                for i in range(keys)
            ],
        )  # fmt: skip


async def test_a_retention_pass_works_in_bounded_batches(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sweep runs batch after batch, each in its own transaction, at most
    `RETENTION_BATCHES` a pass: what is left waits for the next pass."""
    monkeypatch.setattr(worker_module, "RETENTION_BATCH", 2)
    monkeypatch.setattr(worker_module, "RETENTION_BATCHES", 2)
    await _expired_keys_and_old_messages(runtime.db, keys=5, messages=3)
    worker = Worker.for_runtime(runtime, WorkerOptions())
    commits = 0

    def count(_session: object) -> None:
        nonlocal commits
        commits += 1

    event.listen(Session, "after_commit", count)
    try:
        assert await worker._retention(asyncio.Event()) == 3  # 2, then 1: all erased
    finally:
        event.remove(Session, "after_commit", count)
    async with runtime.db.read() as session:
        left = (await session.scalars(select(IdempotencyKey.key))).all()
    assert len(left) == 1  # 2 batches of 2 this pass
    # keys 2 + contents 2 + events 1 + audit 1 (each sweep stops at its first short batch)
    assert commits == 6
    assert await worker._retention(asyncio.Event()) == 0
    async with runtime.db.read() as session:
        assert (await session.scalars(select(IdempotencyKey.key))).all() == []
