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

from clinicomm.callbacks import queue as callbacks
from clinicomm.messaging.models import DeliveryStatus
from clinicomm.store.models import Delivery, DeliveryAttempt, IdempotencyKey, Message, aware

_T: Table = Delivery.__table__  # type: ignore[assignment]
_ATTEMPTS: Table = DeliveryAttempt.__table__  # type: ignore[assignment]
_RETURNING = (
    _T.c.id,
    _T.c.message_id,
    _T.c.clinic_id,
    _T.c.channel,
    _T.c.recipient,
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
    recipient: str
    chain_position: int
    provider_attempts: int
    attempts: int
    created_at: datetime
    errors: list[dict[str, Any]]
    parent_id: str | None


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
    """Erase the contents (bodies, template variables) of messages accepted before `before`:
    the retention period. Message, delivery and attempt rows stay for the record."""
    old = (
        select(Message.id)
        .where(Message.created_at < before, Message.content != b"")
        .limit(limit)
        .scalar_subquery()
    )
    result = await session.execute(update(Message).where(Message.id.in_(old)).values(content=b""))
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
        await callbacks.enqueue(
            session,
            {o.delivery_id: o.status.value for o in outcomes if o.status.value in callbacks.RANK},
            now,
        )
