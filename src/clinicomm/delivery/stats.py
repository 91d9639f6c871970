"""Delivery statistics of one clinic over a time range, with SQL aggregates that run the same
on SQLite and PostgreSQL (GROUP BY counts; percentiles by ORDER BY … LIMIT 1 OFFSET k, since
SQLite has no `percentile_cont`)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.store.models import Delivery, DeliveryAttempt

PERCENTILES = (50, 90, 95, 99)


async def clinic_stats(
    session: AsyncSession, clinic_id: str, start: datetime, end: datetime
) -> dict[str, Any]:
    """Counts by channel, provider and status of the clinic's deliveries created in
    `[start, end)`, and provider-call latency percentiles (ms) per channel and provider from
    their attempts (nearest-rank method)."""
    in_range = (
        Delivery.clinic_id == clinic_id,
        Delivery.created_at >= start,
        Delivery.created_at < end,
    )
    rows = (
        await session.execute(
            select(Delivery.channel, Delivery.provider, Delivery.status, func.count())
            .where(*in_range)
            .group_by(Delivery.channel, Delivery.provider, Delivery.status)
            .order_by(Delivery.channel, Delivery.provider, Delivery.status)
        )
    ).all()
    counts: list[dict[str, Any]] = []
    by_channel: dict[str, dict[str, int]] = {}
    total = 0
    for channel, provider, status, n in rows:
        counts.append({"channel": channel, "provider": provider, "status": status, "count": n})
        statuses = by_channel.setdefault(str(channel), {})
        statuses[str(status)] = statuses.get(str(status), 0) + int(n)
        total += int(n)

    joined = (
        select(DeliveryAttempt.duration_ms)
        .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
        .where(*in_range)
    )
    groups = (
        await session.execute(
            select(Delivery.channel, DeliveryAttempt.provider, func.count())
            .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
            .where(*in_range)
            .group_by(Delivery.channel, DeliveryAttempt.provider)
            .order_by(Delivery.channel, DeliveryAttempt.provider)
        )
    ).all()
    latency = []
    for channel, provider, n in groups:
        n = int(n)
        entry: dict[str, Any] = {"channel": channel, "provider": provider, "attempts": n}
        scoped = joined.where(Delivery.channel == channel, DeliveryAttempt.provider == provider)
        for p in PERCENTILES:
            offset = max(0, math.ceil(p / 100 * n) - 1)
            entry[f"p{p}Ms"] = await session.scalar(
                scoped.order_by(DeliveryAttempt.duration_ms).limit(1).offset(offset)
            )
        latency.append(entry)
    return {
        "clinicId": clinic_id,
        "from": start.isoformat(),
        "to": end.isoformat(),
        "total": total,
        "byChannel": by_channel,
        "counts": counts,
        "latency": latency,
    }
