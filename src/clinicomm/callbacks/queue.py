"""The durable callback queue (`callback_events`): written in the transaction that changes a
delivery's status, claimed in order per delivery, recorded after each POST.

`enqueue` is called at the two places a delivery's status is written: the worker's result
flush (`delivery.outbox.write_results`) and the webhook status path (`delivery.ingest`); a
delivery recorded `failed` at accept (no address for the channel) gets its row from
`event_row` in the accepting transaction (`messaging.writer`). Both
pass the ids whose status changed; the row read back in the same transaction says what the
status now is, so a lost lease (no change written) enqueues nothing.

Order: `seq` = re-queue generation * 10 + status rank. A claim takes, per delivery, only the
pending event with the lowest (seq, id); before sending, an event whose `seq` is not above the
highest already sent for its delivery is marked `superseded`. So the receiver never sees an
earlier status after a later one, whatever order concurrent transactions commit in.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from clinicomm.store.models import CallbackEvent, Delivery, Message, aware

CALLBACKS: Table = CallbackEvent.__table__  # type: ignore[assignment]

#: Status → its rank among callbacks (the final statuses share the top rank).
RANK: dict[str, int] = {
    "sent": 1,
    "delivered": 2,
    "read": 3,
    "failed": 4,
    "bounced": 4,
    "suppressed": 4,
    "expired": 4,
    "cancelled": 4,
}
EVENT_TYPE = "delivery.status"


def _iso(value: datetime | None) -> str | None:
    return aware(value).isoformat() if value is not None else None


def _error_of(error: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(error class, provider code) of a delivery's error document, without messages."""
    if not error:
        return None, None
    errors = error.get("errors")
    last = errors[-1] if isinstance(errors, list) and errors else {}
    klass = last.get("class") if isinstance(last, dict) else None
    code = last.get("code") if isinstance(last, dict) else None
    if klass is None and isinstance(error.get("reason"), str):
        klass = error["reason"] if error["reason"] in _CLASSES else None
    return (str(klass) if klass else None), (str(code) if code is not None else error.get("code"))


_CLASSES = frozenset(
    {"transient", "rate_limited", "provider_down", "configuration", "recipient", "compliance"}
)


async def enqueue(
    session: AsyncSession,
    delivery_ids: Mapping[str, str | None] | list[str],
    now: datetime,
) -> int:
    """Queue a callback for each delivery whose message has a target and whose current status
    is one callbacks report. A mapping gives the status each id is expected to have now (the
    worker's outcome): a row with another status (the write did not apply) is skipped.
    Returns how many were queued. Runs in the caller's transaction."""
    ids = list(delivery_ids)
    if not ids:
        return 0
    expected = delivery_ids if isinstance(delivery_ids, Mapping) else {}
    # Primary-key lookups only (a join lets SQLite scan `messages` for the target filter).
    # The common case, no target, is this one query over two narrow columns.
    owners = select(Delivery.message_id).where(Delivery.id.in_(ids)).scalar_subquery()
    targets = {
        m.id: m
        for m in (
            await session.execute(
                select(Message.id, Message.callback_url, Message.callback_opts, Message.meta).where(
                    Message.id.in_(owners), Message.callback_url.is_not(None)
                )
            )
        ).all()
    }
    if not targets:
        return 0
    deliveries = [
        d
        for d in (
            await session.execute(
                select(
                    Delivery.id,
                    Delivery.message_id,
                    Delivery.clinic_id,
                    Delivery.channel,
                    Delivery.status,
                    Delivery.provider,
                    Delivery.error,
                    Delivery.requeues,
                ).where(Delivery.id.in_(ids))
            )
        ).all()
        if d.message_id in targets
    ]
    rows = [(d, targets[d.message_id]) for d in deliveries]
    values: list[dict[str, Any]] = []
    for row, message in rows:
        if expected and expected.get(row.id) not in (None, row.status):
            continue
        event = event_row(
            delivery_id=row.id,
            message_id=row.message_id,
            clinic_id=row.clinic_id,
            channel=row.channel,
            status=row.status,
            provider=row.provider,
            error=row.error,
            requeues=row.requeues or 0,
            url=message.callback_url,
            opts=message.callback_opts or {},
            metadata=message.meta or {},
            now=now,
        )
        if event is not None:
            values.append(event)
    if values:
        await session.execute(CALLBACKS.insert(), values)
    return len(values)


