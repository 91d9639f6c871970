"""Cancelling a message: its deliveries not yet handed to a provider end `cancelled`.

Only `queued` deliveries are cancelled (due now, scheduled by `sendAt`, held for quiet hours
or waiting for a retry): one `UPDATE … WHERE message_id = … AND status = 'queued'`, so a
delivery a worker claimed a moment before (`sending`: its provider call may be under way) is
left to finish and shows as such. The status change goes through the outcome path of every
other status: the status callback is queued in the same transaction, and the caller counts
them (`counted`: `communication_total_cancelled{channel}`) once it committed.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from clinicomm.callbacks import queue as callbacks
from clinicomm.delivery.records import DeliveryStatus
from clinicomm.store.models import Delivery
from clinicomm.telemetry import metrics

log = logging.getLogger(__name__)

_T: Table = Delivery.__table__  # type: ignore[assignment]
REASON = "cancelled by the caller before it was handed to a provider"


async def cancel_message(
    session: AsyncSession, message_id: str, *, now: datetime, actor: str | None = None
) -> list[tuple[str, str]]:
    """Cancel the message's queued deliveries in the caller's transaction; their
    (id, channel) pairs."""
    rows = (
        await session.execute(
            _T.update()
            .where(
                _T.c.message_id == message_id,
                _T.c.status == DeliveryStatus.QUEUED.value,
            )
            .values(
                status=DeliveryStatus.CANCELLED.value,
                error={"reason": REASON, "errors": [], "cancelledBy": actor},
                lease_owner=None,
                lease_until=None,
                updated_at=now,
            )
            .returning(_T.c.id, _T.c.channel)
        )
    ).all()
    ids = [r.id for r in rows]
    await callbacks.enqueue(session, dict.fromkeys(ids, DeliveryStatus.CANCELLED.value), now)
    return [(r.id, r.channel) for r in rows]


def counted(message_id: str, cancelled: list[tuple[str, str]]) -> None:
    """Metrics and the log line of a committed cancel (ids and counts, never addresses)."""
    for channel, n in Counter(channel for _, channel in cancelled).items():
        metrics.TOTAL_CANCELLED.labels(channel).inc(n)
    log.info(
        "message cancelled",
        extra={
            "event": "message_cancelled",
            "messageId": message_id,
            "cancelled": len(cancelled),
            "deliveryIds": [i for i, _ in cancelled][:50],
        },
    )
