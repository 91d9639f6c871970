"""The deliveries table as a queue: claim due rows with a lease, write results in batches.

Claims are one `UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING …`; on PostgreSQL the inner
select takes `FOR UPDATE SKIP LOCKED`, so any number of worker processes claim disjoint
batches. SQLite serialises writers, so the same statement is atomic there too. A lease that
expires (its worker died) is put back in the queue by `reap_expired`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.messaging.models import DeliveryStatus
from clinicomm.store.models import (
    AuditEntry,
    Delivery,
    DeliveryAttempt,
    DeliveryEventRecord,
    IdempotencyKey,
    Message,
    aware,
)

_T: Table = Delivery.__table__  # type: ignore[assignment]
_ATTEMPTS: Table = DeliveryAttempt.__table__  # type: ignore[assignment]
_RETURNING = (
    _T.c.id,
    _T.c.message_id,
    _T.c.clinic_id,
    _T.c.channel,
    _T.c.recipient,
    _T.c.recipient_index,
    _T.c.chain_position,
    _T.c.provider_attempts,
    _T.c.attempts,
    _T.c.created_at,
    _T.c.error,
    _T.c.parent_id,
)


@dataclass(slots=True)
class Claimed:
    """A delivery this worker holds a lease on."""

    id: str
    message_id: str
    clinic_id: str | None
    channel: str
    #: The address: as stored (ciphertext) when claimed; in clear once the worker revealed it
    #: (`Worker._handle`), for the adapter only.
    recipient: str
    chain_position: int
    provider_attempts: int
    attempts: int
    created_at: datetime
    errors: list[dict[str, Any]]
    parent_id: str | None
    #: Blind index of the address: suppressions and the WhatsApp window are looked up by it.
    recipient_index: str | None = None
    #: The address as stored (encrypted): copied into a channel fallback and an opt-out.
    sealed: str = ""


async def claim(
    session: AsyncSession, *, owner: str, limit: int, now: datetime, lease: timedelta
) -> list[Claimed]:
    """Lease up to `limit` due deliveries to `owner`, in fair order (see `FairClock`)."""
    due = (
        select(_T.c.id)
        .where(_T.c.status == DeliveryStatus.QUEUED.value, _T.c.next_attempt_at <= now)
        .order_by(_T.c.fair_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    statement = (
        _T.update()
        .where(_T.c.id.in_(due.scalar_subquery()))
        .values(
            status=DeliveryStatus.SENDING.value,
            lease_until=now + lease,
            lease_owner=owner,
            updated_at=now,
        )
        .returning(*_RETURNING)
    )
    rows = (await session.execute(statement)).all()
    return [
        Claimed(
            id=row.id,
            message_id=row.message_id,
            clinic_id=row.clinic_id,
            channel=row.channel,
            recipient=row.recipient,
            recipient_index=row.recipient_index,
            sealed=row.recipient,
            chain_position=row.chain_position,
            provider_attempts=row.provider_attempts,
            attempts=row.attempts,
            created_at=aware(row.created_at),
            errors=list((row.error or {}).get("errors", [])),
            parent_id=row.parent_id,
        )
        for row in rows
    ]


async def reap_expired(session: AsyncSession, now: datetime) -> int:
    """Put deliveries whose lease expired (their worker died) back in the queue."""
    result = await session.execute(
        update(Delivery)
        .where(Delivery.status == DeliveryStatus.SENDING.value, Delivery.lease_until < now)
        .values(status=DeliveryStatus.QUEUED.value, lease_owner=None, lease_until=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


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
        update(Delivery).where(Delivery.message_id.in_(ids)).values(recipient="")
    )
    return len(ids)


async def purge_events(session: AsyncSession, before: datetime, limit: int = 5000) -> int:
    """Erase the encrypted address of webhook events received before `before` that match no
    delivery (inbound messages, reports about unknown ids); their blind index stays."""
    old = (
        select(DeliveryEventRecord.id)
        .where(
            DeliveryEventRecord.received_at < before,
            DeliveryEventRecord.recipient_enc.is_not(None),
        )
        .limit(limit)
        .scalar_subquery()
    )
    result = await session.execute(
        update(DeliveryEventRecord)
        .where(DeliveryEventRecord.id.in_(old))
        .values(recipient_enc=None, payload={})
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def purge_audit(session: AsyncSession, before: datetime, limit: int = 5000) -> int:
    """Delete audit entries older than `before` (`CLINICOMM_AUDIT_RETENTION_DAYS`)."""
    old = select(AuditEntry.id).where(AuditEntry.at < before).limit(limit).scalar_subquery()
    result = await session.execute(delete(AuditEntry).where(AuditEntry.id.in_(old)))
    return int(getattr(result, "rowcount", 0) or 0)


async def purge_idempotency_keys(session: AsyncSession, now: datetime) -> int:
    """Forget idempotency keys older than their 24 hours."""
    result = await session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at < now))
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(slots=True)
class Outcome:
    """The new state of one delivery after this worker handled it."""

    delivery_id: str
    status: DeliveryStatus
    attempts: int
    chain_position: int = 0
    provider_attempts: int = 0
    next_attempt_at: datetime | None = None
    provider: str | None = None
    provider_message_id: str | None = None
    error: dict[str, Any] | None = None
    sent_at: datetime | None = None


_APPLY = (
    _T.update()
    .where(_T.c.id == bindparam("b_id"), _T.c.lease_owner == bindparam("b_owner"))
    .values(
        status=bindparam("b_status"),
        attempts=bindparam("b_attempts"),
        chain_position=bindparam("b_position"),
        provider_attempts=bindparam("b_provider_attempts"),
        next_attempt_at=bindparam("b_next"),
        fair_at=bindparam("b_next"),
        provider=bindparam("b_provider"),
        provider_message_id=bindparam("b_pmid"),
        error=bindparam("b_error"),
        sent_at=bindparam("b_sent_at"),
        lease_owner=None,
        lease_until=None,
        updated_at=bindparam("b_now"),
    )
)


async def write_results(
    session: AsyncSession,
    *,
    owner: str,
    now: datetime,
    outcomes: list[Outcome],
    attempts: list[dict[str, Any]],
    new_deliveries: list[dict[str, Any]] | None = None,
) -> None:
    """Record outcomes (only where this worker still holds the lease), attempt rows, and
    deliveries created by channel fallback, in the caller's transaction."""
    if new_deliveries:
        await session.execute(_T.insert(), new_deliveries)
    if attempts:
        await session.execute(_ATTEMPTS.insert(), attempts)
    if outcomes:
        await session.execute(
            _APPLY,
            [
                {
                    "b_id": o.delivery_id,
                    "b_owner": owner,
                    "b_status": o.status.value,
                    "b_attempts": o.attempts,
                    "b_position": o.chain_position,
                    "b_provider_attempts": o.provider_attempts,
                    "b_next": o.next_attempt_at or now,
                    "b_provider": o.provider,
                    "b_pmid": o.provider_message_id,
                    "b_error": o.error,
                    "b_sent_at": o.sent_at,
                    "b_now": now,
                }
                for o in outcomes
            ],
        )