def event_row(
    *,
    delivery_id: str,
    message_id: str,
    clinic_id: str | None,
    channel: str,
    status: str,
    provider: str | None,
    error: dict[str, Any] | None,
    requeues: int,
    url: str,
    opts: Mapping[str, Any],
    metadata: dict[str, Any],
    now: datetime,
) -> dict[str, Any] | None:
    """The `callback_events` row of one status change, or None when the status is not one
    callbacks report or the target's `events` leave it out."""
    rank = RANK.get(status)
    events = opts.get("events")
    if rank is None or (events is not None and status not in events):
        return None
    error_class, error_code = _error_of(error)
    event_id = str(uuid.uuid4())
    return {
        "event_id": event_id,
        "delivery_id": delivery_id,
        "message_id": message_id,
        "clinic_id": clinic_id,
        "seq": requeues * 10 + rank,
        "status": status,
        "url": url,
        "source": str(opts.get("source", "platform")),
        "payload": {
            "id": event_id,
            "type": EVENT_TYPE,
            "messageId": message_id,
            "deliveryId": delivery_id,
            "clinicId": clinic_id,
            "channel": channel,
            "status": status,
            "provider": provider,
            "errorClass": error_class,
            "errorCode": error_code,
            "time": _iso(now),
            "metadata": metadata,
        },
        "state": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }


@dataclass(frozen=True, slots=True)
class ClaimedCallback:
    id: int
    event_id: str
    delivery_id: str
    clinic_id: str | None
    seq: int
    url: str
    source: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


async def claim(
    session: AsyncSession, *, owner: str, now: datetime, lease: timedelta, limit: int
) -> list[ClaimedCallback]:
    """Lease due callbacks that head their delivery's pending events (one per delivery)."""
    cur = aliased(CallbackEvent, name="cur")
    earlier = aliased(CallbackEvent, name="earlier")
    head = ~(
        select(earlier.id)
        .where(
            earlier.delivery_id == cur.delivery_id,
            earlier.state == "pending",
            or_(
                earlier.seq < cur.seq,
                and_(earlier.seq == cur.seq, earlier.id < cur.id),
            ),
        )
        .exists()
    )
    due = (
        select(cur.id)
        .where(
            cur.state == "pending",
            cur.next_attempt_at <= now,
            or_(cur.lease_until.is_(None), cur.lease_until < now),
            head,
        )
        .order_by(cur.next_attempt_at, cur.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=cur)  # SQLite: no lock clause (writers serialised)
    )
    result = await session.execute(
        update(CallbackEvent)
        .where(CallbackEvent.id.in_(due.scalar_subquery()))
        .values(lease_owner=owner, lease_until=now + lease)
        .returning(
            CallbackEvent.id,
            CallbackEvent.event_id,
            CallbackEvent.delivery_id,
            CallbackEvent.clinic_id,
            CallbackEvent.seq,
            CallbackEvent.url,
            CallbackEvent.source,
            CallbackEvent.payload,
            CallbackEvent.attempts,
            CallbackEvent.created_at,
        )
        .execution_options(synchronize_session=False)
    )
    return [
        ClaimedCallback(
            r.id,
            r.event_id,
            r.delivery_id,
            r.clinic_id,
            r.seq,
            r.url,
            r.source,
            r.payload,
            r.attempts,
            aware(r.created_at),
        )
        for r in result.all()
    ]


async def superseded(session: AsyncSession, item: ClaimedCallback) -> bool:
    """True when a callback of the same or a later status was already sent for its delivery."""
    highest = await session.scalar(
        select(func.max(CallbackEvent.seq)).where(
            CallbackEvent.delivery_id == item.delivery_id, CallbackEvent.state == "sent"
        )
    )
    return highest is not None and highest >= item.seq


async def finish(
    session: AsyncSession,
    item: ClaimedCallback,
    *,
    owner: str,
    state: str,
    now: datetime,
    error: str | None = None,
    next_attempt_at: datetime | None = None,
) -> None:
    """Record the outcome of one claimed callback (only while `owner` holds its lease)."""
    values: dict[str, Any] = {"lease_owner": None, "lease_until": None, "last_error": error}
    if state == "retry":
        values.update(attempts=item.attempts + 1, next_attempt_at=next_attempt_at or now)
    else:
        values.update(state=state, attempts=item.attempts + (state != "superseded"))
        if state == "sent":
            values["sent_at"] = now
    await session.execute(
        update(CallbackEvent)
        .where(CallbackEvent.id == item.id, CallbackEvent.lease_owner == owner)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


async def backlog(session: AsyncSession) -> int:
    """Callbacks still to be sent."""
    return int(
        await session.scalar(
            select(func.count()).select_from(CallbackEvent).where(CallbackEvent.state == "pending")
        )
        or 0
    )


async def for_deliveries(
    session: AsyncSession, delivery_ids: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Each delivery's callbacks for the status API (ids, states, attempts; no payload)."""
    out: dict[str, list[dict[str, Any]]] = {i: [] for i in delivery_ids}
    if not delivery_ids:
        return out
    rows = (
        await session.scalars(
            select(CallbackEvent)
            .where(CallbackEvent.delivery_id.in_(delivery_ids))
            .order_by(CallbackEvent.seq, CallbackEvent.id)
        )
    ).all()
    for r in rows:
        out[r.delivery_id].append(
            {
                "eventId": r.event_id,
                "status": r.status,
                "state": r.state,
                "attempts": r.attempts,
                "lastError": r.last_error,
                "nextAttemptAt": _iso(r.next_attempt_at) if r.state == "pending" else None,
                "sentAt": _iso(r.sent_at),
            }
        )
    return out
