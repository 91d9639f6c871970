"""Retention sweeps the worker's reaper runs: what identifies a patient in old messages,
deliveries and events; old audit entries; expired idempotency keys.

Each call handles at most `limit` rows and returns how many it did; the reaper runs each in
transactions of its own, batch after batch (`delivery.worker.RETENTION_BATCH`), so that no
sweep holds the write lock (and on SQLite the event loop) for long."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Select, delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.store.models import (
    AuditEntry,
    Delivery,
    DeliveryEventRecord,
    IdempotencyKey,
    Message,
)


async def purge_contents(session: AsyncSession, before: datetime, limit: int = 5000) -> int:
    """Erase what identifies a patient in messages accepted before `before` (the retention
    period): contents (title, body, HTML, template variables), metadata, and the encrypted
    address of their deliveries and of the webhook events about those deliveries.

    Kept: ids, statuses, providers, error classes, timestamps and the blind index, so
    statistics and opt-outs still work (an opt-out keeps its own encrypted address for as long
    as it stands). Returns the number of messages erased in this batch."""
    ids = list(
        (
            await session.scalars(
                select(Message.id)
                .where(Message.created_at < before, Message.content != b"")
                .limit(limit)
            )
        ).all()
    )
    if not ids:
        return 0
    await session.execute(update(Message).where(Message.id.in_(ids)).values(content=b"", meta={}))
    deliveries = select(Delivery.id).where(Delivery.message_id.in_(ids)).scalar_subquery()
    await session.execute(
        update(DeliveryEventRecord)
        .where(DeliveryEventRecord.delivery_id.in_(deliveries))
        .values(recipient_enc=None, payload={})
    )
    await session.execute(
        update(Delivery)
        .where(Delivery.message_id.in_(ids))
        .values(recipient="", fallback_address=None)
    )
    return len(ids)


async def purge_events(session: AsyncSession, before: datetime, limit: int = 5000) -> int:
    """Erase the encrypted address of webhook events received before `before` that match no
    delivery (inbound messages, reports about unknown ids); their blind index stays."""
    old = events_to_erase(before, limit).scalar_subquery()
    result = await session.execute(
        update(DeliveryEventRecord)
        .where(DeliveryEventRecord.id.in_(old))
        .values(recipient_enc=None, payload={})
    )
    return int(getattr(result, "rowcount", 0) or 0)


def events_to_erase(before: datetime, limit: int) -> Select[int]:
    """Up to `limit` events received before `before` whose address is still stored: read
    from `ix_delivery_events_retained`, which holds only those (every reaper pass runs it)."""
    return (
        select(DeliveryEventRecord.id)
        .where(
            DeliveryEventRecord.received_at < before,
            DeliveryEventRecord.recipient_enc.is_not(None),
        )
        .limit(limit)
    )


async def purge_audit(session: AsyncSession, before: datetime, limit: int = 5000) -> int:
    """Delete audit entries older than `before` (`CLINICOMM_AUDIT_RETENTION_DAYS`)."""
    old = select(AuditEntry.id).where(AuditEntry.at < before).limit(limit).scalar_subquery()
    result = await session.execute(delete(AuditEntry).where(AuditEntry.id.in_(old)))
    return int(getattr(result, "rowcount", 0) or 0)


async def purge_idempotency_keys(session: AsyncSession, now: datetime, limit: int = 5000) -> int:
    """Forget up to `limit` idempotency keys older than their 24 hours (the oldest first)."""
    expired = (
        select(IdempotencyKey.scope, IdempotencyKey.key)
        .where(IdempotencyKey.expires_at < now)
        .order_by(IdempotencyKey.expires_at)
        .limit(limit)
    )
    result = await session.execute(
        delete(IdempotencyKey).where(tuple_(IdempotencyKey.scope, IdempotencyKey.key).in_(expired))
    )
    return int(getattr(result, "rowcount", 0) or 0)
