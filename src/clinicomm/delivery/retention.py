"""Retention sweeps the worker's reaper runs: message contents and idempotency keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.store.models import IdempotencyKey, Message


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
