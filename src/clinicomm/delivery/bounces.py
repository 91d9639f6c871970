"""The one definition of a bounce rate, used by the `bounce_rate` alert rule and the stats API
(`GET …/communication/stats` → `bounceRate`).

A delivery counts once it was handed to a provider (`sent_at` within the period, `provider`
set); it bounced when its status is `bounced`. Rate = bounced / handed over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.delivery.records import DeliveryStatus
from clinicomm.store.models import Delivery


@dataclass(frozen=True, slots=True)
class BounceCount:
    """Deliveries one clinic handed to one provider label in the period, and their bounces."""

    clinic_id: str
    provider: str
    total: int
    bounced: int


async def bounce_counts(
    session: AsyncSession,
    since: datetime,
    *,
    until: datetime | None = None,
    clinic_id: str | None = None,
) -> list[BounceCount]:
    """Per (clinic, provider label) handed over in [`since`, `until`); every clinic when
    `clinic_id` is None. Reads `ix_deliveries_sent` alone, for the period only: run it in
    `Database.report` (a day of deliveries is many rows)."""
    rows = (await session.execute(bounce_query(since, until=until, clinic_id=clinic_id))).all()
    return [BounceCount(str(c), str(p), int(t), int(b or 0)) for c, p, t, b in rows]


def bounce_query(
    since: datetime, *, until: datetime | None = None, clinic_id: str | None = None
) -> Select[str | None, str | None, int, Any]:
    """`bounce_counts`' statement: every column it reads is in `ix_deliveries_sent`, which
    every clinic's count (the alert's) reads for the period alone. One clinic's count may go
    by that clinic's own index instead (SQLite's planner, without statistics, always
    prefers the equality): all of the clinic's deliveries, still bounded by one clinic."""
    bounced = func.sum(case((Delivery.status == DeliveryStatus.BOUNCED.value, 1), else_=0))
    query = (
        select(Delivery.clinic_id, Delivery.provider, func.count(), bounced)
        .where(
            Delivery.clinic_id.is_not(None),
            Delivery.sent_at >= since,
            Delivery.provider.is_not(None),
        )
        .group_by(Delivery.clinic_id, Delivery.provider)
    )
    if clinic_id is not None:
        query = query.where(Delivery.clinic_id == clinic_id)
    if until is not None:
        query = query.where(Delivery.sent_at < until)
    return query


def per_clinic(counts: list[BounceCount]) -> dict[str, tuple[int, int]]:
    """clinic id → (handed over, bounced), summed over providers."""
    out: dict[str, tuple[int, int]] = {}
    for c in counts:
        total, bounced = out.get(c.clinic_id, (0, 0))
        out[c.clinic_id] = (total + c.total, bounced + c.bounced)
    return out


async def bounce_rate(
    session: AsyncSession, clinic_id: str, since: datetime, until: datetime | None = None
) -> dict[str, float]:
    """Per provider key, the share of the clinic's deliveries handed to it since `since`
    (before `until`) that ended `bounced`: `{"sendgrid": 0.02}`. Clinic-scoped and global
    hops of one key are counted apart (`"sendgrid"` for the clinic's own, `"global:smtp"`
    for the platform's)."""
    totals: dict[str, list[int]] = {}
    for c in await bounce_counts(session, since, until=until, clinic_id=clinic_id):
        entry = totals.setdefault(_provider_of(c.provider), [0, 0])
        entry[0] += c.total
        entry[1] += c.bounced
    return {key: (b / t if t else 0.0) for key, (t, b) in totals.items()}


def _provider_of(label: str) -> str:
    """`clinic:sendgrid#2` → `sendgrid`; `global:smtp` stays `global:smtp`."""
    scope, _, key = label.partition(":")
    if not key:
        return label
    key = key.split("#", 1)[0]
    return key if scope == "clinic" else f"{scope}:{key}"
